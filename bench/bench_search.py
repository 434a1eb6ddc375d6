"""Vector search latency, memory and build time: exact against approximate, same data, same run.

    .venv/bin/python bench/bench_search.py [--sizes 10000,50000,100000,1000000] [--queries 200]

For each size, clustered unit vectors of dimension 384 (topics > sub-topics > points, the
way text embeddings group) are indexed twice through ``engine.rag.vector_index``:

* baseline: the exact kind, ``IndexIDMap2(IndexFlatIP)``;
* ours: the approximate kind, IVF-SQ8 with ``nprobe`` calibrated at build.

Measured: build time, index bytes per vector (serialized size, which is what it holds in
memory) and the process's RSS growth during the build, single-query latency p50/p95 of
``VectorIndex.search(k=10)`` over queries that are perturbed copies of stored vectors,
and recall@10 of the approximate index against the exact one. Ratios are exact/approximate.
The table, with the date and machine, is printed and appended to
``bench/results/search.md``. Goal: p95 < 50 ms at 1M vectors with recall@10 >= 0.95.
A full run with 1M takes ~5-8 minutes on 2 cores and ~5 GB of memory.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from benchlib import append_report, machine  # noqa: E402 -- after the path is set

DIMENSION = 384


def clustered_vectors(n: int, seed: int = 0, dimension: int = DIMENSION) -> np.ndarray:
    """Unit vectors in topics (n/10k) > sub-topics (n/200) > points, like text embeddings."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((max(4, n // 10_000), dimension), dtype=np.float32)
    n_sub = max(10, n // 200)
    subtopics = topics[rng.integers(0, len(topics), n_sub)]
    subtopics += 0.8 * rng.standard_normal(subtopics.shape, dtype=np.float32)
    out = np.empty((n, dimension), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        part = subtopics[rng.integers(0, n_sub, m)]
        part += 1.2 * rng.standard_normal((m, dimension), dtype=np.float32)
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        out[start : start + m] = part
    return out


def perturbed_queries(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Copies of random stored vectors with noise of norm 0.6 (cosine ~0.85 to the original)."""
    rng = np.random.default_rng(seed)
    queries = vectors[rng.integers(0, len(vectors), count)].copy()
    noise = rng.standard_normal(queries.shape, dtype=np.float32)
    noise *= 0.6 / np.linalg.norm(noise, axis=1, keepdims=True)
    queries += noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def measure(index: object, queries: np.ndarray) -> tuple[list[float], list[list[int]]]:
    """Per-query latency (seconds) and found ids of single-query k=10 searches."""
    search = index.search  # type: ignore[attr-defined]
    search(queries[0], 10)  # warm-up
    times, found = [], []
    for query in queries:
        start = time.perf_counter()
        hits = search(query, 10)
        times.append(time.perf_counter() - start)
        found.append([i for i, _ in hits])
    return times, found


def build_side(
    ids: np.ndarray, vectors: np.ndarray, threshold: int
) -> tuple[object, float, int, int]:
    """(index, build seconds, serialized bytes, RSS growth) of one kind."""
    import faiss

    from engine.rag.vector_index import VectorIndex

    gc.collect()
    before = rss()
    start = time.perf_counter()
    index = VectorIndex.build(ids, vectors, DIMENSION, approximate_threshold=threshold)
    seconds = time.perf_counter() - start
    grown = rss() - before
    size = len(faiss.serialize_index(index._index))
    return index, seconds, size, grown


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000,100000,1000000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--no-save", action="store_true", help="print only, append nothing")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from engine.rag.vector_index import APPROXIMATE_THRESHOLD

    print(f"machine: {machine()}", file=sys.stderr)
    rows = []
    for n in sizes:
        vectors = clustered_vectors(n)
        ids = np.arange(n, dtype=np.int64) + 1_000_000
        queries = perturbed_queries(vectors, args.queries)
        exact, e_build, e_bytes, e_rss = build_side(ids, vectors, threshold=n + 1)
        e_times, e_found = measure(exact, queries)
        del exact
        approx, a_build, a_bytes, a_rss = build_side(ids, vectors, threshold=0)
        a_times, a_found = measure(approx, queries)
        nprobe = approx.nprobe  # type: ignore[attr-defined]
        del approx
        recall = statistics.mean(
            len(set(a) & set(e)) / max(1, len(e)) for a, e in zip(a_found, e_found, strict=True)
        )
        print(
            f"n={n}: exact p95 {pct(e_times, 95):.2f} ms, ivf-sq8 p95 {pct(a_times, 95):.2f} ms "
            f"(nprobe {nprobe}), recall@10 {recall:.3f}, build {e_build:.2f}s vs {a_build:.1f}s",
            file=sys.stderr,
        )
        rows.append(
            f"| {n:,} | {pct(e_times, 50):.2f} / {pct(e_times, 95):.2f} ms "
            f"| {pct(a_times, 50):.2f} / {pct(a_times, 95):.2f} ms "
            f"| {pct(e_times, 95) / pct(a_times, 95):.1f}x | {recall:.3f} | {nprobe} "
            f"| {e_build:.2f} s / {a_build:.1f} s "
            f"| {e_bytes / n:.0f} B / {a_bytes / n:.0f} B "
            f"| {e_rss / 2**20:.0f} / {a_rss / 2**20:.0f} MiB |"
        )
        del vectors
        gc.collect()

    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join(
        [
            f"### {stamp}",
            "",
            f"Machine: {machine()}  ",
            f"Data: clustered unit vectors, d={DIMENSION}; {args.queries} single queries, k=10; "
            f"exact = IndexIDMap2(IndexFlatIP) (baseline), approx = IVF-SQ8 (calibrated "
            f"nprobe). Engine threshold for approximate: {APPROXIMATE_THRESHOLD:,} vectors.",
            "",
            "| vectors | exact p50 / p95 | approx p50 / p95 | p95 speed-up | recall@10 "
            "| nprobe | build exact / approx | index bytes per vector exact / approx "
            "| RSS growth exact / approx |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(report)
    if args.no_save:
        return 0
    append_report("search", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
