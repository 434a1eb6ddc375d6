"""Training sets in JSONL: reading, format detection, validation of every line, and a summary.

Four formats are understood, detected per file from the keys of its lines (or forced with
``fmt``): ``chat`` (OpenAI ``{"messages": [{"role", "content"}]}``), ``sharegpt``
(``{"conversations": [{"from", "value"}]}``), ``alpaca`` (``{"instruction", "input"?,
"output"}``) and ``text`` (``{"text"}``, for continued pre-training). Every example becomes
a tuple of ``(role, content)`` turns; roles are ``system``, ``user`` and ``assistant``, and
``text`` for plain text.

The file's format is the most common shape among its first 1,000 JSON objects (the
earliest one wins a tie); a line of another known shape is reported as "mixed formats"
rather than silently converted, because a file that mixes shapes is usually two files
concatenated by mistake.

Conversations (chat and sharegpt) are held to what chat templates and the loss need, and
every rule broken is reported on its line:

- an optional system message comes first and only first (templates put it in one place);
- then user and assistant turns alternate, starting with the user (several templates —
  Llama 2, Mistral, Gemma — raise on two turns of the same role, and merging them
  silently would change what the model learns);
- at least one assistant turn (the loss is computed on the assistant's turns only);
- a conversation may end with a user turn: it is kept, it only adds context.

The file is read once, line by line; only the normalized examples stay in memory. A line
longer than ``MAX_LINE_BYTES`` is a bad line: it is skipped in chunks, never held whole. A
line is also bad when it holds an integer of more than 4,300 digits (Python's own limit
for reading one; no training field needs one) or text with half of a surrogate pair
(``"\\ud800"`` alone is valid JSON but not a character, and no tokenizer or UTF-8 file can
take it).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

from engine.errors import InvalidInput, NotFound

FORMATS = ("chat", "sharegpt", "alpaca", "text")
TOO_LONG_POLICY = "truncated to max_tokens at training time"
DEFAULT_MAX_TOKENS = 1024
# The longest line read: 16 MiB is millions of tokens, far past any training sequence,
# and bounds what one line costs in memory (the bytes, their text and the parsed object).
MAX_LINE_BYTES: Final = 16 * 1024 * 1024

TokenCounter = Callable[[list[str]], list[int]]
"""Counts the tokens of each text of a batch."""

Turns = tuple[tuple[str, str], ...]

# Lines looked at before the file's format is decided (they are the only raw objects held).
_DETECT_WINDOW = 1000
_COUNT_BATCH = 512
# Digits of the longest integer read: Python's default limit for int <-> str, kept even
# where that limit is raised, because converting longer ones costs quadratic time.
_MAX_INT_DIGITS = 4300
# How much of a value an error message quotes.
_QUOTE_CHARS = 40
_SKIP_CHUNK = 1024 * 1024
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Characters per token when no tokenizer is given: the usual rule of thumb for English
# with BPE vocabularies; it over-counts code a little and under-counts CJK text.
_CHARS_PER_TOKEN = 4

_CHAT_ROLES = frozenset({"system", "user", "assistant"})
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
_JSON_TYPES = {
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}
_KEYS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
_KNOWN_SHAPES = (
    "no known format: expected 'messages' (chat), 'conversations' (sharegpt), "
    "'instruction' and 'output' (alpaca) or 'text'"
)


@dataclass(frozen=True)
class Example:
    """One training example as turns, with the line it came from (1-based)."""

    turns: Turns
    line: int
    fmt: str


@dataclass(frozen=True)
class BadLine:
    """A line that cannot be used, and why, in words the user can act on."""

    line: int
    error: str


@dataclass(frozen=True)
class LengthStats:
    """Distribution of the examples' lengths in tokens (nearest-rank percentiles)."""

    min: int = 0
    p50: int = 0
    p90: int = 0
    max: int = 0

    def to_public(self) -> dict[str, int]:
        """The statistics as a JSON-ready mapping."""
        return {"min": self.min, "p50": self.p50, "p90": self.p90, "max": self.max}


