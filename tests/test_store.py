"""Tests of the SQLite store: migrations, conversations, search, export, and faults."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.errors import EnvironmentFault, InvalidInput, NotFound
from engine.store.conversations import ConversationStore, title_from
from engine.store.db import Database, translate_error
from engine.store.migrations import MIGRATIONS, apply_migrations, split_statements

REPO_ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    """A clock that moves one second per reading, so ordering never depends on timing."""

    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database(tmp_path / "bastion.db") as database:
        yield database


@pytest.fixture
def store(db: Database) -> ConversationStore:
    return ConversationStore(db, clock=FakeClock())


def scalar(db: Database, sql: str, params: tuple[object, ...] = ()) -> object:
    row = db.query_one(sql, params)
    assert row is not None
    return row[0]


def fts_integrity_ok(db: Database) -> None:
    # Raises (EnvironmentFault "damaged") when the index and the messages table disagree.
    db.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 1)")


# --- database and migrations ---------------------------------------------------------


def test_migrations_recorded_by_name_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    with Database(path) as db:
        names = [row["name"] for row in db.query("SELECT name FROM migrations ORDER BY rowid")]
        tables = {row[0] for row in db.query("SELECT name FROM sqlite_master WHERE type='table'")}
        ConversationStore(db).create("m")
    assert names == [name for name, _ in MIGRATIONS]
    assert names[:4] == [
        "m001_conversations",
        "m002_models",
        "m003_collections",
        "m004_message_citations",
    ]
    assert {
        "conversations",
        "messages",
        "messages_fts",
        "models",
        "migrations",
        "collections",
        "documents",
        "chunks",
        "chunks_fts",
        "embeddings",
    } <= tables

    with Database(path) as db:
        again = db.query("SELECT name, applied_at FROM migrations ORDER BY rowid")
        assert [row["name"] for row in again] == names
        assert all(row["applied_at"] for row in again)
        assert len(ConversationStore(db).list()) == 1  # reopening kept the data


def test_apply_migrations_runs_only_new_entries(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    first = (("a", "CREATE TABLE t (x INTEGER);"),)
    assert apply_migrations(conn, first) == ["a"]
    assert apply_migrations(conn, first) == []
    second = (*first, ("b", "ALTER TABLE t ADD COLUMN y TEXT;"))
    assert apply_migrations(conn, second) == ["b"]
    assert [r[1] for r in conn.execute("PRAGMA table_info(t)")] == ["x", "y"]
    conn.close()


def test_failed_migration_leaves_nothing_behind(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    broken = (("a", "CREATE TABLE t (x INTEGER); INSERT INTO nowhere VALUES (1);"),)
    with pytest.raises(sqlite3.OperationalError):
        apply_migrations(conn, broken)
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 't'").fetchone() is None
    conn.close()


def test_split_statements_keeps_trigger_bodies_whole() -> None:
    statements = split_statements(MIGRATIONS[0][1])
    triggers = [s for s in statements if s.startswith("CREATE TRIGGER")]
    assert len(triggers) == 3
    assert all(s.endswith("END;") for s in triggers)


def test_pragmas_wal_foreign_keys_busy_timeout(tmp_path: Path) -> None:
    with Database(tmp_path / "bastion.db", timeout=2.5) as db:
        assert scalar(db, "PRAGMA journal_mode") == "wal"
        assert scalar(db, "PRAGMA foreign_keys") == 1
        assert scalar(db, "PRAGMA synchronous") == 1  # NORMAL
        assert scalar(db, "PRAGMA busy_timeout") == 2500
    # WAL is a property of the file: a plain connection sees it too.
    plain = sqlite3.connect(tmp_path / "bastion.db")
    assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    plain.close()


def test_transaction_rolls_back_on_error(store: ConversationStore, db: Database) -> None:
    conversation = store.create("m")
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.execute("UPDATE conversations SET title = 'changed' WHERE id = ?", (conversation.id,))
        raise RuntimeError("boom")
    assert store.get(conversation.id).title is None


def test_nested_transaction_failure_undoes_only_inner_block(db: Database) -> None:
    store = ConversationStore(db)
    with db.transaction():
        outer = store.create("outer")
        with pytest.raises(NotFound):
            store.add_message(999, "user", "nowhere")
        with pytest.raises(RuntimeError), db.transaction() as conn:
            conn.execute("UPDATE conversations SET title = 'inner' WHERE id = ?", (outer.id,))
            raise RuntimeError("inner failure")
    assert store.get(outer.id).title is None
    assert [c.model for c in store.list()] == ["outer"]


# --- conversations and messages ------------------------------------------------------


def test_round_trip_of_conversation_and_messages(store: ConversationStore) -> None:
    conversation = store.create("smollm2", system_prompt="Be brief.", title="Greetings")
    store.add_message(conversation.id, "system", "Be brief.")
    store.add_message(conversation.id, "user", "Hello there")
    answer = store.add_message(
        conversation.id,
        "assistant",
        "Hi!",
        model="smollm2",
        prompt_tokens=12,
        completion_tokens=3,
        ttft_ms=41.5,
        duration_ms=120.0,
        tokens_per_second=25.0,
        interrupted=True,
    )
    assert answer.interrupted is True
    assert answer.completion_tokens == 3

    loaded = store.get(conversation.id)
    assert (loaded.title, loaded.model, loaded.system_prompt) == (
        "Greetings",
        "smollm2",
        "Be brief.",
    )
    assert loaded.message_count == 3
    assert loaded.updated_at > conversation.updated_at

    messages = store.messages(conversation.id)
    assert [m.role for m in messages] == ["system", "user", "assistant"]
    assert messages[-1] == answer
    assert messages[0].interrupted is False
    assert messages[-1].to_dict()["ttft_ms"] == 41.5
    assert json.loads(json.dumps(loaded.to_dict()))["message_count"] == 3


def test_title_from_first_user_message(store: ConversationStore) -> None:
    conversation = store.create("m")
    store.add_message(conversation.id, "system", "You are helpful.")
    assert store.get(conversation.id).title is None
    long_line = "Explain   the difference between " + "very " * 20 + "long words"
    store.add_message(conversation.id, "user", f"\n{long_line}\nsecond line")
    title = store.get(conversation.id).title
    assert title is not None
    assert len(title) == 60
    assert title.endswith("…")
    assert title.startswith("Explain the difference between very")
    store.add_message(conversation.id, "user", "A later question")
    assert store.get(conversation.id).title == title  # only the first one names it

    titled = store.create("m", title="Mine")
    store.add_message(titled.id, "user", "Something else")
    assert store.get(titled.id).title == "Mine"


def test_title_from_edge_cases() -> None:
    assert title_from("  \n\t\n") is None
    assert title_from("short\nmore") == "short"
    assert title_from("x" * 60) == "x" * 60
    assert title_from("x" * 61) == "x" * 59 + "…"


def test_update_message_saves_progress_and_clears_flag(store: ConversationStore) -> None:
    conversation = store.create("m")
    store.add_message(conversation.id, "user", "Tell me a story")
    answer = store.add_message(conversation.id, "assistant", "", model="m", interrupted=True)
    store.update_message(answer.id, content="Once upon", ttft_ms=30.0, interrupted=True)
    partial = store.messages(conversation.id)[-1]
    assert (partial.content, partial.interrupted, partial.ttft_ms) == ("Once upon", True, 30.0)

    store.update_message(
        answer.id,
        content="Once upon a time.",
        completion_tokens=5,
        duration_ms=200.0,
        tokens_per_second=25.0,
        interrupted=False,
    )
    final = store.messages(conversation.id)[-1]
    assert final.content == "Once upon a time."
    assert final.interrupted is False
    assert final.ttft_ms == 30.0  # None left the stored value alone
    assert (final.completion_tokens, final.tokens_per_second) == (5, 25.0)
    assert [h.message_id for h in store.search("time")] == [answer.id]
    with pytest.raises(NotFound):
        store.update_message(12345, content="x", interrupted=False)


def test_list_newest_activity_first_with_limit(store: ConversationStore) -> None:
    first = store.create("m", title="first")
    second = store.create("m", title="second")
    third = store.create("m", title="third")
    store.add_message(first.id, "user", "bump")
    assert [c.id for c in store.list()] == [first.id, third.id, second.id]
    assert [c.id for c in store.list(limit=2)] == [first.id, third.id]
    assert store.list(limit=0) == []


def test_rename_and_delete(store: ConversationStore, db: Database) -> None:
    conversation = store.create("m")
    store.add_message(conversation.id, "user", "the secret word is xylophone")
    store.add_message(conversation.id, "assistant", "noted: xylophone")
    other = store.create("m")
    store.add_message(other.id, "user", "xylophone elsewhere")
    store.rename(conversation.id, "Renamed")
    assert store.get(conversation.id).title == "Renamed"
    assert len(store.search("xylophone")) == 3

    store.delete(conversation.id)
    count = scalar(
        db, "SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (conversation.id,)
    )
    assert count == 0
    hits = store.search("xylophone")
    assert [h.conversation_id for h in hits] == [other.id]
    fts_integrity_ok(db)
    with pytest.raises(NotFound):
        store.get(conversation.id)


def test_unknown_ids_raise_not_found(store: ConversationStore) -> None:
    with pytest.raises(NotFound, match="no conversation 42") as info:
        store.get(42)
    assert info.value.hint is not None and "bastion history list" in info.value.hint
    for call in (
        lambda: store.messages(42),
        lambda: store.add_message(42, "user", "hi"),
        lambda: store.rename(42, "x"),
        lambda: store.delete(42),
        lambda: store.export(42, "md"),
    ):
        with pytest.raises(NotFound):
            call()
    empty = store.create("m")
    assert store.messages(empty.id) == []


def test_bad_role_is_invalid_input(store: ConversationStore) -> None:
    conversation = store.create("m")
    with pytest.raises(InvalidInput):
        store.add_message(conversation.id, "tool", "x")


# --- search --------------------------------------------------------------------------


def test_search_ranks_the_matching_conversation_first(store: ConversationStore) -> None:
    llamas = store.create("m")
    store.add_message(llamas.id, "user", "Tell me about llamas. Llamas are herd animals.")
    store.add_message(llamas.id, "assistant", "Llamas live in the Andes; llamas hum.")
    weather = store.create("m")
    store.add_message(weather.id, "user", "What is the weather today? Also, one llamas fact.")
    store.create("m")

    hits = store.search("llamas")
    assert len(hits) == 3
    assert hits[0].conversation_id == llamas.id
    assert {h.conversation_id for h in hits[:2]} == {llamas.id}
    assert "[Llamas]" in hits[0].snippet or "[llamas]" in hits[0].snippet
    assert hits[0].conversation_title == "Tell me about llamas. Llamas are herd animals."

    both = store.search("weather llamas")  # every word must be present
    assert [h.conversation_id for h in both] == [weather.id]
    assert len(store.search("llamas", limit=1)) == 1
    assert store.search("nothing-like-this") == []


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("C++", "I write C++ code"),
        ('"quoted"', 'he said "quoted" words'),
        ("foo AND", "foo AND bar"),
        ("a:b", "the ratio a:b is odd"),
        ("café", "un café au lait"),
        ("cafe", "un café au lait"),
        ("日本", "私は日本語を勉強しています"),
        ("NEAR(x y)", "NEAR(x y) literal"),
        ("x OR", "x OR"),
        ("-minus ^caret", "-minus ^caret"),
    ],
)
def test_search_awkward_queries_work(store: ConversationStore, query: str, expected: str) -> None:
    target = store.create("m")
    message = store.add_message(target.id, "user", expected)
    other = store.create("m")
    store.add_message(other.id, "user", "plain unrelated text")
    hits = store.search(query)
    assert message.id in [h.message_id for h in hits]
    assert other.id not in [h.conversation_id for h in hits]


@pytest.mark.parametrize("query", ["*", '"', "()", "AND", "NOT", "^", "'", "\\", "%_"])
def test_search_operator_only_queries_do_not_raise(store: ConversationStore, query: str) -> None:
    conversation = store.create("m")
    store.add_message(conversation.id, "user", "some text")
    assert isinstance(store.search(query), list)


def test_search_unspaced_script_snippet_marks_the_match(store: ConversationStore) -> None:
    conversation = store.create("m", title="日本語")
    store.add_message(conversation.id, "user", "私は日本語を勉強しています")
    [hit] = store.search("日本")
    assert hit.snippet == "私は[日本]語を勉強しています"
    assert hit.conversation_title == "日本語"


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_blank_search_is_invalid_input(store: ConversationStore, query: str) -> None:
    with pytest.raises(InvalidInput):
        store.search(query)


# --- export --------------------------------------------------------------------------


def test_export_markdown(store: ConversationStore) -> None:
    conversation = store.create("smollm2", system_prompt="Be brief.")
    store.add_message(conversation.id, "user", "What is WAL?")
    store.add_message(conversation.id, "assistant", "Write-ahead logging.", model="smollm2")
    store.add_message(
        conversation.id, "assistant", "Half an ans", model="smollm2", interrupted=True
    )
    text = store.export(conversation.id, "md")
    assert text.startswith("# What is WAL?\n")
    assert "model smollm2" in text.splitlines()[2]
    assert "Be brief." in text
    assert text.count("### User") == 1
    assert text.count("### Assistant") == 2
    assert text.count("*(interrupted)*") == 1
    assert text.index("Write-ahead logging.") < text.index("*(interrupted)*") < text.index("Half")


def test_export_json(store: ConversationStore) -> None:
    conversation = store.create("smollm2")
    store.add_message(conversation.id, "user", "Héllo 日本")
    store.add_message(conversation.id, "assistant", "Hi", model="smollm2", completion_tokens=1)
    document = json.loads(store.export(conversation.id, "json"))
    assert document["id"] == conversation.id
    assert document["model"] == "smollm2"
    assert document["message_count"] == 2
    assert [m["content"] for m in document["messages"]] == ["Héllo 日本", "Hi"]
    assert document["messages"][1]["interrupted"] is False
    assert document["messages"][1]["completion_tokens"] == 1


def test_export_unknown_format_is_invalid_input(store: ConversationStore) -> None:
    conversation = store.create("m")
    with pytest.raises(InvalidInput, match="format"):
        store.export(conversation.id, "pdf")


# --- concurrency and environment faults ---------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from engine.store.conversations import ConversationStore
    from engine.store.db import Database

    print("ready", flush=True)
    sys.stdin.readline()  # the parent releases both writers at once
    with Database(Path(sys.argv[1])) as db:  # a fresh file: both race to migrate it
        store = ConversationStore(db)
        conversation = store.create("m")
        for i in range(200):
            store.add_message(conversation.id, "user", f"{sys.argv[2]} message {i}")
    print("done", flush=True)
    """
)


