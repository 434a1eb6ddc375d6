"""Fitting a conversation into the model's context window."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.chat.templates import ChatMessage
from engine.errors import ContextOverflow

# Below this many free tokens an answer is not worth starting.
MIN_ANSWER_TOKENS = 16
# More characters per token than any tokenizer averages over a prompt (English runs at
# about 4). Text longer than the context window times this cannot fit whatever the
# model, so it is left out before rendering: a huge history or prompt never reaches the
# chat template, which refuses to build more than ``templates.MAX_TEXT`` characters.
MAX_CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class FittedPrompt:
    tokens: list[int]
    messages: list[ChatMessage]
    dropped: int  # history messages left out, oldest first


def fit_messages(
    system: ChatMessage | None,
    history: Sequence[ChatMessage],
    user: ChatMessage,
    encode: Callable[[list[ChatMessage]], list[int]],
    n_ctx: int,
    reserve: int,
) -> FittedPrompt:
    """Keep as much recent history as fits, always keeping the system prompt and the question.

    History is dropped from the oldest end, a whole exchange at a time where possible,
    until the prompt plus ``reserve`` tokens for the answer fits in ``n_ctx``. The number
    of kept messages is found by bisection, so a long history costs a few renders only.

    Raises:
        ContextOverflow: the system prompt and the question alone leave no room to answer.
    """
    head = [system] if system is not None else []
    history = list(history)
    what = "the prompt and system prompt" if system is not None else "the prompt"
    room = n_ctx * MAX_CHARS_PER_TOKEN - sum(len(m.content) for m in [*head, user])
    if room < 0:
        raise ContextOverflow(
            f"{what} hold {n_ctx * MAX_CHARS_PER_TOKEN - room:,} characters, far more than "
            f"the model's context window of {n_ctx:,} tokens holds",
            hint="shorten the prompt",
        )
    floor = _first_that_could_fit(history, room)

    def build(drop: int) -> tuple[list[ChatMessage], list[int]]:
        kept = history[drop:]
        # Never start the kept history with an assistant turn: templates expect a user turn.
        while kept and kept[0].role == "assistant":
            kept = kept[1:]
        msgs = [*head, *kept, user]
        return msgs, encode(msgs)

    limit = n_ctx - reserve
    msgs, tokens = build(floor)
    if len(tokens) <= limit:
        dropped = 0 if floor == 0 else len(history) - (len(msgs) - len(head) - 1)
        return FittedPrompt(tokens, msgs, dropped)
    lo, hi = floor + 1, len(history)  # invariant: dropping ``hi`` fits, if anything does
    best_msgs, best_tokens = build(hi)
    if len(best_tokens) <= limit:
        while lo < hi:
            mid = (lo + hi) // 2
            m, t = build(mid)
            if len(t) <= limit:
                hi, best_msgs, best_tokens = mid, m, t
            else:
                lo = mid + 1
        return FittedPrompt(best_tokens, best_msgs, len(history) - (len(best_msgs) - len(head) - 1))
    # Nothing of the history fits: the question alone, if it leaves room for an answer.
    if len(best_tokens) + MIN_ANSWER_TOKENS <= n_ctx:
        return FittedPrompt(best_tokens, best_msgs, len(history))
    raise ContextOverflow(
        f"{what} take {len(best_tokens):,} tokens, but the model's context window holds "
        f"{n_ctx:,} (at least {MIN_ANSWER_TOKENS} are needed for the answer)",
        hint="shorten the prompt, or raise the context with 'bastion models set ID --context N'",
    )


def _first_that_could_fit(history: list[ChatMessage], room: int) -> int:
    """The oldest message from which on the history's text is at most ``room`` characters."""
    total = 0
    for i in range(len(history) - 1, -1, -1):
        total += len(history[i].content)
        if total > room:
            return i + 1
    return 0
