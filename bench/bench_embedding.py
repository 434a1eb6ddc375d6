"""Embedding + indexing throughput and retrieval quality: Bastion's embedder against plain fp32.

    .venv/bin/python bench/bench_embedding.py [--chunks 1000 | --full] [--queries 200]

Corpus: English prose paragraphs from the Python documentation topics and the docstrings
of the standard library and installed packages, cut into chunks of 130 words (~190 word
pieces: the size Bastion's chunker produces, at most ~200). ``--full`` makes 4,000
chunks (520,000 words, over 1,000 pages); the default 1,000 keeps the run near two
minutes on 2 cores.

* baseline: ``SentenceTransformer(all-MiniLM-L6-v2)`` fp32 ``encode(batch_size=64)`` and
  ``faiss.IndexFlatIP.add`` per batch;
* ours: ``get_embedder()`` (auto backend) ``encode(batch_size=64)`` and ``VectorIndex``.

Both sides get the same texts in segments of 256, alternating, so that a change in
machine load hits both alike; the one-off int8 export (into a fresh cache folder) is
timed separately. Quality: for ``--queries`` chunks, a query is made from one of the
chunk's sentences with a third of its words dropped; recall@1/@5 of finding that chunk
among all of them is measured for both sides and should agree within noise. Also
printed: the cosine between each chunk's two vectors. Results, with the date and machine,
are appended to ``bench/results/embedding.md``. Goal: ours >= 2x baseline texts/s.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from benchlib import append_report, machine  # noqa: E402 -- after the path is set

CHUNK_WORDS = 130
SEGMENT = 256


def prose_paragraphs(roots: list[Path], limit_words: int) -> list[str]:
    """Prose paragraphs of docstrings under ``roots``, in a fixed order.

    A paragraph counts as prose when nearly all its tokens are plain words, so that
    code samples and tables (three word pieces per "word") do not skew the chunk length.
    """
    found: list[str] = []
    total = 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if any(part in ("test", "tests", "idlelib") for part in path.parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if not isinstance(
                    node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
                ):
                    continue
                for paragraph in (ast.get_docstring(node) or "").split("\n\n"):
                    words = paragraph.split()
                    plain = sum(w.strip(".,;:()'\"").isalpha() for w in words)
                    if len(words) >= 20 and plain >= 0.9 * len(words):
                        found.append(" ".join(words))
                        total += len(words)
            if total >= limit_words:
                return found
    return found


def corpus(chunks: int) -> list[str]:
    """``chunks`` texts of ``CHUNK_WORDS`` words, packed from prose paragraphs."""
    import pydoc_data.topics

    needed = chunks * CHUNK_WORDS
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    topics = [
        " ".join(p.split()) for t in pydoc_data.topics.topics.values() for p in t.split("\n\n")
    ]
    texts = [p for p in topics if len(p.split()) >= 20] + prose_paragraphs(roots, needed)
    words = [w for text in texts for w in text.split()]
    if len(words) < needed:
        raise SystemExit(f"only {len(words)} words of prose found, {needed} needed")
    step = len(words) // chunks  # spread the chunks over everything that was found
    return [" ".join(words[i * step : i * step + CHUNK_WORDS]) for i in range(chunks)]


def make_queries(chunks: list[str], count: int) -> list[tuple[str, int]]:
    """(query, index of its chunk): one sentence-like span per chunk, a third dropped."""
    rng = random.Random(7)
    picks = rng.sample(range(len(chunks)), min(count, len(chunks)))
    queries = []
    for i in picks:
        words = chunks[i].split()
        start = rng.randrange(0, max(1, len(words) - 18))
        span = words[start : start + 18]
        kept = [w for w in span if rng.random() > 1 / 3]
        queries.append((" ".join(kept or span), i))
    return queries


def recall_at(scores: np.ndarray, targets: list[int], k: int) -> float:
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([t in row for row, t in zip(top, targets, strict=True)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--full", action="store_true", help="4,000 chunks")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--no-save", action="store_true", help="print only, append nothing")
    args = parser.parse_args()
    n_chunks = 4000 if args.full else args.chunks
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import faiss
    import psutil
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    from engine.rag.embedder import get_embedder, resolve_embedder
    from engine.rag.vector_index import VectorIndex

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    print(f"machine: {machine()}", file=sys.stderr)
    texts = corpus(n_chunks)
    print(f"corpus: {len(texts)} chunks of {CHUNK_WORDS} words", file=sys.stderr)

    folder = resolve_embedder("all-minilm-l6-v2")
    baseline_model = SentenceTransformer(str(folder), device="cpu")
    cache = Path(tempfile.mkdtemp(prefix="bastion-bench-embedders-"))
    start = time.perf_counter()
    ours = get_embedder(cache_dir=cache)
    load_seconds = time.perf_counter() - start
    tokens = ours.count_tokens(texts)
    print(f"ours: backend {ours.backend}, first load {load_seconds:.1f}s", file=sys.stderr)

    dim = ours.dimension
    baseline_index = faiss.IndexFlatIP(dim)
    base_vectors = np.zeros((len(texts), dim), dtype=np.float32)
    our_vectors = np.zeros((len(texts), dim), dtype=np.float32)
    base_seconds = our_seconds = 0.0
    baseline_model.encode(texts[:64], batch_size=64)  # warm-up, both sides
    ours.encode(texts[:64], batch_size=64)
    for s in range(0, len(texts), SEGMENT):
        part = texts[s : s + SEGMENT]
        start = time.perf_counter()
        for b in range(0, len(part), 64):
            vecs = baseline_model.encode(part[b : b + 64], batch_size=64, normalize_embeddings=True)
            baseline_index.add(vecs)
            base_vectors[s + b : s + b + len(vecs)] = vecs
        base_seconds += time.perf_counter() - start
        start = time.perf_counter()
        our_vectors[s : s + len(part)] = ours.encode(part, batch_size=64)
        our_seconds += time.perf_counter() - start
        print(f"  {s + len(part)}/{len(texts)}", file=sys.stderr)
    start = time.perf_counter()
    index = VectorIndex.build(np.arange(len(texts), dtype=np.int64), our_vectors, dim)
    our_seconds += time.perf_counter() - start
    base_rate = len(texts) / base_seconds
    our_rate = len(texts) / our_seconds

    cosines = np.sum(base_vectors * our_vectors, axis=1)
    queries = make_queries(texts, args.queries)
    targets = [t for _, t in queries]
    q_texts = [q for q, _ in queries]
    base_q = baseline_model.encode(q_texts, batch_size=64, normalize_embeddings=True)
    our_q = ours.encode(q_texts)
    base_scores = base_q @ base_vectors.T
    our_hits = index.search_batch(our_q, 5)
    our_r1 = float(np.mean([h[0][0] == t for h, t in zip(our_hits, targets, strict=True)]))
    our_r5 = float(
        np.mean([t in [i for i, _ in h] for h, t in zip(our_hits, targets, strict=True)])
    )
    base_r1 = recall_at(base_scores, targets, 1)
    base_r5 = recall_at(base_scores, targets, 5)
    # One binomial standard error at the baseline's recall: differences below ~2 are noise.
    se1 = math.sqrt(max(base_r1 * (1 - base_r1), 1e-9) / len(queries))
    se5 = math.sqrt(max(base_r5 * (1 - base_r5), 1e-9) / len(queries))

    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rss = psutil.Process().memory_info().rss / 2**20
    report = "\n".join(
        [
            f"### {stamp}",
            "",
            f"Machine: {machine()}  ",
            f"Corpus: {len(texts)} chunks of {CHUNK_WORDS} words "
            f"(mean {np.mean(tokens):.0f} word pieces, cut at {ours.max_tokens}); "
            f"batch 64; {len(queries)} queries. Ours: backend `{ours.backend}`, "
            f"first load with int8 export {load_seconds:.1f} s (once per model). "
            f"Process RSS at the end {rss:.0f} MiB.",
            "",
            "| measure | baseline: sentence-transformers fp32 + IndexFlatIP | ours | ratio |",
            "|---|---|---|---|",
            f"| embed + index, texts/s | {base_rate:.1f} | {our_rate:.1f} "
            f"| {our_rate / base_rate:.2f}x |",
            f"| time for {len(texts)} chunks | {base_seconds:.1f} s | {our_seconds:.1f} s "
            f"| {base_seconds / our_seconds:.2f}x |",
            f"| recall@1 | {base_r1:.3f} | {our_r1:.3f} | {our_r1 - base_r1:+.3f} "
            f"(1 s.e. {se1:.3f}) |",
            f"| recall@5 | {base_r5:.3f} | {our_r5:.3f} | {our_r5 - base_r5:+.3f} "
            f"(1 s.e. {se5:.3f}) |",
            f"| cosine ours vs fp32, min / mean | 1 | {cosines.min():.4f} / {cosines.mean():.4f} "
            "| |",
            "",
        ]
    )
    print(report)
    shutil.rmtree(cache, ignore_errors=True)
    if not args.no_save:
        append_report("embedding", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
