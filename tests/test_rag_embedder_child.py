"""The desktop's way of loading the embedder: the one-time int8 export runs in a child."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Through the option the desktop sets (``Documents(..., embedder_export_in_child=True)``),
# so the test covers the way from the constructor to the export.
SCRIPT = (
    "import sys\n"
    "from pathlib import Path\n"
    "from engine.rag.service import Documents\n"
    "from engine.store.db import Database\n"
    "home = Path(sys.argv[1])\n"
    "documents = Documents(Database(home / 'bastion.db'), home, embedder_export_in_child=True)\n"
    "e = documents.embedder('all-minilm-l6-v2')\n"
    "vectors = e.encode(['the keeper lit the lamp'])\n"
    "print(e.backend, 'torch' in sys.modules, len(vectors[0]))\n"
)


def test_first_export_happens_in_a_child_and_torch_stays_out(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-2000:]
    backend, torch_loaded, dimension = out.stdout.split()[-3:]
    assert backend == "onnx-int8" and torch_loaded == "False" and dimension == "384"
    cache = tmp_path / "cache" / "embedders"
    assert list(cache.glob("*/*.onnx")), "the child left the export in the cache"
    assert (cache / "backend-choice.json").is_file(), "the child measured the backends"
