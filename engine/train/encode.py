"""Turning examples into token ids and loss targets, the way llama.cpp will prompt the model.

Chat examples are rendered with the model's own chat template (the one in its GGUF, the
same renderer ``bastion chat`` uses) and tokenized with its own llama.cpp vocabulary, so
the fine-tune learns exactly the token sequence it will see at inference. Only the
assistant's turns are targets: each one is the text that rendering the conversation up
to that turn adds after the generation prompt (the answer and the end-of-turn marker).

Plain-text examples (continued pre-training) are all target, followed by end-of-text.
An example longer than ``max_length`` is cut at the end; one left with no target is
dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.chat.templates import ChatMessage, ChatTemplate
from engine.models.tokenizer import Vocabulary
from engine.train.datasets import Example


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    targets: list[bool]  # targets[t]: ids[t] is predicted (from the tokens before it)
    truncated: bool

    @property
    def n_targets(self) -> int:
        return sum(self.targets)


@dataclass
class EncodeStats:
    truncated: int = 0
    dropped: int = 0  # nothing left to learn after truncation
    tokens: int = 0
    target_tokens: int = 0


class ExampleEncoder:
    """Encodes examples for one model (template + vocabulary + BOS rule)."""

    def __init__(
        self, vocab: Vocabulary, template: ChatTemplate, add_bos: bool, max_length: int
    ) -> None:
        self.vocab = vocab
        self.template = template
        self.add_bos = add_bos
        self.max_length = max_length

    def encode(self, example: Example) -> Encoded:
        if example.fmt == "text":
            ids = self._bos() + self.vocab.tokenize(example.turns[0][1]) + [self.vocab.eos_id]
            targets = [False] * len(self._bos()) + [True] * (len(ids) - len(self._bos()))
        else:
            ids, targets = self._chat(example)
        truncated = len(ids) > self.max_length
        if truncated:
            ids, targets = ids[: self.max_length], targets[: self.max_length]
        if targets:
            targets[0] = False  # nothing comes before the first token to predict it from
        return Encoded(ids, targets, truncated)

    def encode_all(self, examples: list[Example]) -> tuple[list[Encoded], EncodeStats]:
        """Encode every example; those with no target left are dropped (counted in stats)."""
        stats = EncodeStats()
        kept: list[Encoded] = []
        for example in examples:
            encoded = self.encode(example)
            stats.truncated += encoded.truncated
            if encoded.n_targets == 0:
                stats.dropped += 1
                continue
            stats.tokens += len(encoded.ids)
            stats.target_tokens += encoded.n_targets
            kept.append(encoded)
        return kept, stats

    def _bos(self) -> list[int]:
        return [self.vocab.bos_id] if self.add_bos else []

    def _chat(self, example: Example) -> tuple[list[int], list[bool]]:
        messages = [ChatMessage(role, content) for role, content in example.turns]
        full = self.template.render(messages, add_generation_prompt=False)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prompt = self.template.render(messages[:i], add_generation_prompt=True)
            upto = self.template.render(messages[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(prompt) and full.startswith(upto)):
                # A template that rewrites earlier turns (some drop past reasoning): learn
                # the last answer only, after exactly the prompt llama.cpp will be given.
                last = max(j for j, m in enumerate(messages) if m.role == "assistant")
                prompt = self.template.render(messages[:last], add_generation_prompt=True)
                answer = messages[last].content + self._end_of_turn()
                full, spans = prompt + answer, [(len(prompt), len(prompt) + len(answer))]
                break
            spans.append((len(prompt), len(upto)))
        ids: list[int] = []
        targets: list[bool] = []
        bos_text = self.template.bos_token
        if self.add_bos and not (bos_text and full.startswith(bos_text)):
            ids.append(self.vocab.bos_id)
            targets.append(False)
        at = 0
        for start, end in spans:
            for text, is_target in ((full[at:start], False), (full[start:end], True)):
                if text:
                    piece = self.vocab.tokenize(text)
                    ids.extend(piece)
                    targets.extend([is_target] * len(piece))
            at = end
        if full[at:]:
            piece = self.vocab.tokenize(full[at:])
            ids.extend(piece)
            targets.extend([False] * len(piece))
        return ids, targets

    def _end_of_turn(self) -> str:
        return self.template.eos_token or self.vocab.token_text(self.vocab.eos_id)
