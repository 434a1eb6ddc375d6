"""The FAISS cache under a disk that refuses writes: the good cache stays, the search answers.

The refusal is real: ``RLIMIT_FSIZE`` in a child process, with ``SIGXFSZ`` ignored as a
shell's ``ulimit -f`` leaves it, so every write past the limit fails with ``EFBIG``, exactly
where a full disk or a quota would fail it. FAISS's own file writer reports only some of
those failures (its buffered tail is lost silently when the file is closed), which once left
a 0-byte ``index.faiss`` in place of a good one.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.rag.vector_index import INDEX_FILE, SIDECAR_FILE, VectorIndex
from tests.conftest import BIN

# Builds a cache of ``small`` vectors (generation 1), then, with writes capped at ``limit``
# bytes, tries to replace it by one of ``large`` vectors (generation 2).
_SAVE_UNDER_A_LIMIT = """\
import json, resource, signal, sys
from pathlib import Path
import numpy as np
from engine.rag.vector_index import VectorIndex

folder = Path(sys.argv[1])
small, large, limit = (int(arg) for arg in sys.argv[2:5])
rng = np.random.default_rng(0)
first = VectorIndex.build(np.arange(small), rng.standard_normal((small, 64)), 64)
first.save(folder, meta={"generation": 1})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
second = VectorIndex.build(np.arange(large), rng.standard_normal((large, 64)), 64)
try:
    outcome = second.save(folder, meta={"generation": 2})
except BaseException as exc:
    outcome = f"raised {type(exc).__name__}: {exc}"
print(json.dumps({"outcome": outcome, "count": len(second)}))
"""


def _run_save_under_a_limit(folder: Path, small: int, large: int, limit: int) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", _SAVE_UNDER_A_LIMIT, str(folder), *map(str, (small, large, limit))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize(
    ("small", "large", "limit"),
    [
        (10, 10, 0),  # nothing can be written: FAISS used to leave a 0-byte index.faiss
        (10, 10, 1000),  # the write stops half-way inside FAISS's buffer: silently truncated
        (10, 2000, 100_000),  # the write stops half-way through a large one: FAISS raises
    ],
    ids=["nothing-writable", "short-buffered-write", "short-large-write"],
)
def test_a_cache_that_cannot_be_written_is_skipped_and_the_good_one_kept(
    tmp_path: Path, small: int, large: int, limit: int
) -> None:
    folder = tmp_path / "collection"
    result = _run_save_under_a_limit(folder, small, large, limit)
    assert result["outcome"] is False, result  # logged and skipped, not raised
    # The cache written before the refusal is intact and still loads as it was.
    loaded = VectorIndex.load(folder)
    assert loaded is not None and loaded.meta == {"generation": 1} and len(loaded) == small
    assert sorted(p.name for p in folder.iterdir()) == [INDEX_FILE, SIDECAR_FILE], "no debris"


def test_a_cache_write_that_succeeds_still_says_so(tmp_path: Path) -> None:
    result = _run_save_under_a_limit(tmp_path / "collection", 10, 20, 10_000_000)
    assert result["outcome"] is True, result
    loaded = VectorIndex.load(tmp_path / "collection")
    assert loaded is not None and loaded.meta == {"generation": 2} and len(loaded) == 20


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: both survive exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def test_search_answers_when_its_index_cache_cannot_be_written(cli, home: Path) -> None:
    docs = home.parent / "docs"
    docs.mkdir()
    for number in range(6):
        paragraphs = (
            f"Paragraph {j} of file {number} about lighthouse keepers and the harbour stew."
            for j in range(200)
        )
        (docs / f"notes-{number}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    assert cli("collections", "create", "docs").code == 0
    added = cli("collections", "add", "docs", str(docs), "--json")
    assert added.code == 0, added.stderr
    folder = next((home / "collections").iterdir())
    index_size = (folder / INDEX_FILE).stat().st_size
    # Room for SQLite's 32 KiB shared-memory file and the log, not for the index.
    limit = 64 * 1024
    assert index_size > 2 * limit
    for name in (INDEX_FILE, SIDECAR_FILE):
        (folder / name).unlink()  # the next search rebuilds the index and saves it again

    proc = subprocess.run(
        [str(BIN / "bastion"), "search", "docs", "harbour stew", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "BASTION_HOME": str(home)},
        preexec_fn=_limit_file_size(limit),
    )
    assert proc.returncode == 0, proc.stderr
    hits = json.loads(proc.stdout)
    assert hits and all("harbour stew" in hit["text"] for hit in hits)
    assert list(folder.iterdir()) == [], "neither a partial index nor a temporary file is left"
    log = (home / "logs" / "bastion.log").read_text(encoding="utf-8")
    assert "could not save the vector index" in log
