"""The engine's evaluate-and-improve calls: corrections, blind A/B, feedback as data.

A part of the ``Engine`` facade (``Engine`` inherits it). The loop it serves: answers are
rated or corrected in chat, or two models are compared blind (``answer_pair`` then
``record_vote``); ``feedback_dataset`` turns all of it into a training set; a fine-tune
``--from`` the previous one learns it; ``evaluate`` and new votes show whether it got
better (``win_rates``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.chat.templates import ChatMessage
from engine.errors import InvalidInput
from engine.jobs import JobContext
from engine.models.runtime import SamplingParams

if TYPE_CHECKING:
    from engine.chat.completion import Completion
    from engine.models.registry import ModelRegistry
    from engine.store.conversations import ConversationStore
    from engine.store.feedback import FeedbackStore, Vote, WinRate
    from engine.train.feedback import FeedbackDataset


@dataclass(frozen=True)
class AnswerPair:
    """One prompt answered by two models, in the random order they are to be shown.

    Show ``first`` and ``second`` without the model names; reveal them after the pick.
    """

    messages: tuple[tuple[str, str], ...]
    first_model: str
    first: str
    second_model: str
    second: str


class Improving:
    """The evaluate-and-improve part of the facade (see the module docstring)."""

    models: ModelRegistry
    conversations: ConversationStore
    feedback: FeedbackStore

    def complete(  # provided by Serving
        self,
        model: str,
        messages: list[ChatMessage],
        sampling: SamplingParams,
        *,
        ctx: JobContext | None = None,
    ) -> Completion:
        raise NotImplementedError

    def correct_message(self, message_id: int, text: str | None) -> None:
        """Keep the user's better text for an answer beside the model's own (``None`` or
        blank text removes it); corrected answers become training data."""
        self.conversations.set_correction(message_id, text)

    def answer_pair(
        self,
        prompt: str,
        model_a: str,
        model_b: str,
        *,
        system: str | None = None,
        ctx: JobContext | None = None,
        rng: random.Random | None = None,
    ) -> AnswerPair:
        """Both models answer ``prompt`` (the same sampling, a shared random seed; nothing
        goes into the history); the pair comes back in random order for a blind pick."""
        if model_a == model_b:
            raise InvalidInput("choose two different models to compare")
        if not prompt.strip():
            raise InvalidInput("the prompt is empty")
        for model in (model_a, model_b):
            self.models.get(model)
        rng = rng or random.SystemRandom()
        messages = ([ChatMessage("system", system)] if system else []) + [
            ChatMessage("user", prompt)
        ]
        sampling = SamplingParams(seed=rng.randrange(2**31))
        ctx = ctx or JobContext()
        answers = {}
        for done, model in enumerate((model_a, model_b)):
            ctx.report(done, 2, f"answer {done + 1} of 2")
            answers[model] = self.complete(model, messages, sampling, ctx=ctx).text.strip()
        ctx.report(2, 2, "answered")
        first, second = (model_a, model_b) if rng.random() < 0.5 else (model_b, model_a)
        return AnswerPair(
            tuple((m.role, m.content) for m in messages),
            first,
            answers[first],
            second,
            answers[second],
        )

    def record_vote(self, pair: AnswerPair, pick: str) -> Vote:
        """Keep the user's pick for a pair: ``first``, ``second`` or ``tie``."""
        winner = {"first": "a", "second": "b", "tie": "tie"}.get(pick)
        if winner is None:
            raise InvalidInput(f"invalid pick {pick!r}", hint="use first, second or tie")
        return self.feedback.record_vote(
            list(pair.messages),
            pair.first_model,
            pair.first,
            pair.second_model,
            pair.second,
            winner,
        )

    def win_rates(self) -> list[WinRate]:
        """Each model's record in blind A/B votes, with 95 % intervals; best first."""
        return self.feedback.win_rates()

    def votes(self, since: str | None = None) -> list[Vote]:
        from engine.store.feedback import parse_since

        return self.feedback.votes(parse_since(since))

    def feedback_dataset(self, out: Path, since: str | None = None) -> FeedbackDataset:
        """Write thumbs-up answers, corrections and A/B picks given since ``since`` (a
        date) to ``out`` as a chat training set; see ``engine.train.feedback``."""
        from engine.train.feedback import build

        return build(self.conversations, self.feedback, Path(out), since)
