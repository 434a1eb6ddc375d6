"""``bastion dataset from-feedback``: what users said about answers, as a training set.

Three kinds of feedback become chat examples (``{"messages": [...]}``, the format every
Bastion command reads), each line also carrying where it came from in ``"source"``:

- an answer with thumbs up: the conversation up to it, the answer as it was;
- a corrected answer (thumbs or not): the same, with the user's text as the answer — the
  model's own is kept in ``source.rejected``, so the pair can also train a preference;
- an A/B pick: the prompt and the winning answer (the loser in ``source.rejected``).

Not used, and counted: thumbs down without a correction (the data says what not to say,
not what to say), ties, and answers whose conversation cannot be made a valid example (an
empty answer). Earlier turns of a conversation are kept as context, with their own
corrections applied; where the turns stop alternating (a question left without an answer)
the context starts after the break.

The file is written whole or not at all. Personal data is counted here and removed by
``dataset prepare`` / ``finetune`` like in any other set (unless ``--no-redact``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.paths import atomic_write_bytes
from engine.store.conversations import ConversationStore, Message
from engine.store.feedback import FeedbackStore, parse_since


@dataclass
class FeedbackDataset:
    out: str
    examples: int = 0
    from_ratings: int = 0
    from_corrections: int = 0
    from_ab: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    pii: dict[str, int] = field(default_factory=dict)
    since: str | None = None

    def to_public(self) -> dict[str, Any]:
        return asdict(self)


def _context(messages: list[Message], upto: int, system: str | None) -> list[dict[str, str]]:
    """The turns before ``messages[upto]`` (an answer), alternating user/assistant."""
    turns: list[dict[str, str]] = []
    for message in messages[:upto]:
        if message.role == "system":
            continue
        content = message.correction or message.content
        if turns and turns[-1]["role"] == message.role:
            turns = []  # the turns broke off here: keep only what follows
        if message.role == "assistant" and not turns:
            continue  # an answer without its question
        turns.append({"role": message.role, "content": content})
    while turns and turns[-1]["role"] != "user":
        turns.pop()
    if system:
        turns.insert(0, {"role": "system", "content": system})
    return turns


def build(
    conversations: ConversationStore, feedback: FeedbackStore, out: Path, since: str | None
) -> FeedbackDataset:
    """Write the feedback given at or after ``since`` (a date) to ``out`` as JSONL."""
    from engine.train.pii import scan

    after = parse_since(since)
    result = FeedbackDataset(out=str(out), since=after)
    skipped: Counter[str] = Counter()
    lines: list[dict[str, Any]] = []
    by_conversation: dict[int, list[Message]] = {}
    for message_id, conversation_id in feedback.answers_with_feedback(after):
        if conversation_id not in by_conversation:
            by_conversation[conversation_id] = conversations.messages(conversation_id)
        messages = by_conversation[conversation_id]
        index = next(i for i, m in enumerate(messages) if m.id == message_id)
        answer = messages[index]
        if answer.correction is None and answer.rating != 1:
            skipped["thumbs_down" if answer.rating == -1 else "not_rated"] += 1
            continue
        text = answer.correction or answer.content
        system = conversations.get(conversation_id).system_prompt
        turns = _context(messages, index, system)
        if not text.strip() or not turns or turns[-1]["role"] != "user":
            skipped["unusable"] += 1
            continue
        source: dict[str, Any] = {
            "kind": "correction" if answer.correction else "rating",
            "message_id": answer.id,
            "conversation_id": conversation_id,
            "model": answer.model,
        }
        if answer.correction:
            source["rejected"] = answer.content
            result.from_corrections += 1
        else:
            result.from_ratings += 1
        lines.append(
            {"messages": [*turns, {"role": "assistant", "content": text}], "source": source}
        )
    for vote in feedback.votes(after):
        if vote.winner == "tie":
            skipped["ties"] += 1
            continue
        won = vote.winner == "a"
        chosen, rejected = (vote.answer_a, vote.answer_b) if won else (vote.answer_b, vote.answer_a)
        if not chosen.strip():
            skipped["unusable"] += 1
            continue
        turns = [{"role": r, "content": c} for r, c in vote.messages]
        lines.append(
            {
                "messages": [*turns, {"role": "assistant", "content": chosen}],
                "source": {
                    "kind": "ab",
                    "vote_id": vote.id,
                    "model": vote.model_a if won else vote.model_b,
                    "rejected": rejected,
                },
            }
        )
        result.from_ab += 1
    pii: Counter[str] = Counter()
    for line in lines:
        for turn in line["messages"]:
            pii.update(scan(turn["content"]))
    body = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    atomic_write_bytes(out, body.encode("utf-8"))
    result.examples = len(lines)
    result.skipped = dict(skipped)
    result.pii = dict(pii)
    return result
