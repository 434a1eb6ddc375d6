"""Retrieval evaluation: recall@1, recall@5, MRR and nDCG@10 for dense, keyword and hybrid."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidInput, NotFound
from engine.rag.metrics import judge, mean_scores
from engine.rag.retrieval import MODES, SearchResult

# Passages asked of the search: enough for 10 distinct units when a few repeat a unit.
PASSAGES = 30


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


def _same_file(path: str, gold: str) -> bool:
    """Whether an indexed ``path`` is the question's ``gold`` file (named whole, by its
    end, or by its name alone)."""
    return (
        path == gold
        or path.endswith(os.sep + gold.lstrip(os.sep))
        or (os.path.basename(path) == gold)
    )


def evaluate(
    questions: list[Question],
    search: Callable[[str, int, str], list[SearchResult]],
) -> dict[str, dict[str, float]]:
    """Metrics per mode (see engine/rag/metrics.py), over the first 10 distinct units.

    Each mode's metrics carry their proper names (``hit@1``, ``hit@5``, ``mrr@10``,
    ``ndcg@10``) and, for the command line's contract, the names of its first version:
    ``recall@1`` and ``recall@5`` are the hit rates, ``mrr`` is ``mrr@10``.
    """
    report: dict[str, dict[str, float]] = {}
    for mode in MODES:
        judged = [
            judge(
                ((r.chunk.path, r.chunk.page) for r in search(q.question, PASSAGES, mode)),
                [(q.file, q.page)],
                _same_file,
            )
            for q in questions
        ]
        scores = mean_scores(judged)
        report[mode] = {
            **scores,
            "recall@1": scores["hit@1"],
            "recall@5": scores["hit@5"],
            "mrr": scores["mrr@10"],
        }
    return report
