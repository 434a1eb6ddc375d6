"""The int8 ONNX Runtime backend: the cached export, its quality check, and its sessions."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from engine.rag.embedder.cache import (
    FP32_FILE,
    INT8_FILE,
    NoOnnx,
    cached_export,
    export_pending,
    forget_export,
)
from engine.rag.embedder.layout import Layout
from engine.rag.embedder.model import ONNX_INT8, Embedder
from engine.rag.embedder.torch_backend import torch_embedder

log = logging.getLogger(__name__)

# The int8 model must point the same way as fp32 on every probe sentence. 0.98 keeps
# retrieval rankings unchanged in practice; per-tensor quantization (0.92) visibly did not.
MIN_PROBE_COSINE = 0.98
# Batches of texts up to this many tokens (special tokens included) run in fp32.
SHORT_TOKENS = 16

# Varied on purpose (short, long, numbers, code, other languages, odd punctuation): the
# quantization check should see the kinds of text users index.
PROBE_SENTENCES = (
    "The cat sat on the mat.",
    "Quarterly revenue grew 12% to $4.3 billion, driven by cloud services.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "def add(a, b):\n    return a + b",
    "Der Vertrag kann mit einer Frist von drei Monaten gekündigt werden.",
    "Le rapport annuel sera publié en mars prochain.",
    "ERROR 2024-03-01 12:00:03 connection refused (errno 111) at 10.0.0.7:5432",
    "Patients receiving 5 mg/kg twice daily showed no adverse events after 14 days.",
    "The tenant shall keep the premises in good repair and return them at the end of the "
    "lease in the same condition, fair wear and tear excepted.",
    "Mix the flour, sugar and butter, then bake for 25 minutes at 180 °C.",
    "Section 4.2 — Limitation of liability; see also Appendix B.",
    "ok",
    "In 1969 Apollo 11 landed on the Moon, and Neil Armstrong became the first person to "
    "walk on its surface while millions watched the grainy broadcast at home.",
    "Gradient descent updates parameters in the direction that reduces the loss.",
    "東京は日本の首都です。",
)

# The export in a child process (``export_in_child``): its outcome is read from the cache.
_CHILD_EXPORT = (
    "import sys\n"
    "from pathlib import Path\n"
    "from engine.privacy import guard\n"
    "guard.activate()\n"
    "from engine.rag.embedder import get_embedder\n"
    "get_embedder(sys.argv[1], cache_dir=Path(sys.argv[2]), backend=sys.argv[3])\n"
)


def measure_in_child(model_id: str, cache_dir: Path) -> None:
    """Measure the backends (and export int8) in a child process; the record is read after."""
    _export_in_child(model_id, cache_dir, "auto")


def _export_in_child(model_id: str, cache_dir: Path, backend: str = ONNX_INT8) -> None:
    """Run the int8 export in a child process; its outcome is read from the cache after."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _CHILD_EXPORT, model_id, str(cache_dir), backend],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning("embedder export in a child process failed: %s", tail)


def onnx_embedder(
    model_id: str,
    folder: Path,
    layout: Layout,
    cache_dir: Path,
    *,
    forced: bool,
    export_in_child: bool = False,
) -> Embedder:
    """The ``onnx-int8`` embedder of a folder, exported and checked into ``cache_dir`` once.

    Args:
        model_id: the id it was asked for.
        folder: its sentence-transformers folder.
        layout: what the folder holds (``layout.read_layout``).
        cache_dir: where exports are kept.
        forced: the caller asked for int8 by name: an export that failed the quality
            check is still used (with a warning) when its files exist.
        export_in_child: run a pending export in a child process (see ``get_embedder``).

    Raises:
        NoOnnx: the model cannot run as int8 here; the message says why.
    """
    if layout.pooling is None or layout.dimension is None:
        raise NoOnnx(layout.why_not_onnx or "its hidden size is unknown")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise NoOnnx("onnxruntime is not installed") from exc

    def reference(texts: list[str]) -> np.ndarray:
        return torch_embedder(model_id, folder, layout).encode(texts)

    def candidate(models: Path, texts: list[str]) -> np.ndarray:
        return _onnx_from_file(model_id, layout, models).encode(texts)

    if export_in_child and export_pending(folder, cache_dir):
        _export_in_child(model_id, cache_dir)
    target, status = cached_export(
        model_id,
        folder,
        layout.transformer_dir,
        cache_dir,
        reference=reference,
        candidate=candidate,
        probe=PROBE_SENTENCES,
        min_cosine=MIN_PROBE_COSINE,
    )
    model_file = target / INT8_FILE
    if not status.get("ok"):
        if not forced or not model_file.is_file():
            raise NoOnnx(str(status.get("reason", "the int8 export failed")))
        log.warning("embedder %s: %s forced despite: %s", model_id, ONNX_INT8, status["reason"])
    try:
        return _onnx_from_file(model_id, layout, target)
    except Exception as exc:  # a damaged cache file: export again next time
        forget_export(target)
        raise NoOnnx(f"the cached int8 model {model_file} cannot be loaded: {exc}") from exc


