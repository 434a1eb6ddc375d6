"""Continuous batching in the model host: concurrent answers are generated together, and
each is the answer it would be alone."""

from __future__ import annotations

import threading
import time
from typing import Any

from engine.models.runtime import SamplingParams
from tests.conftest import DEFAULT_MODEL

# Continuations the model is sure of (greedy): batching must not change them.
# Characters at the start of each answer that greedy decoding is sure of.
SURE = 6
PROMPTS = ["1, 2, 3, 4, 5,", "Monday, Tuesday, Wednesday,", "10, 20, 30, 40,", "a, b, c, d,"]


def _answers(
    engine: Any, parallel: int, max_tokens: int, seed: int | None = 0
) -> dict[str, tuple[str, float, float]]:
    """Each prompt's text, time of its first text and time it ended, all asked at once."""
    engine.set_parallel(parallel)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=seed)
    found: dict[str, tuple[str, float, float]] = {}
    errors: list[BaseException] = []

    def ask(prompt: str) -> None:
        first: list[float] = []
        try:
            done = engine.complete_text(
                DEFAULT_MODEL, prompt, sampling, on_text=lambda _t: first.append(time.monotonic())
            )
        except BaseException as exc:
            errors.append(exc)
            return
        found[prompt] = (done.text, first[0], time.monotonic())

    engine.complete_text(DEFAULT_MODEL, "Hello", SamplingParams(max_tokens=1))  # load it first
    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not errors, errors
    return found


def test_concurrent_answers_overlap_and_match_their_answers_alone(engine: Any) -> None:
    alone = _answers(engine, 1, 12)
    batched = _answers(engine, 4, 48)
    # Batched: every answer had begun before any ended (one at a time, the second
    # would begin only after the first had ended).
    assert max(first for _, first, _ in batched.values()) < min(
        end for _, _, end in batched.values()
    )
    # The sure part of each answer is the same (later tokens may part at a near tie: the
    # logits of a sequence differ in their last bits with the batch it was computed in).
    for prompt in PROMPTS:
        assert batched[prompt][0][:SURE] == alone[prompt][0][:SURE], (prompt, alone, batched)
    # Unseeded, prompts start from the cache cells of earlier ones with the same beginning
    # (the chat template's, here the whole prompt the second time): the same answers.
    for _ in range(2):
        reused = _answers(engine, 4, 12, seed=None)
        for prompt in PROMPTS:
            assert reused[prompt][0][:SURE] == alone[prompt][0][:SURE], (prompt, alone, reused)
    # And one at a time really is one at a time.
    assert max(first for _, first, _ in alone.values()) > min(end for _, _, end in alone.values())
