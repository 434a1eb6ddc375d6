"""Scoring a prompt: the log-probability of each of its tokens, in the model host.

What OpenAI's legacy completions API answers with ``echo`` and ``logprobs``, and what
lm-evaluation-harness asks of a server for its log-likelihood tasks (``multiple_choice``,
``loglikelihood_rolling``): the prompt is evaluated once, with the logits of every
position (``LoadedModel.score``), within one context window -- a longer prompt is refused,
never cut, since a score of part of it would be a different number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import ContextOverflow, InvalidInput

if TYPE_CHECKING:
    from engine.chat.session import ChatService
    from engine.models.registry import ModelEntry

# OpenAI's legacy API returns at most 5 alternatives per position.
MAX_TOP = 5


@dataclass(frozen=True)
class TokenScore:
    """One token of a scored prompt."""

    token: int
    text: str  # what it adds to the text ('' when it only begins a character)
    logprob: float | None  # given the tokens before it (nats); None for the first token
    top: tuple[tuple[str, float], ...]  # the likeliest tokens at its place, best first


@dataclass(frozen=True)
class ScoredPrompt:
    """A prompt's tokens with their log-probabilities, and the likeliest token after it."""

    model: str
    tokens: tuple[TokenScore, ...]
    next_token: TokenScore  # the most likely continuation (greedy), with the alternatives

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


@dataclass(frozen=True)
class TokenizerInfo:
    """What a client needs to tokenize as the model does (vLLM's ``/tokenizer_info``)."""

    model: str
    bos_token: str
    eos_token: str
    add_bos_token: bool
    context_length: int


def local_entry(service: ChatService, model_id: str) -> ModelEntry:
    """``model_id``'s entry, loaded; InvalidInput for a remote model (its server has the
    vocabulary and the logits, not Bastion)."""
    entry = service.prepare(model_id)[0]
    if entry.remote:
        raise InvalidInput(
            f"{entry.id} is a remote model: its own server tokenizes and scores text"
        )
    return entry


def adds_bos(entry: ModelEntry) -> bool:
    return entry.metadata.get("tokenizer.ggml.add_bos_token", True) is not False


def tokenizer_info(service: ChatService, model_id: str) -> TokenizerInfo:
    entry = local_entry(service, model_id)
    bos, eos = service.lane.special_tokens()
    n_ctx = service.spec_for(entry).n_ctx
    return TokenizerInfo(entry.id, bos, eos, adds_bos(entry), n_ctx)


def score_prompt(
    service: ChatService, model_id: str, prompt: str | list[int], top: int = 1
) -> ScoredPrompt:
    """Score ``prompt`` (text, tokenized as the model does, or token ids, used as they are).

    Raises:
        InvalidInput: a remote model, an empty prompt, ids outside the vocabulary, ``top``
        out of range; ContextOverflow: more tokens than the model's context holds.
    """
    if not 0 <= top <= MAX_TOP:
        raise InvalidInput(f"logprobs must be between 0 and {MAX_TOP}, not {top}")
    entry = local_entry(service, model_id)
    lane = service.lane
    tokens = lane.tokenize(prompt, adds_bos(entry)) if isinstance(prompt, str) else prompt
    if not tokens:
        raise InvalidInput("the prompt is empty: there is nothing to score")
    n_ctx = service.spec_for(entry).n_ctx
    if len(tokens) > n_ctx:
        raise ContextOverflow(
            f"the prompt is {len(tokens):,} tokens; {entry.id}'s context holds {n_ctx:,}",
            hint="score a shorter text (lm-eval: max_length at most the context)",
        )
    value = lane.score(tokens, top)
    return _scored(entry.id, tokens, value, top)


def _scored(model: str, tokens: list[int], value: dict[str, Any], top: int) -> ScoredPrompt:
    pieces: list[str] = value["pieces"]
    logprobs: list[float | None] = [None, *value["logprobs"]]
    # value["top"][i] holds the likeliest tokens after position i: token i + 1's place.
    places: list[list[list[Any]]] = [[], *value["top"]]

    def alternatives(place: list[list[Any]]) -> tuple[tuple[str, float], ...]:
        return tuple((str(text), float(lp)) for _id, text, lp in place[:top])

    scored = tuple(
        TokenScore(token, piece, logprob, alternatives(place))
        for token, piece, logprob, place in zip(tokens, pieces, logprobs, places[:-1], strict=True)
    )
    best_id, best_text, best_lp = places[-1][0]
    next_token = TokenScore(int(best_id), str(best_text), float(best_lp), alternatives(places[-1]))
    return ScoredPrompt(model, scored, next_token)