@dataclass
class DatasetReport:
    """What ``read_dataset`` found: the usable examples, every bad line, and a summary."""

    path: Path
    format: str
    examples: list[Example]
    bad_lines: list[BadLine]
    tokens: int
    tokens_estimated: bool
    too_long: int
    max_tokens: int
    length: LengthStats = field(default_factory=LengthStats)
    too_long_policy: str = TOO_LONG_POLICY

    def to_public(self, pii_counts: Mapping[str, int]) -> dict[str, object]:
        """The ``bastion dataset check --json`` document.

        Args:
            pii_counts: personal data found in the examples, by type (see ``pii.scan_all``).

        Returns:
            The contract's keys (``format``, ``examples``, ``tokens``, ``bad_lines``,
            ``too_long``, ``pii``) plus ``length``, ``tokens_estimated``,
            ``too_long_policy`` and ``max_tokens``.
        """
        return {
            "format": self.format,
            "examples": len(self.examples),
            "tokens": self.tokens,
            "bad_lines": [{"line": b.line, "error": b.error} for b in self.bad_lines],
            "too_long": self.too_long,
            "pii": dict(pii_counts),
            "length": self.length.to_public(),
            "tokens_estimated": self.tokens_estimated,
            "too_long_policy": self.too_long_policy,
            "max_tokens": self.max_tokens,
        }


def example_text(example: Example) -> str:
    """The example as one text, as counted for its length.

    Plain text is itself; a conversation is one ``role: content`` line per turn, which
    stands in for the few tokens a chat template adds around each turn.
    """
    if len(example.turns) == 1 and example.turns[0][0] == "text":
        return example.turns[0][1]
    return "\n".join(f"{role}: {content}" for role, content in example.turns)


def read_dataset(
    path: Path,
    fmt: str | None = None,
    count_tokens: TokenCounter | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> DatasetReport:
    """Read a JSONL training set, check every line, and summarize what is usable.

    Args:
        path: the JSONL file (UTF-8, one JSON object per line; blank lines are ignored).
        fmt: one of ``FORMATS`` to force the format; None detects it.
        count_tokens: the base model's tokenizer as a batch counter; None estimates one
            token per four characters and sets ``tokens_estimated``.
        max_tokens: the training sequence length; longer examples are counted in
            ``too_long`` (they are truncated at training time, not dropped).
        max_line_bytes: longer lines are bad lines, skipped without being held whole.

    Returns:
        The report. An empty dataset is a report with no examples, not an error.

    Raises:
        NotFound: the file does not exist.
        InvalidInput: unknown ``fmt``, a folder, an unreadable file, or bytes that are
            not UTF-8 (the line is named).
    """
    if fmt is not None and fmt not in FORMATS:
        raise InvalidInput(
            f"unknown dataset format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}"
        )
    if max_tokens < 1:
        raise InvalidInput(f"max_tokens must be at least 1, not {max_tokens}")
    bad: list[BadLine] = []
    lines = _lines(path, max_line_bytes)
    window: list[tuple[int, dict[str, Any]]] = []
    chosen = fmt
    if chosen is None:
        for number, text in lines:
            parsed = _parse(text, max_line_bytes)
            if isinstance(parsed, str):
                bad.append(BadLine(number, parsed))
                continue
            window.append((number, parsed))
            if len(window) >= _DETECT_WINDOW:
                break
        chosen = _majority_shape(obj for _, obj in window)
    examples: list[Example] = []

    def take(number: int, obj: dict[str, Any]) -> None:
        turns = _turns(obj, chosen, forced=fmt is not None)
        if not isinstance(turns, str):
            turns = _check_characters(turns)
        if isinstance(turns, str):
            bad.append(BadLine(number, turns))
        else:
            examples.append(Example(turns, number, chosen or "unknown"))

    for number, obj in window:
        take(number, obj)
    window.clear()
    for number, text in lines:  # the rest of the file, after the detection window
        parsed = _parse(text, max_line_bytes)
        if isinstance(parsed, str):
            bad.append(BadLine(number, parsed))
        else:
            take(number, parsed)
    bad.sort(key=lambda b: b.line)
    counts, estimated = _token_counts(examples, count_tokens)
    return DatasetReport(
        path=path,
        format=chosen or "unknown",
        examples=examples,
        bad_lines=bad,
        tokens=sum(counts),
        tokens_estimated=estimated,
        too_long=sum(1 for n in counts if n > max_tokens),
        max_tokens=max_tokens,
        length=_length_stats(counts),
    )


def _lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, str | None]]:
    """The file's non-blank lines with their 1-based numbers, decoded strictly as UTF-8.

    A line longer than ``max_line_bytes`` comes as None (it is skipped, not read whole).
    """
    try:
        fh = path.open("rb")
    except FileNotFoundError as exc:
        raise NotFound(f"no such dataset file: {path}") from exc
    except IsADirectoryError as exc:
        raise InvalidInput(f"{path} is a folder, not a JSONL file") from exc
    except OSError as exc:
        raise InvalidInput(f"dataset file {path} cannot be read: {exc.strerror or exc}") from exc
    with fh:
        number = 0
        while raw := fh.readline(max_line_bytes + 1):
            number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                _skip_rest_of_line(fh)
                yield number, None
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(
                    f"{path} is not UTF-8 text (line {number}, byte {exc.start + 1})",
                    hint="save the file as UTF-8",
                ) from exc
            # A byte order mark starts the file, or each part of files joined with `cat`.
            text = text.removeprefix("\ufeff")
            if text.strip():
                yield number, text


