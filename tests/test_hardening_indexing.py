"""Indexing hardening: odd file names, parsers that raise, Bastion's own data, replaced embedders.

Each test reproduces a fault of issue 10 with real parts (the installed CLI, SQLite, FAISS,
python-docx, HTMLParser, sentence-transformers folders) and asserts the class is fixed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine import Engine
from engine.jobs import JobContext
from tests.conftest import CLIResult, assert_one_line_error
from tests.tiny_embedder import tiny_model

# Words that appear only inside documents, to look for where they must never be.
DOCX_WORD = "Zanzibarquux"
HTML_WORD = "Wolfsbanexyzzy"
GOOD = "The lamp room key hangs on the brass hook by the stairs."


@pytest.fixture(scope="session")
def embedder_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One int8 export per model for the whole session (each test has its own home)."""
    return tmp_path_factory.mktemp("hardening-embedder-cache")


def _share_cache(home: Path, cache: Path) -> None:
    (home / "cache").mkdir(parents=True, exist_ok=True)
    link = home / "cache" / "embedders"
    if not link.exists():
        link.symlink_to(cache, target_is_directory=True)


@pytest.fixture(autouse=True)
def _share_embedder_cache(home: Path, embedder_cache: Path) -> None:
    _share_cache(home, embedder_cache)


def _fs(raw: bytes) -> str:
    """A file name as ``os.walk`` returns it (undecodable bytes as surrogate escapes)."""
    return os.fsdecode(raw)


def _shown(raw: bytes) -> str:
    """How Bastion shows a name with undecodable bytes: each such byte as ``\\xNN``."""
    return raw.decode("utf-8", "backslashreplace")


def _status(cli) -> dict[str, dict[str, object]]:
    result = cli("collections", "status", "docs", "--json")
    assert result.code == 0, result.stderr
    return {os.path.basename(str(f["path"])): f for f in result.json()["files"]}


# -- finding 1: file names that are not UTF-8 ---------------------------------------------


def test_a_file_name_that_is_not_utf8_is_indexed_printed_and_cited(
    cli, tmp_path: Path, home: Path
) -> None:
    from engine.rag.service import Documents

    root = tmp_path / "docs"
    root.mkdir()
    (root / "good.txt").write_text(GOOD + "\n")
    odd = b"r\xe9sum\xe9.txt"  # Latin-1, as an old archive or a Windows share names it
    (root / _fs(odd)).write_text("The Quillonbeck beacon was relit in 1903.\n")
    # A file named directly whose own name is not UTF-8 (an argument from the shell).
    other = tmp_path / _fs(b"other-\xff")
    other.mkdir()
    named = other / _fs(b"note-\xfe.md")
    named.write_text("# Note\n\nThe Marrowind pier is closed in winter.\n")

    assert cli("collections", "create", "docs").code == 0
    added = cli("collections", "add", "docs", str(root), str(named), "--json")
    assert added.code == 0, added.stderr
    report = added.json()
    assert report["indexed"] == 3 and report["failed"] == [], report
    files = _status(cli)
    assert files[_shown(odd)]["state"] == "indexed"
    assert files["good.txt"]["state"] == "indexed"
    assert files[_shown(b"note-\xfe.md")]["state"] == "indexed"
    assert any(
        str(f["path"]).startswith(str(tmp_path / _shown(b"other-\xff"))) for f in files.values()
    )
    text_status = cli("collections", "status", "docs")
    assert text_status.code == 0 and _shown(odd) in text_status.stdout, text_status.stderr

    for _ in range(2):  # a later sync works, and finds nothing to do
        again = cli("collections", "sync", "docs", "--json")
        assert again.code == 0, again.stderr
        assert again.json()["indexed"] == 0 and again.json()["unchanged"] == 3
        assert again.json()["removed"] == 0 and again.json()["failed"] == []

    hits = cli("search", "docs", "Quillonbeck beacon relit", "--json")
    assert hits.code == 0, hits.stderr
    assert hits.json()[0]["path"] == str(root / _shown(odd))
    plain = cli("search", "docs", "Quillonbeck beacon relit")
    assert plain.code == 0 and _shown(odd) in plain.stdout, plain.stderr

    answer = cli(
        "chat",
        "When was the Quillonbeck beacon relit?",
        "-c",
        "docs",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
    )
    assert answer.code == 0, answer.stderr
    cited = answer.json()["citations"]
    assert cited and cited[0]["path"] == str(root / _shown(odd))
    shown = cli("history", "show", str(answer.json()["conversation_id"]), "--json")
    assert shown.code == 0 and shown.json()["messages"][-1]["citations"][0]["path"] == str(
        root / _shown(odd)
    )
    # The source viewer opens the file from the path a citation shows.
    source = Documents.source_text(cited[0]["path"])
    assert "Quillonbeck" in source.text and source.path == cited[0]["path"]

    # An embedder folder is named by its path in every listing: such a name is refused.
    odd_embedder = tmp_path / _fs(b"embedder-\xff")
    odd_embedder.mkdir()
    (odd_embedder / "config.json").write_text("{}")
    refused = cli("collections", "create", "other", "--embedder", str(odd_embedder))
    assert_one_line_error(refused, 2, "not UTF-8")


