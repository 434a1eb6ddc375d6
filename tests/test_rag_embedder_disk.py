"""The int8 export on a full disk: a clear message, nothing remembered, done once there is room.

The disk is a real one: a small tmpfs mounted in a private mount namespace (``unshare``), so
that ONNX's own writers (torch's exporter, the quantizer's C++ shape inference) meet a real
ENOSPC. A full disk once left a truncated copy that failed to parse ("Wire format was
corrupt"), and that failure was remembered as the model's for good.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_embedder import tiny_model

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the namespace, with the tmpfs mounted on argv[2]; prints one JSON line.
SCRIPT = """
import json, logging, sys
from pathlib import Path
from engine.errors import OperationFailed
from engine.rag.embedder import cache as export_cache, clear_embedder_cache, get_embedder
from engine.rag.embedder.cache import STATUS_FILE

model, disk = sys.argv[1], Path(sys.argv[2])
store = disk / "cache"
filler = disk / "filler"
filler.write_bytes(b"x" * int(sys.argv[3]))  # what is left is too little for the export
seen = {}

def attempt(backend):
    clear_embedder_cache()
    try:
        return get_embedder(model, cache_dir=store, backend=backend).backend
    except OperationFailed as exc:
        return "failed: " + str(exc)

def remembered():
    return sorted(p.name for p in store.rglob("*") if p.is_file())

seen["forced"] = attempt("onnx-int8")
seen["forced_files"] = remembered()
seen["auto"] = attempt("auto")
seen["auto_files"] = remembered()
# The room check passes, the export then runs out of room half way.
export_cache.EXPORT_ROOM_FACTOR, spare = 1, export_cache.EXPORT_ROOM_SPARE
export_cache.EXPORT_ROOM_SPARE = 0
seen["midway"] = attempt("onnx-int8")
seen["midway_files"] = remembered()
export_cache.EXPORT_ROOM_FACTOR, export_cache.EXPORT_ROOM_SPARE = 3, spare
filler.unlink()  # room again
seen["after"] = attempt("onnx-int8")
status = next(store.rglob(STATUS_FILE), None)
seen["status"] = json.loads(status.read_text()) if status else None
print(json.dumps(seen))
"""

DISK_MB = 40
# Leaves 6 MB: under the room check's 28 MB for the 4 MB tiny model, over its weights
# alone, and under the ~8 MB its export really writes.
FILLER_MB = 34


def _in_a_small_disk(model: Path, mount: Path) -> subprocess.CompletedProcess[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux's unshare is not installed")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    shell = (
        f'mount -t tmpfs -o size={DISK_MB}m tmpfs "$2" && '
        f'exec "$1" -c "$3" "$4" "$2" {FILLER_MB * 2**20}'
    )
    return subprocess.run(
        [unshare, "-rm", "sh", "-c", shell, "sh", sys.executable, str(mount), SCRIPT, str(model)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_a_full_disk_is_reported_forgotten_and_the_export_done_once_there_is_room(
    tmp_path: Path,
) -> None:
    model = tiny_model(tmp_path / "tiny")
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = _in_a_small_disk(model, mount)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])

    # Asked for by name: one clear line that says what is missing, and nothing written.
    assert seen["forced"].startswith("failed: ") and "MB free" in seen["forced"], seen
    assert "needs about 28 MB" in seen["forced"] and "\n" not in seen["forced"]
    assert seen["forced_files"] == []
    # Chosen automatically: a torch backend serves, and no choice is recorded for good.
    assert seen["auto"] in ("torch-fp32", "torch-bf16"), seen
    assert seen["auto_files"] == []
    # Out of room half way: said so (not "the ONNX export failed"), and not remembered.
    assert seen["midway"].startswith("failed: "), seen
    assert "cannot write the int8 export" in seen["midway"], seen
    assert seen["midway_files"] == []
    # With room again, the next attempt exports and checks the model.
    assert seen["after"] == "onnx-int8", seen
    assert seen["status"]["ok"] is True
