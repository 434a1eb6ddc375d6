"""The desktop's way of loading the embedder: the one-time int8 export runs in a child."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = (
    "import os, sys\n"
    "os.environ['BASTION_EMBEDDER_EXPORT_IN_CHILD'] = '1'\n"
    "from pathlib import Path\n"
    "from engine.rag.embedder import get_embedder\n"
    "e = get_embedder('all-minilm-l6-v2', cache_dir=Path(sys.argv[1]))\n"
    "vectors = e.encode(['the keeper lit the lamp'])\n"
    "print(e.backend, 'torch' in sys.modules, len(vectors[0]))\n"
)


def test_first_export_happens_in_a_child_and_torch_stays_out(tmp_path: Path) -> None:
    cache = tmp_path / "embedders"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache)], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-2000:]
    backend, torch_loaded, dimension = out.stdout.split()[-3:]
    assert backend == "onnx-int8" and torch_loaded == "False" and dimension == "384"
    assert list(cache.glob("*/*.onnx")), "the child left the export in the cache"