ODD_NAMES: tuple[bytes, ...] = (
    b"caf\xe9 latin-1.txt",
    b"\xff\xfe bytes.md",
    b"half \xe2\x82 euro.txt",  # a UTF-8 sequence cut short
    b"line\nbreak.txt",
    b"tab\there.txt",
    b"-rf.txt",
    b"--json.txt",
    b"*.txt",
    b"[abc].txt",
    b"?.md",
    b"back\\slash.txt",
    b"r\\xe9sum\\xe9.txt",  # looks like an escaped name, and is not one
    b"r\xe9sum\xe9.txt",
    b"emoji \xf0\x9f\x93\x84.txt",
    b"trailing space .txt",
    b"x" * 240 + b".txt",
    b"semi;colon 'quote\" $(echo).txt",
)


def test_a_folder_of_odd_file_names_is_indexed_and_syncs_cleanly(
    cli, tmp_path: Path, engine: Engine
) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    words = {}
    for n, raw in enumerate(ODD_NAMES):
        word = f"oddword{n:02d}x"
        words[raw] = word
        (root / _fs(raw)).write_text(f"{word} is written in this file.\n")
    (root / "good.txt").write_text(GOOD + "\n")
    unsupported = b"data.t\xe9xt"  # an extension that is not UTF-8 either
    (root / _fs(unsupported)).write_text("not read\n")

    assert cli("collections", "create", "docs").code == 0
    added = cli("collections", "add", "docs", str(root), "--json")
    assert added.code == 0, added.stderr
    assert added.json()["indexed"] == len(ODD_NAMES) + 1, added.json()
    files = cli("collections", "status", "docs", "--json").json()["files"]
    states = [(str(f["path"]), f["state"], f["error"]) for f in files]
    assert len(states) == len(ODD_NAMES) + 2
    assert sum(state == "indexed" for _, state, _ in states) == len(ODD_NAMES) + 1
    skipped = [(p, e) for p, state, e in states if state == "skipped"]
    assert len(skipped) == 1 and skipped[0][0].endswith(_shown(unsupported))
    assert "unsupported" in str(skipped[0][1])
    assert cli("collections", "status", "docs").code == 0
    for _ in range(2):
        again = cli("collections", "sync", "docs", "--json")
        assert again.code == 0, again.stderr
        report = again.json()
        assert (report["indexed"], report["removed"], report["failed"]) == (0, 0, [])
        assert report["unchanged"] == len(ODD_NAMES) + 2

    # Every odd file is searchable under its own (shown) name.
    for raw, word in words.items():
        hits = engine.documents.search("docs", word, k=1, mode="keyword")
        assert hits and os.path.basename(hits[0].chunk.path) == _shown(raw), (raw, hits)


# -- findings 2 and 3: a parser that raises fails one document, and its text stays out ---


