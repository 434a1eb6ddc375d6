"""Loading embedders: the choice of backend, and one loaded embedder per model and backend."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import InvalidInput, OperationFailed
from engine.rag.embedder.cache import NoOnnx, default_cache_dir
from engine.rag.embedder.layout import (
    DEFAULT_EMBEDDER,
    folder_key,
    forget_keys,
    read_layout,
    resolve_embedder,
)
from engine.rag.embedder.model import BACKENDS, ONNX_INT8, TORCH_BF16, TORCH_FP32, Embedder

if TYPE_CHECKING:
    from engine.rag.embedder.choice import BackendChoice

log = logging.getLogger(__name__)

BACKEND_ENV = "BASTION_EMBEDDER_BACKEND"

# Loaded embedders by (model id, content key, backend): a model replaced in its folder is
# loaded afresh by a long-running process (the app, the server), not served from memory.
_CACHE: dict[tuple[str, str, str], Embedder] = {}
_LOCK = threading.Lock()
_MEASURING = threading.Lock()  # one measurement at a time in a process


def get_embedder(
    model_id: str = DEFAULT_EMBEDDER,
    cache_dir: Path | None = None,
    backend: str = "auto",
    *,
    export_in_child: bool = False,
) -> Embedder:
    """The embedder for ``model_id``, loaded once per process and backend.

    ``auto`` runs the backend measured fastest among the faithful ones on this machine
    (``choice``: int8 ONNX where the folder is a plain Transformer + Pooling model and its
    export passes the quality check, torch bf16 on CPUs with bf16 in hardware, torch fp32),
    measured the first time and recorded in ``cache_dir``. ``$BASTION_EMBEDDER_BACKEND``
    forces one when ``backend`` is ``auto``; an explicit ``backend`` argument wins over it.

    Args:
        model_id: ``all-minilm-l6-v2`` or the path of a local sentence-transformers folder.
        cache_dir: where int8 exports are kept (the engine passes ``<home>/cache/embedders``);
            None means the user cache dir.
        backend: ``auto`` or one of ``BACKENDS``.
        export_in_child: run the one-time measurement and int8 export in a child
            process, so that this process never imports torch for them. The desktop app
            asks for this: next to a running Qt event loop the export has crashed the
            process (a segfault inside ``import torch`` on the worker thread) and
            stalled the window.

    Raises:
        NotFound: no such embedder id or folder.
        InvalidInput: the folder is not a usable sentence-transformers model, or a bad backend.
        OperationFailed: ``onnx-int8`` was forced and cannot run.
    """
    requested = backend
    if requested == "auto":
        requested = os.environ.get(BACKEND_ENV, "").strip() or "auto"
        if requested not in (*BACKENDS, "auto"):
            raise InvalidInput(
                f"{BACKEND_ENV}={requested!r} is not a backend", hint=f"use one of {BACKENDS}"
            )
    elif requested not in BACKENDS:
        raise InvalidInput(f"unknown embedder backend {backend!r}", hint=f"use one of {BACKENDS}")
    folder = resolve_embedder(model_id)
    key = folder_key(folder)
    with _LOCK:
        cached = _CACHE.get((model_id, key, requested))
        if cached is not None:
            return cached
        for stale in [k for k in _CACHE if k[0] == model_id and k[1] != key]:
            del _CACHE[stale]  # the model in that folder was replaced
        embedder = _load(
            model_id, folder, requested, cache_dir or default_cache_dir(), export_in_child
        )
        _CACHE[(model_id, key, requested)] = embedder
        _CACHE.setdefault((model_id, key, embedder.backend), embedder)
        return embedder


def clear_embedder_cache() -> None:
    """Forget every loaded embedder (frees their memory once no caller holds them)."""
    with _LOCK:
        _CACHE.clear()
    forget_keys()


def _load(
    model_id: str, folder: Path, requested: str, cache_dir: Path, export_in_child: bool
) -> Embedder:
    # The backends import numpy (and, when they run, torch or ONNX Runtime): only here.
    from engine.rag.embedder.onnx_backend import onnx_embedder
    from engine.rag.embedder.torch_backend import torch_embedder

    layout = read_layout(folder)
    if not export_in_child and torch_unsafe_here():
        # As in the desktop: measuring and the int8 export go to a child, torch stays out.
        log.info("a CUDA build of llama.cpp is loaded: the embedder keeps torch out of it")
        export_in_child = True

    def load(backend: str, forced: bool = True) -> Embedder:
        if backend != ONNX_INT8 and torch_unsafe_here():
            raise OperationFailed(
                f"the embedder {model_id} cannot run as {backend} in this process: a CUDA "
                "build of llama.cpp is loaded in it, and importing torch after that crashes",
                hint=f"use {ONNX_INT8} ({BACKEND_ENV}={ONNX_INT8})",
            )
        if backend == ONNX_INT8:
            return onnx_embedder(
                model_id,
                folder,
                layout,
                cache_dir,
                forced=forced,
                export_in_child=export_in_child,
            )
        return torch_embedder(model_id, folder, layout, backend)

    backend = requested
    if requested == "auto":
        backend = choose_backend(
            model_id, folder, cache_dir, lambda b: load(b, False), in_child=export_in_child
        )
    try:
        return load(backend, forced=requested != "auto")
    except NoOnnx as exc:
        if requested == ONNX_INT8:
            raise OperationFailed(
                f"the embedder {model_id} cannot run as {ONNX_INT8}: {exc}",
                hint=f"unset {BACKEND_ENV} to fall back to {TORCH_FP32}",
            ) from exc
        log.warning("embedder %s runs in %s: %s", model_id, TORCH_FP32, exc)
    return load(TORCH_FP32)


def choice_key(folder: Path) -> str:
    """The key of ``folder``'s recorded backend on this machine (``choice.machine_key``)."""
    from engine.rag.embedder.choice import machine_key

    return machine_key(folder_key(folder))