def test_two_processes_write_into_one_database(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        for name in ("alpha", "beta")
    ]
    for writer in writers:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err

    with Database(path) as db:
        assert scalar(db, "PRAGMA integrity_check") == "ok"
        assert scalar(db, "SELECT COUNT(*) FROM messages") == 400
        names = [r[0] for r in db.query("SELECT name FROM migrations")]
        assert sorted(names) == sorted(name for name, _ in MIGRATIONS)
        fts_integrity_ok(db)
        store = ConversationStore(db)
        assert len(store.search("alpha")) == 50  # the default limit
        assert sorted(c.message_count for c in store.list()) == [200, 200]


def test_threads_share_one_database(store: ConversationStore, db: Database) -> None:
    conversation = store.create("m")
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            start.wait(timeout=30)
            for i in range(50):
                store.add_message(conversation.id, "user", f"{name} {i}")
                store.list(limit=1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert store.get(conversation.id).message_count == 200
    assert scalar(db, "PRAGMA integrity_check") == "ok"


def test_locked_rollback_journal_database_gives_environment_fault(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE x (y INTEGER)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(EnvironmentFault, match="is busy: another Bastion process") as info:
            Database(path, timeout=0.1)
        assert info.value.hint
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_write_to_locked_wal_database_gives_environment_fault(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    Database(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with Database(path, timeout=0.1) as db:  # WAL: opening and reading still work
            store = ConversationStore(db)
            assert store.list() == []
            with pytest.raises(EnvironmentFault, match=str(path)):
                store.create("m")
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_garbage_file_gives_environment_fault(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    path.write_bytes(b"this is not SQLite at all, just some text " * 200)
    with pytest.raises(EnvironmentFault, match="is not a database"):
        Database(path)


def test_unopenable_path_gives_environment_fault(tmp_path: Path) -> None:
    # Tests run as root, where chmod cannot make a folder unwritable: a parent that is a
    # regular file fails the same way.
    blocker = tmp_path / "home"
    blocker.write_text("a file, not a folder")
    path = blocker / "bastion.db"
    with pytest.raises(EnvironmentFault, match="cannot be opened") as info:
        Database(path)
    assert str(path) in info.value.message


@pytest.mark.parametrize(
    ("message", "code", "expected"),
    [
        ("database or disk is full", 13, "is full"),
        ("disk I/O error", 10 | (3 << 8), "disk I/O error"),
        ("attempt to write a readonly database", 8, "read-only"),
        ("database disk image is malformed", 11, "damaged"),
        ("database is locked", None, "busy"),
    ],
)
def test_translate_error(message: str, code: int | None, expected: str) -> None:
    exc = sqlite3.OperationalError(message)
    if code is not None:
        exc.sqlite_errorcode = code
    fault = translate_error(exc, Path("/x/bastion.db"))
    assert isinstance(fault, EnvironmentFault)
    assert expected in fault.message
    assert "/x/bastion.db" in fault.message


def test_translate_error_leaves_bugs_alone() -> None:
    exc = sqlite3.OperationalError("near 'SELEC': syntax error")
    exc.sqlite_errorcode = 1
    assert translate_error(exc, Path("/x/bastion.db")) is None


# --- ratings -------------------------------------------------------------------------


def test_rating_an_answer_is_stored_and_cleared(store: ConversationStore, db: Database) -> None:
    conversation = store.create("m")
    question = store.add_message(conversation.id, "user", "Why WAL?")
    answer = store.add_message(conversation.id, "assistant", "Readers never block.")
    assert answer.rating == 0
    store.set_rating(answer.id, 1)
    assert store.messages(conversation.id)[1].rating == 1
    store.set_rating(answer.id, -1)
    assert store.messages(conversation.id)[1].rating == -1
    assert json.loads(store.export(conversation.id, "json"))["messages"][1]["rating"] == -1
    store.set_rating(answer.id, 0)  # cleared: NULL, so "rated" is "rating IS NOT NULL"
    assert store.messages(conversation.id)[1].rating == 0
    assert scalar(db, "SELECT rating IS NULL FROM messages WHERE id = ?", (answer.id,)) == 1
    with pytest.raises(InvalidInput, match="rating"):
        store.set_rating(answer.id, 2)
    with pytest.raises(InvalidInput, match="answers"):
        store.set_rating(question.id, 1)
    with pytest.raises(NotFound):
        store.set_rating(answer.id + 100, 1)
