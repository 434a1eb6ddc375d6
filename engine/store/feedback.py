"""Blind A/B votes and the feedback kept on answers, as training data will read them.

A vote is one prompt answered by two models, shown unlabelled and in random order, and
the user's pick: ``a`` (the answer shown first), ``b``, or ``tie``. Both answers are kept
with the vote, so a pick can later become a training example (the winner's answer) and a
preference pair (winner over loser).

Win rates count a tie as half a win, with a 95 % Wilson score interval: it stays inside
[0, 1] and is honest for the handful of votes a user casts (a 3-of-4 record is not 75 %).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final

from engine.errors import InvalidInput
from engine.store.db import Database

WINNERS: Final = ("a", "b", "tie")
_Z95: Final = 1.959964


@dataclass(frozen=True)
class Vote:
    id: int
    created_at: str
    messages: tuple[tuple[str, str], ...]  # (role, content) of the prompt
    model_a: str
    answer_a: str
    model_b: str
    answer_b: str
    winner: str  # "a", "b" or "tie"

    def to_public(self) -> dict[str, Any]:
        data = asdict(self)
        data["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        return data


@dataclass(frozen=True)
class WinRate:
    """One model's record in blind A/B votes; ``rate`` counts a tie as half a win."""

    model: str
    wins: int
    losses: int
    ties: int
    rate: float
    low: float
    high: float

    @property
    def votes(self) -> int:
        return self.wins + self.losses + self.ties

    def to_public(self) -> dict[str, Any]:
        return asdict(self) | {"votes": self.votes}


def wilson(successes: float, n: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (``successes`` may hold halves)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def parse_since(since: str | None) -> str | None:
    """``YYYY-MM-DD`` or an ISO time, as the UTC ISO text stored times compare with.

    Raises:
        InvalidInput: not a date.
    """
    if since is None:
        return None
    try:
        moment = datetime.fromisoformat(since.strip())
    except ValueError:
        raise InvalidInput(
            f"--since {since!r} is not a date", hint="use YYYY-MM-DD or YYYY-MM-DDTHH:MM"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class FeedbackStore:
    """A/B votes in ``bastion.db``, and where the rated and corrected answers are."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record_vote(
        self,
        messages: list[tuple[str, str]],
        model_a: str,
        answer_a: str,
        model_b: str,
        answer_b: str,
        winner: str,
    ) -> Vote:
        """Keep one pick between two answers to the same prompt.

        Raises:
            InvalidInput: ``winner`` is not a, b or tie; the two models are the same; the
                prompt is empty.
        """
        if winner not in WINNERS:
            raise InvalidInput(f"invalid pick {winner!r}", hint="use a, b or tie")
        if model_a == model_b:
            raise InvalidInput("an A/B vote needs two different models")
        if not messages or not messages[-1][1].strip():
            raise InvalidInput("an A/B vote needs the prompt both models answered")
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        stored = json.dumps([{"role": r, "content": c} for r, c in messages], ensure_ascii=False)
        cursor = self._db.execute(
            "INSERT INTO ab_votes (created_at, messages, model_a, answer_a, model_b, answer_b,"
            " winner) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now, stored, model_a, answer_a, model_b, answer_b, winner),
        )
        vote_id = cursor.lastrowid
        assert vote_id is not None
        return Vote(vote_id, now, tuple(messages), model_a, answer_a, model_b, answer_b, winner)

    def votes(self, since: str | None = None) -> list[Vote]:
        """Every vote (at or after ``since``, an ISO time from ``parse_since``), oldest first."""
        rows = self._db.query(
            "SELECT * FROM ab_votes WHERE created_at >= ? ORDER BY id", (since or "",)
        )
        return [
            Vote(
                row["id"],
                row["created_at"],
                tuple((m["role"], m["content"]) for m in json.loads(row["messages"])),
                row["model_a"],
                row["answer_a"],
                row["model_b"],
                row["answer_b"],
                row["winner"],
            )
            for row in rows
        ]

    def win_rates(self) -> list[WinRate]:
        """Each model's wins, losses and ties in all votes, best rate first."""
        record: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for row in self._db.query("SELECT model_a, model_b, winner FROM ab_votes"):
            a, b, winner = row["model_a"], row["model_b"], row["winner"]
            if winner == "tie":
                record[a][2] += 1
                record[b][2] += 1
            else:
                won, lost = (a, b) if winner == "a" else (b, a)
                record[won][0] += 1
                record[lost][1] += 1
        rates = []
        for model, (wins, losses, ties) in record.items():
            n = wins + losses + ties
            score = wins + ties / 2
            low, high = wilson(score, n)
            rates.append(WinRate(model, wins, losses, ties, score / n, low, high))
        return sorted(rates, key=lambda r: (-r.rate, -r.votes, r.model))

    def answers_with_feedback(self, since: str | None = None) -> list[tuple[int, int]]:
        """(message id, conversation id) of every answer rated or corrected at or after
        ``since`` (an answer rated before feedback times were kept counts from its own
        time), oldest first."""
        rows = self._db.query(
            "SELECT id, conversation_id FROM messages WHERE role = 'assistant'"
            " AND (rating IS NOT NULL OR correction IS NOT NULL)"
            " AND COALESCE(feedback_at, created_at) >= ? ORDER BY id",
            (since or "",),
        )
        return [(row["id"], row["conversation_id"]) for row in rows]
