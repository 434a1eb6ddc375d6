"""Indexing, the embedder's int8 export and a fine-tune with its GGUF export write nothing
into the current directory: the installed command runs from a read-only folder.

ONNX Runtime's symbolic shape inference once left ``sym_shape_infer_temp.onnx`` and a
90 MB ``<uuid>.data`` in the folder the export ran from (the repository root). Tests run as
root, where a mode of 0o555 stops nothing, so the real check is that the folder's entries
and its own modification time (which any file created and removed again changes) are the
same after each command. Each test has a fresh home, so the embedder's one-time export and
the base model's dequantization run for real.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, DEFAULT_MODEL
from tests.train_facts import ANSWERS, QUESTIONS, chat_line

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

Snapshot = dict[str, tuple[int, int]]


@pytest.fixture
def readonly_cwd(tmp_path: Path) -> Iterator[Path]:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("the user's own file\n")
    cwd.chmod(0o555)
    yield cwd
    cwd.chmod(0o755)  # so that pytest can remove it


def _snapshot(folder: Path) -> Snapshot:
    """Every entry under ``folder`` (and the folder) with its size and modification time."""
    entries = {".": (0, folder.stat().st_mtime_ns)}
    for path in folder.rglob("*"):
        stat = path.lstat()
        entries[path.relative_to(folder).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return entries


def _bastion(home: Path, cwd: Path, *args: str, timeout: float = 900) -> str:
    """``bastion ARGS`` run from ``cwd``; asserts success and that ``cwd`` is untouched."""
    env = {
        **os.environ,
        "BASTION_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("BASTION_TRAIN_CACHE", None)  # the dequantized base goes into the home
    env.pop("BASTION_EMBEDDER_EXPORT_IN_CHILD", None)  # the CLI's own way: in process
    before = _snapshot(cwd)
    proc = subprocess.run(
        [str(BIN / "bastion"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (args, proc.stderr[-3000:])
    assert _snapshot(cwd) == before, (args, sorted(p.name for p in cwd.iterdir()))
    return proc.stdout


def test_indexing_and_the_first_int8_export_write_nothing_in_the_cwd(
    home: Path, readonly_cwd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = tmp_path / "docs"
    (docs / "notes").mkdir(parents=True)
    (docs / "lamp.txt").write_text("The keeper lit the lamp at dusk and wound the clockwork.\n")
    (docs / "notes" / "valve.md").write_text(
        "# Maintenance\n\nThe Zephyrion valve is torqued to exactly 42 newton metres.\n"
    )
    # Forced: the int8 path must run (a torch fallback would skip the export).
    monkeypatch.setenv("BASTION_EMBEDDER_BACKEND", "onnx-int8")
    assert not (home / "cache" / "embedders").exists()  # so the export runs now

    _bastion(home, readonly_cwd, "collections", "create", "docs")
    report = json.loads(
        _bastion(home, readonly_cwd, "collections", "add", "docs", str(docs), "--json")
    )

    assert report["indexed"] == 2 and report["failed"] == [], report
    (status,) = (home / "cache" / "embedders").glob("*/status.json")
    assert json.loads(status.read_text())["ok"]  # exported here, into the home's cache
    assert not list(status.parent.glob(".export-*"))  # its work folder is gone


def test_a_fine_tune_and_its_gguf_export_write_nothing_in_the_cwd(
    home: Path, readonly_cwd: Path, tmp_path: Path
) -> None:
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(chat_line(q, ANSWERS[i % 3]) + "\n" for i, q in enumerate(QUESTIONS)))

    args = ["--base", DEFAULT_MODEL, "--data", str(data), "--name", "tidy", "--max-steps", "1"]
    args += ["--max-length", "128", "--val-fraction", "0", "--json"]
    out = json.loads(_bastion(home, readonly_cwd, "finetune", *args))

    assert isinstance(out, dict)
    assert (home / "adapters" / "tidy" / "tidy.lora.gguf").is_file()
