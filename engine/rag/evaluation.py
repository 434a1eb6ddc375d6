"""Retrieval evaluation: recall@1, recall@5, MRR and nDCG@10 for dense, keyword and hybrid."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidInput, NotFound
from engine.rag.retrieval import MODES, SearchResult

DEPTH = 10


@dataclass(frozen=True)
class RetrievalEvaluation:
    """Retrieval quality on questions with known sources: each search mode's metrics."""

    questions: int
    modes: dict[str, dict[str, float]]  # mode -> metric name -> value

    def to_public(self) -> dict[str, object]:
        """``bastion eval retrieval --json``: the modes' metrics and the question count."""
        return {**self.modes, "questions": self.questions}


@dataclass(frozen=True)
class Question:
    question: str
    file: str
    page: int | None


def read_qa(path: Path) -> list[Question]:
    """Questions with known sources, one JSON object a line: question, file, page (optional).

    Raises:
        NotFound: no such file. InvalidInput: a bad line, named by number, or no questions.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise NotFound(f"no such file: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{path}, line {number}: not JSON ({exc.msg})") from exc
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("question"), str)
            or not isinstance(item.get("file"), str)
            or not item["question"].strip()
        ):
            raise InvalidInput(f'{path}, line {number}: needs a "question" and a "file"')
        page = item.get("page")
        if page is not None and (not isinstance(page, int) or page < 1):
            raise InvalidInput(f'{path}, line {number}: "page" must be a number from 1')
        questions.append(Question(item["question"], item["file"], page))
    if not questions:
        raise InvalidInput(f"{path} has no questions")
    return questions


def _is_relevant(result: SearchResult, q: Question) -> bool:
    path = result.chunk.path
    same_file = (
        path == q.file
        or path.endswith(os.sep + q.file.lstrip(os.sep))
        or os.path.basename(path) == q.file
    )
    return same_file and (q.page is None or result.chunk.page == q.page)


def evaluate(
    questions: list[Question],
    search: Callable[[str, int, str], list[SearchResult]],
    relevant_count: Callable[[Question], int],
) -> dict[str, dict[str, float]]:
    """Metrics per mode. ``relevant_count`` says how many chunks answer a question (for nDCG)."""
    report: dict[str, dict[str, float]] = {}
    ideal = {id(q): min(max(relevant_count(q), 1), DEPTH) for q in questions}
    for mode in MODES:
        r1 = r5 = mrr = ndcg = 0.0
        for q in questions:
            hits = [_is_relevant(r, q) for r in search(q.question, DEPTH, mode)]
            first = next((i for i, hit in enumerate(hits, 1) if hit), None)
            if first is not None:
                r1 += first == 1
                r5 += first <= 5
                mrr += 1.0 / first
            dcg = sum(1.0 / math.log2(i + 1) for i, hit in enumerate(hits, 1) if hit)
            idcg = sum(1.0 / math.log2(i + 1) for i in range(1, ideal[id(q)] + 1))
            ndcg += dcg / idcg
        n = len(questions)
        report[mode] = {"recall@1": r1 / n, "recall@5": r5 / n, "mrr": mrr / n, "ndcg@10": ndcg / n}
    return report
