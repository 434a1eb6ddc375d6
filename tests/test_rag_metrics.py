"""The retrieval metrics agree with ir-measures (the TREC tools' implementations)."""

from __future__ import annotations

import random

import ir_measures
import pytest
from ir_measures import RR, Success, nDCG

from engine.rag.metrics import Judged, judge, mean_scores, unit_ranking

REFERENCE = {"hit@1": Success @ 1, "hit@5": Success @ 5, "mrr@10": RR @ 10, "ndcg@10": nDCG @ 10}


def _random_case(rng: random.Random, n: int) -> tuple[list[Judged], dict, dict]:
    """``n`` questions with random rankings and golds, as ours and as TREC qrels and run."""
    ours, qrels, run = [], {}, {}
    for q in range(n):
        units = [f"doc{d}" for d in rng.sample(range(40), rng.randint(1, 15))]
        gold = rng.sample([f"doc{d}" for d in range(40)], rng.randint(1, 4))
        ours.append(judge(((u, None) for u in units), [(g, None) for g in gold]))
        qid = f"q{q}"
        qrels[qid] = {g: 1 for g in gold}
        # A run lists documents by descending score; rank 1 has the highest.
        run[qid] = {u: float(len(units) - r) for r, u in enumerate(units)}
    return ours, qrels, run


@pytest.mark.parametrize("seed", range(5))
def test_means_match_ir_measures(seed: int) -> None:
    ours, qrels, run = _random_case(random.Random(seed), 60)
    expected = ir_measures.calc_aggregate(list(REFERENCE.values()), qrels, run)
    got = mean_scores(ours)
    for name, measure in REFERENCE.items():
        assert got[name] == pytest.approx(expected[measure], abs=1e-9), name


def test_a_question_with_no_gold_in_its_ranking_scores_zero() -> None:
    one = judge([("a.html", None), ("b.html", None)], [("c.html", None)])
    assert one.scores() == {"hit@1": 0.0, "hit@5": 0.0, "mrr@10": 0.0, "ndcg@10": 0.0}


def test_passages_of_one_unit_count_once() -> None:
    # Three passages of a wrong page, then the gold page: the gold unit is second.
    passages = [("m.pdf", 3), ("m.pdf", 3), ("m.pdf", 3), ("m.pdf", 7)]
    assert unit_ranking(passages) == [("m.pdf", 3), ("m.pdf", 7)]
    one = judge(passages, [("m.pdf", 7)])
    assert one.hit(1) == 0.0 and one.hit(5) == 1.0 and one.reciprocal_rank() == 0.5


def test_a_gold_without_a_page_is_judged_by_file() -> None:
    # Any page of the gold file answers; its pages are one unit, so nDCG stays within 1.
    passages = [("guide.pdf", 2), ("other.pdf", 1), ("guide.pdf", 9)]
    one = judge(passages, [("guide.pdf", None)])
    assert one.relevant == [True, False]
    assert one.ndcg() == pytest.approx(1.0)