def _skip_rest_of_line(fh: BinaryIO) -> None:
    while (chunk := fh.readline(_SKIP_CHUNK)) and not chunk.endswith(b"\n"):
        pass


class _NumberTooLong(ValueError):
    def __init__(self, digits: int) -> None:
        super().__init__(digits)
        self.digits = digits


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > _MAX_INT_DIGITS:
        raise _NumberTooLong(digits)
    return int(text)


def _parse(text: str | None, max_line_bytes: int) -> dict[str, Any] | str:
    """The line's JSON object, or the reason it is not one."""
    if text is None:
        return f"the line is longer than {max_line_bytes:,} bytes, the limit for one example"
    try:
        value = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        # Some messages end in "at" ("Invalid control character at"): the column follows.
        return f"malformed JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}"
    except _NumberTooLong as exc:
        return (
            f"a number with {exc.digits:,} digits; numbers of more than "
            f"{_MAX_INT_DIGITS:,} digits are not read"
        )
    except ValueError as exc:  # e.g. a lower limit on int digits set for this Python
        return f"unreadable JSON value: {_quote(str(exc))}"
    except RecursionError:
        return "malformed JSON: nested too deeply"
    if not isinstance(value, dict):
        return f"not a JSON object (found {_JSON_TYPES.get(type(value), 'a value')})"
    return value


def _check_characters(turns: Turns) -> Turns | str:
    """``turns``, or what is wrong when a text holds half of a surrogate pair."""
    for i, (role, content) in enumerate(turns, 1):
        bad = _LONE_SURROGATE.search(content)
        if bad is not None:
            where = "the text" if role == "text" else f"turn {i} ({role})"
            return (
                f"{where} holds \\u{ord(bad.group()):04x}, half of a surrogate pair and not a "
                "character (the text was probably cut inside an emoji)"
            )
    return turns


def _quote(value: object) -> str:
    """``repr(value)``, cut short: errors name a value, never repeat a whole line."""
    text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 1] + "…"


def _shape(obj: Mapping[str, Any]) -> str | None:
    """The format a line looks like, from its keys."""
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def _majority_shape(objects: Iterator[dict[str, Any]]) -> str | None:
    counts: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for index, obj in enumerate(objects):
        shape = _shape(obj)
        if shape is not None:
            counts[shape] += 1
            first_seen.setdefault(shape, index)
    if not counts:
        return None
    return max(counts, key=lambda s: (counts[s], -first_seen[s]))


def _turns(obj: dict[str, Any], fmt: str | None, *, forced: bool) -> Turns | str:
    """The line's turns in format ``fmt``, or what is wrong with it."""
    if fmt is None:
        return _KNOWN_SHAPES
    shape = _shape(obj)
    if shape is not None and not any(k in obj for k in _KEYS[fmt]):
        how = "was asked for" if forced else "was detected"
        return f"mixed formats: this line is {shape} but {fmt} {how} for the file"
    if fmt == "chat":
        return _conversation(obj, "messages", "message", "role", "content", None)
    if fmt == "sharegpt":
        return _conversation(obj, "conversations", "turn", "from", "value", _SHAREGPT_ROLES)
    if fmt == "alpaca":
        return _alpaca(obj)
    return _text(obj)