def recorded_backend(model_id: str, cache_dir: Path) -> BackendChoice | None:
    """The backend recorded for ``model_id`` on this machine, or None (not measured yet)."""
    from engine.rag.embedder.choice import read_choice

    return read_choice(cache_dir, choice_key(resolve_embedder(model_id)))


def choose_backend(
    model_id: str,
    folder: Path,
    cache_dir: Path,
    load: Callable[[str], Embedder],
    *,
    in_child: bool = False,
) -> str:
    """The recorded backend of this machine and model, measured and recorded the first time.

    ``in_child``: measure in a child process (it loads torch; see ``get_embedder``), and
    keep torch out of this process where int8 is faithful, even if a torch backend
    measured faster (the desktop app: ``import torch`` on a worker thread beside the Qt
    event loop has crashed it). If the child records nothing, int8 is tried.
    """
    from engine.rag.embedder.choice import (
        cpu_flags,
        has_fast_bf16,
        measure,
        read_choice,
        record_choice,
    )

    key = choice_key(folder)
    recorded = read_choice(cache_dir, key)
    if recorded is None and in_child and not _cuda_available():
        from engine.rag.embedder.onnx_backend import measure_in_child

        measure_in_child(model_id, cache_dir)
        recorded = read_choice(cache_dir, key)
        if recorded is None:
            return ONNX_INT8
    if recorded is not None:
        int8_ok = any(t.backend == ONNX_INT8 and t.ok for t in recorded.trials)
        if in_child and recorded.backend != ONNX_INT8 and int8_ok:
            return ONNX_INT8
        return recorded.backend
    if _cuda_available():
        return TORCH_FP32  # torch runs on the GPU, far ahead of any CPU backend
    candidates = [ONNX_INT8, *([TORCH_BF16] if has_fast_bf16(cpu_flags()) else [])]
    with _MEASURING:
        recorded = read_choice(cache_dir, key)  # another thread measured meanwhile
        if recorded is not None:
            return recorded.backend
        choice = measure(model_id, candidates, load)
        if any(t.again for t in choice.trials):
            log.info("embedder %s: not recorded, measured again by a later process", model_id)
        else:
            record_choice(cache_dir, key, choice)
    log.info("embedder %s: chose %s on this machine", model_id, choice.summary())
    return choice.backend


def torch_unsafe_here() -> bool:
    """Whether importing torch could crash this process: a CUDA build of llama.cpp is
    loaded in it and torch is not yet.

    On an NVIDIA machine (bench/results/gpu.md) ``import llama_cpp; import torch`` died with
    SIGSEGV inside ``import torch``: llama.cpp's CUDA libraries (the toolkit's, the system's
    NCCL) were loaded first and torch's own did not fit beside them. The other order works
    (the training worker imports torch first). Seen in this process's memory map (Linux).
    """
    if "torch" in sys.modules or "llama_cpp" not in sys.modules:
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libggml-cuda" in line for line in maps)
    except OSError:
        return False


def _cuda_available() -> bool:
    """True when torch can use an NVIDIA GPU, where fp32 torch beats CPU int8 by far.

    Checked without importing torch (a second and ~200 MB) on machines with no NVIDIA driver,
    nor where importing it could crash the process (``torch_unsafe_here``).
    """
    if not (Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi")):
        return False
    if torch_unsafe_here():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