def _docx_with_table_patch(path: Path, patch: str, where: str) -> Path:
    """A Word file saved by python-docx, with ``patch`` put into its first table's XML.

    ``where`` is "tcPr" (into the first cell's properties) or "tr" (first row's start).
    """
    import docx

    document = docx.Document()
    document.add_paragraph(f"{DOCX_WORD} paragraph before the table.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = f"{DOCX_WORD} cell"
    plain = path.with_suffix(".plain")
    document.save(str(plain))
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "word/document.xml":
                xml = data.decode("utf-8")
                tag = f"<w:{where}>"
                at = xml.index(tag, xml.index("<w:tbl>")) + len(tag)
                data = (xml[:at] + patch + xml[at:]).encode("utf-8")
            zout.writestr(item, data)
    plain.unlink()
    return path


def _docx_with_bad_grid_span(path: Path) -> Path:
    """python-docx raises ValueError quoting the document: int() of a gridSpan that is text."""
    return _docx_with_table_patch(path, f'<w:gridSpan w:val="{DOCX_WORD}"/>', "tcPr")


def test_a_parser_that_raises_fails_its_document_and_keeps_its_text_out_of_the_log(
    cli, tmp_path: Path, home: Path
) -> None:
    import docx

    root = tmp_path / "docs"
    root.mkdir()
    bad_docx = _docx_with_bad_grid_span(root / "a_table.docx")
    with pytest.raises(ValueError, match=DOCX_WORD):  # python-docx's own fault, not a fake
        for table in docx.Document(str(bad_docx)).tables:
            [tc.grid_span for tr in table._tbl.tr_lst for tc in tr.tc_lst]
    # The inputs of the issue: python-docx raised ValueError on a vertical merge in a first
    # row, HTMLParser AssertionError (quoting the page) on "<![". Whether the loaders read
    # them or fail them, each ends with a state and the run goes on.
    _docx_with_table_patch(root / "b_vmerge.docx", "<w:vMerge/>", "tcPr")
    (root / "c_page.html").write_text(
        f"<html><body><p>{HTML_WORD} first</p><![ {HTML_WORD} plugh </body></html>"
    )
    (root / "d_good.txt").write_text(GOOD + "\n")
    (root / "e_more.md").write_text("# More\n\nThe fog bell rings every ten seconds.\n")

    assert cli("collections", "create", "docs").code == 0
    added = cli("collections", "add", "docs", str(root), "--json")
    assert added.code == 0, added.stderr
    report = added.json()
    assert "a_table.docx" in {os.path.basename(f["path"]) for f in report["failed"]}
    files = _status(cli)
    assert files["a_table.docx"]["state"] == "failed"
    assert files["a_table.docx"]["error"] == "the DOCX parser failed (ValueError)"
    assert files["b_vmerge.docx"]["state"] in ("indexed", "failed")
    assert files["c_page.html"]["state"] in ("indexed", "failed")
    assert files["d_good.txt"]["state"] == "indexed"
    assert files["e_more.md"]["state"] == "indexed"

    again = cli("collections", "sync", "docs", "--json")
    assert again.code == 0 and again.json()["unchanged"] == 5, again.stdout

    log = (home / "logs" / "bastion.log").read_text(encoding="utf-8")
    assert "ValueError" in log and "a_table.docx" in log and ".py:" in log  # type and place
    for word in (DOCX_WORD, HTML_WORD, "plugh"):
        assert word not in log
        assert word not in added.stderr + added.stdout + again.stderr


@pytest.mark.parametrize("fault", [AssertionError, RecursionError, MemoryError])
def test_any_fault_in_a_parser_fails_only_that_document(
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    home: Path,
    fault: type[BaseException],
) -> None:
    from html.parser import HTMLParser

    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text(f"a.txt says: {GOOD}\n")
    (root / "b.html").write_text(f"<p>{HTML_WORD} in a page</p>\n")
    (root / "c.md").write_text(f"# C\n\nc.md says: {GOOD}\n")

    def goahead(self: HTMLParser, end: bool) -> None:
        # What HTMLParser did on "<![": raise quoting the page (here inside the library).
        raise fault(f"expected name token at {self.rawdata[:30]!r}")

    monkeypatch.setattr(HTMLParser, "goahead", goahead)
    engine.documents.create("docs")
    report = engine.documents.add("docs", [str(root)], JobContext())
    states = {Path(d.path).name: (d.state, d.error) for d in engine.documents.status("docs")[2]}
    assert states["a.txt"][0] == states["c.md"][0] == "indexed"
    assert states["b.html"][0] == "failed"
    assert fault.__name__ in str(states["b.html"][1]) and HTML_WORD not in str(states)
    assert report.indexed == 2 and [Path(p).name for p, _ in report.failed] == ["b.html"]
    for handler in logging.getLogger().handlers:
        handler.flush()
    log = (home / "logs" / "bastion.log").read_text(encoding="utf-8")
    assert fault.__name__ in log and "in goahead" in log  # the type and the place
    assert HTML_WORD not in log


def test_the_source_viewer_reports_a_parser_fault_as_a_document_error(tmp_path: Path) -> None:
    from engine.rag.loaders import DocumentError
    from engine.rag.service import Documents

    bad = _docx_with_bad_grid_span(tmp_path / "table.docx")
    with pytest.raises(DocumentError) as caught:
        Documents.source_text(str(bad))
    assert caught.value.message == "the DOCX parser failed (ValueError)"
    assert DOCX_WORD not in str(caught.value)


# -- finding 7: Bastion's own data is never indexed --------------------------------------


def test_bastion_never_indexes_its_own_home_caches_or_venv(
    cli, tmp_path: Path, embedder_cache: Path
) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "note.txt").write_text(GOOD + "\n")
    inner_home = root / "home"  # the macOS default home lies in ~/Library, which users add
    _share_cache(inner_home, embedder_cache)
    train_cache = root / "train-cache"
    train_cache.mkdir()
    (train_cache / "encoded.jsonl").write_text('{"text": "Cachedtrainingrow"}\n')
    env = {"BASTION_HOME": str(inner_home), "BASTION_TRAIN_CACHE": str(train_cache)}

    def run(*args: str) -> CLIResult:
        return cli(*args, env=env)

    assert run("collections", "create", "docs").code == 0  # creates the home in the folder
    (inner_home / "logs" / "audit.log").write_text("prompt: my Auditedsecret prompt\n")
    (inner_home / "adapters" / "x").mkdir(parents=True)
    (inner_home / "adapters" / "x" / "prepared.redactions.json").write_text(
        json.dumps({"EMAIL": ["alice.removedperson@example.com"]})
    )
    (root / "link-to-audit.log").symlink_to(inner_home / "logs" / "audit.log")
    # A redaction report written next to a user's own file holds what was removed.
    (root / "mine.redactions.json").write_text(json.dumps({"PERSON": ["Removedperson"]}))

    added = run("collections", "add", "docs", str(root), "--json")
    assert added.code == 0, added.stderr
    status = run("collections", "status", "docs", "--json")
    paths = [str(f["path"]) for f in status.json()["files"]]
    assert paths == [str(root / "note.txt")], paths
    for word in ("Auditedsecret", "removedperson", "Cachedtrainingrow"):
        hits = run("search", "docs", word, "--json")
        assert hits.code == 0, hits.stderr
        assert all(word.lower() not in h["text"].lower() for h in hits.json())

    # Named directly, the home and the venv are refused with one line.
    for path in (inner_home / "logs" / "audit.log", Path(sys.prefix) / "pyvenv.cfg"):
        assert_one_line_error(run("collections", "add", "docs", str(path)), 2, "never indexed")


