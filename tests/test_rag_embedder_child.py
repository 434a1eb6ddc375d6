"""Processes that must not import torch: the int8 export and the measurement run in a child.

Two ways in: the option the desktop sets (``Documents(..., embedder_export_in_child=True)``;
next to Qt's event loop, ``import torch`` has crashed the app), and a process that has a
CUDA build of llama.cpp loaded (``import torch`` after it crashed on an NVIDIA machine).
There is no CUDA build here, so that second process says it has one
(``loader.torch_unsafe_here`` answers yes); everything after that is the real code path,
from the ``Documents`` constructor to the export.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = (
    "import sys\n"
    "from pathlib import Path\n"
    "from engine.rag.embedder import loader\n"
    "from engine.rag.service import Documents\n"
    "from engine.store.db import Database\n"
    "home, way = Path(sys.argv[1]), sys.argv[2]\n"
    "if way == 'cuda-llama':\n"
    "    loader.torch_unsafe_here = lambda: 'torch' not in sys.modules\n"
    "documents = Documents(Database(home / 'bastion.db'), home,\n"
    "                      embedder_export_in_child=way == 'desktop')\n"
    "e = documents.embedder('all-minilm-l6-v2')\n"
    "vectors = e.encode(['the keeper lit the lamp'])\n"
    "print(e.backend, 'torch' in sys.modules, len(vectors[0]))\n"
)


@pytest.mark.parametrize("way", ["desktop", "cuda-llama"])
def test_first_export_happens_in_a_child_and_torch_stays_out(tmp_path: Path, way: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), way],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    backend, torch_loaded, dimension = out.stdout.split()[-3:]
    assert backend == "onnx-int8" and torch_loaded == "False" and dimension == "384"
    cache = tmp_path / "cache" / "embedders"
    assert list(cache.glob("*/*.onnx")), "the child left the export in the cache"
    assert (cache / "backend-choice.json").is_file(), "the child measured the backends"


def test_a_torch_backend_is_refused_with_a_reason_where_torch_would_crash(
    tmp_path: Path,
) -> None:
    script = (
        "import sys\n"
        "from engine.errors import OperationFailed\n"
        "from engine.rag.embedder import loader\n"
        "loader.torch_unsafe_here = lambda: 'torch' not in sys.modules\n"
        "cache = __import__('pathlib').Path(sys.argv[1])\n"
        "try:\n"
        "    loader.get_embedder('all-minilm-l6-v2', cache_dir=cache, backend='torch-fp32')\n"
        "except OperationFailed as exc:\n"
        "    print('refused', 'torch' in sys.modules, exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused False "), out.stdout
    assert "CUDA build of llama.cpp" in out.stdout


def test_the_memory_map_tells_a_cuda_llama_from_a_cpu_one() -> None:
    # A real process with the installed llama.cpp loaded: unsafe only if that is a CUDA build.
    script = (
        "import llama_cpp\n"
        "from engine.rag.embedder.loader import torch_unsafe_here\n"
        "print(torch_unsafe_here())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin is not None
    libs = [p.name for p in (Path(spec.origin).parent / "lib").iterdir()]
    cuda = any("libggml-cuda" in name for name in libs)
    assert out.returncode == 0 and out.stdout.strip() == str(cuda), out.stderr[-2000:]