def _conversation(
    obj: Mapping[str, Any],
    key: str,
    noun: str,
    role_key: str,
    content_key: str,
    role_map: Mapping[str, str] | None,
) -> Turns | str:
    if key not in obj:
        return f"missing field '{key}'"
    items = obj[key]
    if not isinstance(items, list):
        return f"'{key}' is not a list"
    if not items:
        return f"'{key}' is empty"
    turns: list[tuple[str, str]] = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            return f"{noun} {i} is not an object"
        missing = [k for k in (role_key, content_key) if k not in item]
        if missing:
            return f"{noun} {i}: missing field(s) {', '.join(repr(k) for k in missing)}"
        raw_role = item[role_key]
        allowed = role_map if role_map is not None else {r: r for r in _CHAT_ROLES}
        role = allowed.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            expected = ", ".join(sorted(allowed))
            return f"{noun} {i}: unknown role {_quote(raw_role)} (expected one of {expected})"
        content = item[content_key]
        if not isinstance(content, str):
            return f"{noun} {i} ({role}): '{content_key}' is not a string"
        turns.append((role, content))
    problem = _conversation_problem(turns, noun)
    return problem if problem is not None else tuple(turns)


def _conversation_problem(turns: list[tuple[str, str]], noun: str) -> str | None:
    """The first rule of a usable conversation that ``turns`` breaks (module docstring)."""
    for i, (role, content) in enumerate(turns, 1):
        if not content.strip():
            return f"empty text: {noun} {i} ({role}) has no content"
        if role == "system" and i > 1:
            return f"{noun} {i}: a system message is allowed only as the first {noun}"
    if not any(role == "assistant" for role, _ in turns):
        return "no assistant turn: a conversation needs one for the model to learn from"
    offset = 1 if turns[0][0] == "system" else 0
    body = turns[offset:]
    if body[0][0] != "user":
        return (
            f"roles do not alternate: {noun} {offset + 1} is from the assistant; "
            "a conversation must start with the user (after an optional system message)"
        )
    for i in range(1, len(body)):
        if body[i][0] == body[i - 1][0]:
            return (
                f"roles do not alternate: {noun}s {offset + i} and {offset + i + 1} are "
                f"both from the {body[i][0]}; user and assistant must take turns"
            )
    return None


def _alpaca(obj: Mapping[str, Any]) -> Turns | str:
    missing = [k for k in ("instruction", "output") if k not in obj]
    if missing:
        return f"missing field(s) {', '.join(repr(k) for k in missing)}"
    values: dict[str, str] = {}
    for key in ("instruction", "input", "output"):
        value = obj.get(key)
        if value is None and key == "input":
            value = ""
        if not isinstance(value, str):
            return f"'{key}' is not a string"
        values[key] = value
    for key in ("instruction", "output"):
        if not values[key].strip():
            return f"empty text: '{key}' is empty"
    user = values["instruction"]
    if values["input"].strip():
        user = f"{user}\n\n{values['input']}"
    return (("user", user), ("assistant", values["output"]))


def _text(obj: Mapping[str, Any]) -> Turns | str:
    if "text" not in obj:
        return "missing field 'text'"
    text = obj["text"]
    if not isinstance(text, str):
        return "'text' is not a string"
    if not text.strip():
        return "empty text: 'text' is empty"
    return (("text", text),)


def _token_counts(
    examples: list[Example], count_tokens: TokenCounter | None
) -> tuple[list[int], bool]:
    """Each example's length in tokens, and whether it is an estimate."""
    if count_tokens is None:
        return [math.ceil(len(example_text(e)) / _CHARS_PER_TOKEN) for e in examples], True
    counts: list[int] = []
    for start in range(0, len(examples), _COUNT_BATCH):
        texts = [example_text(e) for e in examples[start : start + _COUNT_BATCH]]
        batch = count_tokens(texts)
        if len(batch) != len(texts):
            raise ValueError(f"token counter returned {len(batch)} counts for {len(texts)} texts")
        counts.extend(batch)
    return counts, False


def _length_stats(counts: list[int]) -> LengthStats:
    if not counts:
        return LengthStats()
    ordered = sorted(counts)

    def rank(p: float) -> int:
        return ordered[max(math.ceil(p * len(ordered)) - 1, 0)]

    return LengthStats(min=ordered[0], p50=rank(0.5), p90=rank(0.9), max=ordered[-1])
