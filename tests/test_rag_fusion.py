"""Hybrid fusion: the two methods' scores scaled into [0, 1] and mixed with equal weights."""

from __future__ import annotations

import pytest

from engine.rag.retrieval import DENSE_WEIGHT, fuse


def test_a_chunk_both_methods_rank_well_beats_one_only_one_method_ranks_first() -> None:
    dense = [(1, 0.80), (2, 0.78), (3, 0.40)]
    keyword = [(3, 12.0), (2, 11.0), (4, 2.0)]
    ranked = [cid for cid, _ in fuse(dense, keyword)]
    assert ranked[0] == 2  # second in both: 0.5 * 0.95 + 0.5 * 0.92
    assert set(ranked) == {1, 2, 3, 4}


def test_scores_are_scaled_per_method_so_bm25_magnitudes_do_not_dominate() -> None:
    dense = [(1, 0.9), (2, 0.3)]
    keyword = [(2, 900.0), (1, 850.0)]
    scores = dict(fuse(dense, keyword))
    assert scores[1] == pytest.approx(DENSE_WEIGHT * 1.0 + (1 - DENSE_WEIGHT) * 850 / 900)
    assert scores[2] == pytest.approx(DENSE_WEIGHT * 0.0 + (1 - DENSE_WEIGHT) * 1.0)
    assert scores[1] > scores[2]


def test_one_method_alone_or_one_candidate_still_ranks() -> None:
    assert fuse([], [(5, 3.0), (6, 1.0)]) == [
        (5, pytest.approx(1 - DENSE_WEIGHT)),
        (6, pytest.approx((1 - DENSE_WEIGHT) / 3)),
    ]
    assert fuse([(7, 0.4)], []) == [(7, pytest.approx(DENSE_WEIGHT))]
    assert fuse([], []) == []
