"""A pairwise judge: a chosen local model says which of two answers is better.

Each model after the first is compared with the first (the baseline) on every item. The
judge sees the question, the reference when the set has one, and the two answers, and
is asked for ``A``, ``B`` or ``TIE``. Models favour whichever answer comes first (or
second), so every pair is asked twice with the answers swapped: a side wins only when
both orders pick it; disagreeing orders, an explicit tie or a reply that is none of the
three make a tie. A model's record against the baseline counts a tie as half a win,
with a 95 % Wilson interval.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from engine.store.feedback import wilson

Judge = Callable[[str], str]
"""Gives the judge model's reply to one prompt (greedy, short)."""

PROMPT = """You compare two answers to the same question and say which is better: more \
correct, more complete and more to the point.

Question:
{question}
{reference}
Answer A:
{a}

Answer B:
{b}

Which answer is better? Reply with one word: A, B or TIE."""

_VERDICT = re.compile(r"\b(TIE|A|B)\b")


def parse_verdict(reply: str) -> str | None:
    """``"A"``, ``"B"``, ``"TIE"`` from the first such word of a reply, else None."""
    found = _VERDICT.search(reply.upper().replace("*", " "))
    return found.group(1) if found else None


def compare(
    judge: Judge, question: str, reference: str | None, baseline: str, other: str
) -> dict[str, Any]:
    """Both orders asked; ``verdict`` is ``"other"``, ``"baseline"`` or ``"tie"``."""
    ref = f"\nReference answer:\n{reference}\n" if reference else ""
    first = judge(PROMPT.format(question=question, reference=ref, a=baseline, b=other))
    second = judge(PROMPT.format(question=question, reference=ref, a=other, b=baseline))
    v1, v2 = parse_verdict(first), parse_verdict(second)
    # In the first order the other model's answer is B; in the second it is A.
    if v1 == "B" and v2 == "A":
        verdict = "other"
    elif v1 == "A" and v2 == "B":
        verdict = "baseline"
    else:
        verdict = "tie"
    return {"verdict": verdict, "replies": [first, second], "parsed": [v1, v2]}


def record(verdicts: list[str]) -> dict[str, Any]:
    """Wins, losses and ties of the other model, its rate (ties half) and interval."""
    wins, losses = verdicts.count("other"), verdicts.count("baseline")
    ties = len(verdicts) - wins - losses
    n = len(verdicts)
    rate = (wins + ties / 2) / n if n else None
    low, high = wilson(wins + ties / 2, n)
    return {"wins": wins, "losses": losses, "ties": ties, "rate": rate, "low": low, "high": high}