def onnx_session(model_file: Path) -> Any:
    """An ONNX Runtime session on the CPU, one thread per physical core, its notices off."""
    import onnxruntime as ort
    import psutil

    options = ort.SessionOptions()
    options.intra_op_num_threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # ORT's own notices would go to stderr, not our log
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def run_padded(session: Any, encodings: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """One batch of tokenizer ``encodings`` through a BERT-like ``session``, padded to the
    longest: its first output and the attention mask."""
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = enc.ids
        types[row, : len(enc.ids)] = enc.type_ids
        mask[row, : len(enc.ids)] = 1
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    inputs = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feed.items() if k in inputs})[0], mask


def pooled(session: Any, encodings: list[Any], pooling: str | None) -> np.ndarray:
    """``run_padded``'s hidden states pooled by ``pooling`` ("cls", else the mean over real
    tokens); not normalised."""
    hidden, mask = run_padded(session, encodings)
    if pooling == "cls":
        return np.asarray(hidden[:, 0], dtype=np.float32)
    weights = mask[:, :, None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    return np.asarray(summed / np.maximum(weights.sum(axis=1), 1e-9), dtype=np.float32)


def _onnx_from_file(model_id: str, layout: Layout, models: Path) -> Embedder:
    """The onnx-int8 embedder over ``models/model-int8.onnx`` and ``models/model-fp32.onnx``."""
    from tokenizers import Tokenizer

    # The real folder: the fp32 model is opened later, when a link to the cache (or a
    # folder holding that link) may be gone.
    models = models.resolve()
    int8 = onnx_session(models / INT8_FILE)
    fp32: list[Any] = []  # loaded at the first short batch: indexing-only runs never need it
    fp32_lock = threading.Lock()
    tokenizer_file = str(layout.transformer_dir / "tokenizer.json")
    counter = Tokenizer.from_file(tokenizer_file)
    counter.no_truncation()
    counter.no_padding()
    tokenizer = Tokenizer.from_file(tokenizer_file)
    # tokenizer.json often carries a fixed padding of 128 and its own truncation; the
    # model's max_seq_length and padding to the longest text of the batch are what
    # sentence-transformers uses.
    tokenizer.no_padding()
    tokenizer.enable_truncation(layout.max_tokens)

    def encode_batch(texts: list[str]) -> np.ndarray:
        if layout.lowercase:
            texts = [t.lower() for t in texts]
        encodings = tokenizer.encode_batch_fast(texts)
        short = [i for i, e in enumerate(encodings) if len(e.ids) <= SHORT_TOKENS]
        out = np.empty((len(texts), int(layout.dimension or 0)), dtype=np.float32)
        if short:
            with fp32_lock:
                if not fp32:
                    fp32.append(onnx_session(models / FP32_FILE))
            out[short] = pooled(fp32[0], [encodings[i] for i in short], layout.pooling)
        if len(short) < len(texts):
            long = sorted(set(range(len(texts))) - set(short))
            out[long] = pooled(int8, [encodings[i] for i in long], layout.pooling)
        return out

    return Embedder(
        model_id=model_id,
        dimension=int(layout.dimension or 0),
        max_tokens=layout.max_tokens,
        backend=ONNX_INT8,
        encode_batch=encode_batch,
        counter=counter,
        lowercase=layout.lowercase,
    )
