"""Answers from real documents: Bastion's retrieval against a naive pipeline, same files, same run.

    .venv/bin/python bench/bench_rag_quality.py [--sets gnuplot,pdf] [--modes hybrid,dense,keyword]

The document sets are real manuals that no one here wrote, installed from Debian packages
(``sudo apt install gnuplot-doc asymptote-doc developers-reference``):

* ``gnuplot``: the gnuplot manual as 650 HTML pages (``/usr/share/doc/gnuplot/htmldocs``);
* ``pdf``: the Asymptote manuals (five PDFs) and the Debian Developer's Reference (PDF).

Each set has 40 questions written from the documents the way users ask, with every gold
file (and page, for PDFs) that answers them, and 10 that the documents do not answer
(``bench/data/rag_quality/*.jsonl``; how they were written is in the notes beside them).
These sets are the ones retrieval may be tuned on; other manuals are kept for checking.

Both pipelines index the same list of files:

* **naive**: what anyone writes in an afternoon -- stdlib HTML to text, pypdf per page,
  200-word chunks with a 50-word overlap, all-MiniLM-L6-v2 in fp32 through
  sentence-transformers with ``IndexFlatIP``, SQLite FTS5 BM25 with an OR of the query's
  words, reciprocal rank fusion (k = 60) of the top 50 of each;
* **bastion**: a collection made as a user makes one (``Documents.add``), searched through
  ``Documents.search``; the "nothing relevant" gate through ``Documents.ground``.

Quality: hit@1, hit@5, MRR@10 and nDCG@10 over the answerable questions
(engine/rag/metrics.py: rankings reduced to distinct units, a file or a PDF page; for PDFs
hit@1 is the page accuracy, and "file@1" says how often the right file came first). Speed:
the wall time of indexing the set, model loading excluded for both (each embedder is
loaded and warmed before the clock starts); the sides index the set in alternating rounds
(``--rounds``, 2 by default) and each side's fastest round counts, every round printed.
The gate: how many answerable questions it refuses (goal 0) and how many unanswerable ones
(goal >= 80 %).
The tables, with the date and machine, are printed and appended to
``bench/results/rag_quality.md``. A run takes about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import html.parser
import json
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from benchlib import append_report, machine, stamp  # noqa: E402 -- after the path is set

from engine.rag.metrics import METRICS, Judged, judge, mean_scores  # noqa: E402

DATA = ROOT / "bench" / "data" / "rag_quality"
PASSAGES = 30  # asked of each search: enough for 10 distinct units
MODES = ("hybrid", "dense", "keyword")


@dataclass(frozen=True)
class DocSet:
    key: str
    title: str
    packages: tuple[str, ...]
    files: Callable[[], list[Path]]
    questions: str


def _gnuplot_files() -> list[Path]:
    return sorted(Path("/usr/share/doc/gnuplot/htmldocs").glob("*.html"))


def _pdf_files() -> list[Path]:
    return [
        *sorted(Path("/usr/share/doc/asymptote").glob("*.pdf")),
        Path("/usr/share/developers-reference/developers-reference.pdf"),
    ]


SETS = {
    "gnuplot": DocSet(
        "gnuplot", "gnuplot manual, HTML", ("gnuplot-doc",), _gnuplot_files, "gnuplot.jsonl"
    ),
    "pdf": DocSet(
        "pdf",
        "Asymptote manuals + Debian Developer's Reference, PDF",
        ("asymptote-doc", "developers-reference"),
        _pdf_files,
        "pdf_manuals.jsonl",
    ),
}


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    gold: list[tuple[str, int | None]]

    @property
    def answerable(self) -> bool:
        return bool(self.gold)


def read_questions(path: Path) -> list[Question]:
    questions = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            gold = [(g["file"], g.get("page")) for g in item["gold"]]
            questions.append(Question(item["id"], item["question"], gold))
    return questions


def same_file(found: str, gold: str) -> bool:
    return found == gold or found.endswith("/" + gold.lstrip("/"))


# -- the naive pipeline --------------------------------------------------------------------


class _Text(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self.skip -= tag in ("script", "style") and self.skip > 0

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def naive_pages(path: Path) -> list[tuple[int | None, str]]:
    if path.suffix.lower() == ".pdf":
        import pypdf

        reader = pypdf.PdfReader(path)
        return [(n, page.extract_text() or "") for n, page in enumerate(reader.pages, 1)]
    parser = _Text()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return [(None, " ".join(parser.parts))]


def naive_chunks(text: str, size: int = 200, overlap: int = 50) -> list[str]:
    words = text.split()
    step = size - overlap
    return [" ".join(words[i : i + size]) for i in range(0, max(len(words) - overlap, 1), step)]


class Naive:
    """The afternoon script: fp32 sentence-transformers, IndexFlatIP, FTS5, RRF."""

    def __init__(self, model: Any) -> None:
        import faiss

        self.model = model
        dimension = getattr(model, "get_embedding_dimension", None) or (
            model.get_sentence_embedding_dimension
        )
        self.index = faiss.IndexFlatIP(dimension())
        self.db = sqlite3.connect(":memory:")
        self.db.execute("CREATE VIRTUAL TABLE chunks USING fts5(text)")
        self.units: list[tuple[str, int | None]] = []

    def add(self, files: list[Path]) -> None:
        texts = []
        for path in files:
            for page, text in naive_pages(path):
                for chunk in naive_chunks(text):
                    texts.append(chunk)
                    self.units.append((str(path), page))
        vectors = self.model.encode(
            texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False
        )
        self.index.add(vectors)
        self.db.executemany("INSERT INTO chunks(rowid, text) VALUES (?, ?)", list(enumerate(texts)))

    def dense(self, query: str, k: int) -> list[int]:
        vector = self.model.encode([query], normalize_embeddings=True, show_progress_bar=False)
        _, ids = self.index.search(vector, k)
        return [int(i) for i in ids[0] if i >= 0]

    def keyword(self, query: str, k: int) -> list[int]:
        words = re.findall(r"\w+", query)
        if not words:
            return []
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        rows = self.db.execute(
            "SELECT rowid FROM chunks WHERE chunks MATCH ? ORDER BY bm25(chunks) LIMIT ?",
            (match, k),
        )
        return [r[0] for r in rows]

    def search(self, query: str, k: int, mode: str) -> list[tuple[str, int | None]]:
        if mode == "dense":
            ids = self.dense(query, k)
        elif mode == "keyword":
            ids = self.keyword(query, k)
        else:
            fused: dict[int, float] = {}
            for ranked in (self.dense(query, 50), self.keyword(query, 50)):
                for rank, i in enumerate(ranked, 1):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (60 + rank)
            ids = sorted(fused, key=lambda i: -fused[i])[:k]
        return [self.units[i] for i in ids]


# -- running both ----------------------------------------------------------------------------


@dataclass
class Outcome:
    seconds: float
    chunks: int
    scores: dict[str, dict[str, float]]  # mode -> metric -> mean
    file_hit1: dict[str, float]  # mode -> how often the right file came first
    refused_answerable: int | None = None
    refused_unanswerable: int | None = None
    # The best dense cosine among each question's passages: (answerable, cosine).
    top_cosines: list[tuple[bool, float]] | None = None
    backend: str = "sentence-transformers fp32"  # what embedded the chunks


def _score(
    questions: list[Question], search: Callable[[str, int, str], list[tuple[str, int | None]]]
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    scores, file_hit1 = {}, {}
    answerable = [q for q in questions if q.answerable]
    for mode in MODES:
        judged: list[Judged] = []
        first_file = 0
        for q in answerable:
            passages = search(q.text, PASSAGES, mode)
            judged.append(judge(passages, q.gold, same_file))
            first_file += bool(passages) and any(same_file(passages[0][0], f) for f, _ in q.gold)
        scores[mode] = mean_scores(judged)
        file_hit1[mode] = first_file / len(answerable)
    return scores, file_hit1


def run_naive(files: list[Path], questions: list[Question], score: bool = True) -> Outcome:
    from sentence_transformers import SentenceTransformer

    from engine.rag.embedder import resolve_embedder

    model = SentenceTransformer(str(resolve_embedder("all-minilm-l6-v2")), device="cpu")
    model.encode(["warm up"] * 8, show_progress_bar=False)
    naive = Naive(model)
    started = time.perf_counter()
    naive.add(files)
    seconds = time.perf_counter() - started
    if not score:
        return Outcome(seconds, len(naive.units), {}, {})
    scores, file_hit1 = _score(questions, naive.search)
    return Outcome(seconds, len(naive.units), scores, file_hit1)


def run_bastion(
    files: list[Path], questions: list[Question], scratch: Path, score: bool = True
) -> Outcome:
    """Index ``files`` into a new home under ``scratch``; score it when ``score``.

    The first home of a set starts as a new user's: the embedder backend is measured there.
    A later round's home starts with that measurement and export (copied), as a user's
    second collection does, so that each round times the same work.
    """
    from engine import Engine, JobContext
    from engine.rag.embedder import DEFAULT_EMBEDDER, clear_embedder_cache, recorded_backend

    earlier = sorted(scratch.glob("home-*"))
    home = scratch / f"home-{len(earlier)}"
    if earlier:
        shutil.copytree(earlier[0] / "cache" / "embedders", home / "cache" / "embedders")
    else:
        clear_embedder_cache()  # each set as a new user: the backend is measured in its home
    engine = Engine(home)
    docs = engine.documents
    try:
        warm = scratch / "warm.txt"
        warm.write_text("A short note that loads and warms the embedder.\n")
        docs.create("warm")
        docs.add("warm", [str(warm)], JobContext())
        docs.create("set")
        started = time.perf_counter()
        report = docs.add("set", [str(f) for f in files], JobContext())
        seconds = time.perf_counter() - started
        chosen = recorded_backend(DEFAULT_EMBEDDER, home / "cache" / "embedders")
        backend = chosen.summary() if chosen else docs.embedder(DEFAULT_EMBEDDER).backend
        if not score:
            return Outcome(seconds, report.chunks, {}, {}, backend=backend)

        def search(text: str, k: int, mode: str) -> list[tuple[str, int | None]]:
            return [(r.chunk.path, r.chunk.page) for r in docs.search("set", text, k, mode)]

        scores, file_hit1 = _score(questions, search)
        refused = {True: 0, False: 0}
        cosines = []
        for q in questions:
            grounding = docs.ground("set", q.text, 5)
            refused[q.answerable] += grounding.canned_answer is not None
            best = max((r.dense_score or 0.0 for r in grounding.results), default=0.0)
            cosines.append((q.answerable, best))
        return Outcome(
            seconds,
            report.chunks,
            scores,
            file_hit1,
            refused[True],
            refused[False],
            cosines,
            backend,
        )
    finally:
        engine.close()


def report(doc_set: DocSet, files: list[Path], questions: list[Question], naive: Outcome,
           ours: Outcome, rounds: tuple[list[float], list[float]]) -> str:  # fmt: skip
    answerable = sum(q.answerable for q in questions)
    unanswerable = len(questions) - answerable
    paged = any(page is not None for q in questions for _, page in q.gold)
    head = ["pipeline", *METRICS, *(["file@1"] if paged else [])]
    lines = [
        f"**{doc_set.title}** ({len(files)} files; {answerable} questions with an answer, "
        f"{unanswerable} without; packages: {', '.join(doc_set.packages)})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, outcome in (("naive", naive), ("bastion", ours)):
        for mode in MODES:
            row = [f"{name} {mode}", *(f"{outcome.scores[mode][m]:.3f}" for m in METRICS)]
            if paged:
                row.append(f"{outcome.file_hit1[mode]:.3f}")
            lines.append("| " + " | ".join(row) + " |")
    gain = {m: ours.scores["hybrid"][m] - naive.scores["hybrid"][m] for m in METRICS}
    lines += [
        "",
        "Hybrid, bastion − naive: " + ", ".join(f"{m} {v:+.3f}" for m, v in gain.items()),
        "",
        f"Indexing: naive {naive.seconds:.1f} s ({naive.chunks} chunks), bastion "
        f"{ours.seconds:.1f} s ({ours.chunks} chunks): bastion is "
        f"{naive.seconds / ours.seconds:.2f}x the naive speed (the fastest of "
        f"{len(rounds[0])} alternating rounds; naive "
        f"{', '.join(f'{t:.1f}' for t in rounds[0])} s, bastion "
        f"{', '.join(f'{t:.1f}' for t in rounds[1])} s). Bastion's embedder backend, "
        f"measured on this machine: {ours.backend}.",
        "",
        f'Gate ("nothing relevant"): refused {ours.refused_answerable} of {answerable} '
        f"answerable questions and {ours.refused_unanswerable} of {unanswerable} "
        "unanswerable ones.",
    ]
    if ours.top_cosines:
        lowest = min((c for a, c in ours.top_cosines if a), default=0.0)
        above = sum(c >= lowest for a, c in ours.top_cosines if not a)
        lines.append(
            f"Best dense cosine per question: lowest with an answer {lowest:.3f}; "
            f"{above} of {unanswerable} without an answer reach it (a cosine threshold "
            "alone cannot refuse those without refusing an answerable one)."
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument(
        "--rounds", type=int, default=2, help="times each side indexes a set (the fastest counts)"
    )
    args = parser.parse_args()
    chosen = [SETS[key] for key in args.sets.split(",")]
    empty = [s for s in chosen if not s.files() or not all(f.is_file() for f in s.files())]
    if empty:
        packages = " ".join(p for s in empty for p in s.packages)
        print(f"missing documents of {empty[0].key}: sudo apt install {packages}", file=sys.stderr)
        return 2
    sections = [f"{machine()}; {stamp()}"]
    for doc_set in chosen:
        files = doc_set.files()
        questions = read_questions(DATA / doc_set.questions)
        print(f"{doc_set.key}: {len(files)} files, {len(questions)} questions", flush=True)
        # The sides alternate, and each one's fastest round counts: on a shared machine a
        # slow spell (tens of seconds, a quarter slower) would otherwise decide the ratio.
        ours_times, naive_times = [], []
        with tempfile.TemporaryDirectory(prefix="bastion-rag-quality-") as scratch:
            for n in range(args.rounds):
                last = n == args.rounds - 1
                ours = run_bastion(files, questions, Path(scratch), score=last)
                naive = run_naive(files, questions, score=last)
                ours_times.append(ours.seconds)
                naive_times.append(naive.seconds)
        ours.seconds, naive.seconds = min(ours_times), min(naive_times)
        text = report(doc_set, files, questions, naive, ours, (naive_times, ours_times))
        print(text + "\n", flush=True)
        sections.append(text)
    append_report("rag_quality", "\n\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