def test_files_of_the_home_indexed_by_an_older_version_are_dropped_at_sync(
    engine: Engine, tmp_path: Path, home: Path
) -> None:
    # An older Bastion indexed its own logs; the next sync must drop them.
    from engine.rag.collections import Source

    engine.documents.create("docs")
    store = engine.documents.store
    collection = store.get("docs")
    (home / "logs" / "audit.log").write_text("prompt: Leakedoldprompt\n")
    store.add_source(collection, Source(str(home.parent), (), ()))
    store.mark_pending(collection, [str(home / "logs" / "audit.log")])
    (tmp_path / "note.txt").write_text(GOOD + "\n")
    engine.documents.sync("docs", JobContext())
    paths = [d.path for d in engine.documents.status("docs")[2]]
    assert str(home / "logs" / "audit.log") not in paths
    assert str(tmp_path / "note.txt") in paths


# -- finding 9: vectors follow the model's content, not its folder's name -----------------


def _stored_vectors(home: Path) -> dict[str, np.ndarray]:
    """Chunk text -> the vector the collection's dense search uses, read from SQLite."""
    from engine.rag.collections import CollectionStore
    from engine.store.db import Database

    with Database(home / "bastion.db") as db:
        store = CollectionStore(db)
        collection = store.get("docs")
        ids, vectors = store.passages.indexed_vectors(collection)
        texts = store.passages.chunks([int(i) for i in ids])
    return {texts[int(i)].text: vectors[n] for n, i in enumerate(ids)}


