"""Sentence embeddings for retrieval: the fastest backend that is faithful to fp32 on this machine.

The backend is measured once per machine and model (``choice``): int8 ONNX Runtime, torch
bf16 where the CPU has bf16 in hardware, torch fp32. What follows is about the int8 path.

Measured on a 2-core AVX-512 VNNI machine with all-MiniLM-L6-v2 (texts of ~120 word
pieces, batches of 64): sentence-transformers fp32 38 texts/s, ONNX Runtime fp32 47/s,
ONNX Runtime dynamic int8 with per-channel weights 88/s at a minimum cosine of 0.991 to
fp32. Per-tensor int8 was faster (103/s) but fell to 0.92 cosine, so it is not used.
Exporting with eager attention gives ORT a simpler graph than SDPA (about 1.3x faster
after quantization); ORT's transformer fusions made the int8 model slower, so none are
applied.

Dynamic int8 quantizes activations with one scale per batch, so the error grows as texts
get shorter: one- or two-word texts fell to 0.965 cosine while texts of 16+ words stayed
above 0.985. Texts of at most ``SHORT_TOKENS`` tokens (queries, mostly; a few
milliseconds each) therefore run in the fp32 ONNX model, and only longer ones (the
chunks being indexed) in int8. Both models are exported once per model and recipe into
the cache folder, checked against sentence-transformers fp32 on a probe set, and reused
by every later process; a model that fails the check (or cannot be exported) runs in
torch fp32. ``bench/bench_embedding.py``: 4,000 chunks of ~190 word pieces embedded and
indexed 2.5x faster than sentence-transformers fp32 + IndexFlatIP, recall@1/@5 equal
within noise.

The package: ``layout`` (what an id names on disk, content keys), ``model`` (the loaded
``Embedder``), ``choice`` (measuring the backends), ``loader`` (one embedder per model and
backend),
``torch_backend``, ``onnx_backend`` (the int8 path and its quality check), ``cache`` (the
exports on disk) and ``export`` (ONNX export and quantization). Importing it loads no
numpy, torch or ONNX Runtime: the backends are imported when a model is loaded.
"""

from __future__ import annotations

from engine.rag.embedder.layout import DEFAULT_EMBEDDER, embedder_key, resolve_embedder
from engine.rag.embedder.loader import (
    BACKEND_ENV,
    clear_embedder_cache,
    get_embedder,
    recorded_backend,
)
from engine.rag.embedder.model import BACKENDS, ONNX_INT8, TORCH_BF16, TORCH_FP32, Embedder

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "DEFAULT_EMBEDDER",
    "ONNX_INT8",
    "TORCH_BF16",
    "TORCH_FP32",
    "Embedder",
    "clear_embedder_cache",
    "embedder_key",
    "get_embedder",
    "recorded_backend",
    "resolve_embedder",
]
