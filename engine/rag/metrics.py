"""Retrieval metrics, named as information retrieval names them.

A question's gold is a set of *units*: a file, or a page of a paged file (PDF). A ranking of
passages is first reduced to a ranking of units (each unit at its first passage's place),
so that two retrievers that cut the same document into different passages are compared on
the same footing, and a unit that fills the top five with its passages counts once.

- ``hit@k`` (ir-measures' ``Success@k``): whether a gold unit is among the first ``k``
  units. What an earlier version called "recall@k" was this hit rate.
- ``mrr@10`` (``RR@10``): 1 / the rank of the first gold unit, 0 past rank 10.
- ``ndcg@10`` (``nDCG@10``): binary gains, the ideal ranking putting every gold unit first.

The means over questions are what ``tests/test_rag_metrics.py`` checks against ir-measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

Unit = tuple[str, int | None]  # (file, page); page is None for a file without pages

DEPTH = 10
METRICS = ("hit@1", "hit@5", "mrr@10", "ndcg@10")


def unit_ranking(passages: Iterable[Unit]) -> list[Unit]:
    """The distinct units of a ranking of passages, in the order they first appear."""
    seen: set[Unit] = set()
    ranking = []
    for unit in passages:
        if unit not in seen:
            seen.add(unit)
            ranking.append(unit)
    return ranking


@dataclass(frozen=True)
class Judged:
    """One question's ranking of units, each marked gold or not, and its number of golds."""

    relevant: Sequence[bool]  # the ranking, rank 1 first
    gold: int  # how many units answer the question (at least 1)

    def hit(self, k: int) -> float:
        return 1.0 if any(self.relevant[:k]) else 0.0

    def reciprocal_rank(self, k: int = DEPTH) -> float:
        for rank, relevant in enumerate(self.relevant[:k], 1):
            if relevant:
                return 1.0 / rank
        return 0.0

    def ndcg(self, k: int = DEPTH) -> float:
        dcg = sum(1.0 / math.log2(rank + 1) for rank, r in enumerate(self.relevant[:k], 1) if r)
        ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(self.gold, k) + 1))
        return dcg / ideal if ideal else 0.0

    def scores(self) -> dict[str, float]:
        return {
            "hit@1": self.hit(1),
            "hit@5": self.hit(5),
            "mrr@10": self.reciprocal_rank(),
            "ndcg@10": self.ndcg(),
        }


def judge(
    passages: Iterable[Unit],
    gold: Iterable[Unit],
    same_file: Callable[[str, str], bool] | None = None,
) -> Judged:
    """Reduce a ranking of passages to units and mark each unit gold or not.

    A question whose golds have no page is judged by file (every page of a gold file is
    the same unit); otherwise by page. ``same_file(found, gold)`` says whether a passage's
    file is a gold file (by default, equal paths).
    """
    golds = list(gold)
    by_page = any(page is not None for _, page in golds)
    same = same_file or (lambda a, b: a == b)
    ranking = unit_ranking((path, page if by_page else None) for path, page in passages)
    relevant = [
        any(same(path, g_path) and (not by_page or page == g_page) for g_path, g_page in golds)
        for path, page in ranking
    ]
    return Judged(relevant, max(len(golds), 1))


def mean_scores(judged: Sequence[Judged]) -> dict[str, float]:
    """Each metric's mean over the questions (0 for every metric without questions)."""
    if not judged:
        return dict.fromkeys(METRICS, 0.0)
    totals = dict.fromkeys(METRICS, 0.0)
    for one in judged:
        for name, value in one.scores().items():
            totals[name] += value
    return {name: total / len(judged) for name, total in totals.items()}