def test_replacing_the_model_in_an_embedder_folder_re_embeds(
    cli, tmp_path: Path, home: Path
) -> None:
    from engine.rag.embedder import DEFAULT_EMBEDDER, get_embedder, resolve_embedder

    folder = tmp_path / "embedder"
    shutil.copytree(resolve_embedder(DEFAULT_EMBEDDER), folder)
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("The lighthouse keeper polished the great lens every night.\n")
    (root / "b.txt").write_text("The harbour stew is seasoned with smoked paprika.\n")
    assert cli("collections", "create", "docs", "--embedder", str(folder)).code == 0
    added = cli("collections", "add", "docs", str(root), "--json")
    assert added.code == 0 and added.json()["indexed"] == 2, added.stderr
    before = _stored_vectors(home)
    assert {v.shape[0] for v in before.values()} == {384}

    shutil.rmtree(folder)
    tiny_model(folder, hidden=32)  # another model, another dimension, the same folder

    stale = cli("search", "docs", "polished lens")
    assert_one_line_error(stale, 1, "changed", "sync")
    synced = cli("collections", "sync", "docs", "--json")
    assert synced.code == 0, synced.stderr
    assert synced.json()["indexed"] == 2 and synced.json()["failed"] == []
    hits = cli("search", "docs", "polished lens", "--mode", "dense", "--json")
    assert hits.code == 0, hits.stderr
    assert {os.path.basename(h["path"]) for h in hits.json()} == {"a.txt", "b.txt"}
    assert cli("search", "docs", "paprika stew", "--json").code == 0

    after = _stored_vectors(home)
    assert set(after) == set(before)
    fresh = get_embedder(str(folder), cache_dir=home / "cache" / "embedders")
    assert fresh.dimension == 32  # the process cache follows the folder's content too
    for text, vector in after.items():
        expected = fresh.encode([text])[0]
        assert vector.shape == (32,)
        assert float(np.dot(vector, expected)) > 0.99

    again = cli("collections", "sync", "docs", "--json")
    assert again.code == 0 and again.json()["unchanged"] == 2 and again.json()["indexed"] == 0


def _make_legacy(home: Path) -> None:
    """Turn the database back into what Bastion wrote before vectors had content keys."""
    db = sqlite3.connect(home / "bastion.db")
    with db:
        db.execute("UPDATE collections SET embedder_key = NULL")
        db.execute("UPDATE embeddings SET model_key = NULL")
    db.close()


def _legacy_collection(engine: Engine, tmp_path: Path, home: Path) -> None:
    """Collection ``docs`` of two files, indexed, then made to look pre-content-keys."""
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text(GOOD + "\n")
    (root / "b.txt").write_text("The harbour stew is seasoned with smoked paprika.\n")
    engine.documents.create("docs")
    assert engine.documents.add("docs", [str(root)], JobContext()).indexed == 2
    _make_legacy(home)


def test_vectors_stored_before_content_keys_are_kept_when_the_model_is_the_same(
    engine: Engine, tmp_path: Path, home: Path
) -> None:
    _legacy_collection(engine, tmp_path, home)

    again = Engine(home)
    try:
        hits = again.documents.search("docs", "brass hook key", k=1, mode="dense")
        assert hits[0].chunk.path.endswith("a.txt")
        report = again.documents.sync("docs", JobContext())
        assert (report.indexed, report.unchanged) == (0, 2)  # adopted, not re-embedded
    finally:
        again.close()
    db = sqlite3.connect(home / "bastion.db")
    keys = {row[0] for row in db.execute("SELECT model_key FROM embeddings")}
    collection_key = db.execute("SELECT embedder_key FROM collections").fetchone()[0]
    db.close()
    assert keys == {collection_key} and collection_key


def test_vectors_stored_before_content_keys_by_another_model_are_re_embedded(
    engine: Engine, tmp_path: Path, home: Path
) -> None:
    _legacy_collection(engine, tmp_path, home)
    # The model was replaced before the upgrade: the stored vectors point elsewhere.
    rng = np.random.default_rng(0)
    db = sqlite3.connect(home / "bastion.db")
    with db:
        for (text_hash,) in db.execute("SELECT text_hash FROM embeddings").fetchall():
            vector = rng.standard_normal(384).astype(np.float16)
            db.execute(
                "UPDATE embeddings SET vector = ? WHERE text_hash = ?",
                (vector.tobytes(), text_hash),
            )
    db.close()

    report = engine.documents.sync("docs", JobContext())
    assert report.indexed == 2
    hits = engine.documents.search("docs", "brass hook key", k=1, mode="dense")
    assert hits[0].chunk.path.endswith("a.txt") and (hits[0].dense_score or 0) > 0.5


# -- collections cut into chunks by an older chunker ---------------------------------------


def test_a_collection_cut_by_an_older_chunker_is_cut_again_at_its_next_sync(
    cli, tmp_path: Path, home: Path
) -> None:
    from engine.rag.chunking import CHUNKER_VERSION

    root = tmp_path / "docs"
    root.mkdir()
    (root / "guide.html").write_text(
        "<html><head><title>Harbour guide</title></head><body><h1>Lamps</h1>"
        f"<p>{GOOD}</p><h1>Food</h1><p>The harbour stew is seasoned with smoked paprika.</p>"
        "</body></html>"
    )
    (root / "note.txt").write_text("The ferry leaves at dawn from the north pier.\n")
    assert cli("collections", "create", "docs").code == 0
    added = cli("collections", "add", "docs", str(root), "--json")
    assert added.code == 0 and added.json()["indexed"] == 2, added.stderr
    db = sqlite3.connect(home / "bastion.db")
    version = db.execute("SELECT chunker_version FROM collections").fetchone()[0]
    current = db.execute("SELECT ordinal, text, heading FROM chunks ORDER BY id").fetchall()
    assert version == CHUNKER_VERSION
    assert any(heading and "Lamps" in heading for _, _, heading in current)
    # What a Bastion from before chunker versions left: no version, chunks without headings.
    with db:
        db.execute("UPDATE collections SET chunker_version = NULL")
        db.execute("UPDATE chunks SET heading = NULL")
    db.close()

    status = cli("collections", "status", "docs", "--json")
    assert status.code == 0 and status.json()["outdated"] == 1, status.stderr
    said = cli("collections", "status", "docs")
    assert "older Bastion" in said.stderr and "collections sync docs" in said.stderr
    found = cli("search", "docs", "brass hook", "--json")  # still searchable as it is
    assert found.code == 0 and found.json()[0]["path"].endswith("guide.html"), found.stderr

    synced = cli("collections", "sync", "docs", "--json")
    assert synced.code == 0, synced.stderr
    assert (synced.json()["indexed"], synced.json()["unchanged"]) == (2, 0)
    db = sqlite3.connect(home / "bastion.db")
    version = db.execute("SELECT chunker_version FROM collections").fetchone()[0]
    recut = db.execute("SELECT ordinal, text, heading FROM chunks ORDER BY id").fetchall()
    db.close()
    assert version == CHUNKER_VERSION and recut == current
    assert cli("collections", "status", "docs", "--json").json()["outdated"] == 0
    again = cli("collections", "sync", "docs", "--json")
    assert (again.json()["indexed"], again.json()["unchanged"]) == (0, 2)
