"""Golden sets: questions with the answers they should get, and how close answers come.

A golden set is JSONL, one item per line::

    {"prompt": "...", "reference": "...", "must_include": ["..."], "file": "...", "page": 3}
    {"messages": [{"role": "user", "content": "..."}], "reference": "..."}

``prompt`` or ``messages`` is required; ``reference`` (the expected answer),
``must_include`` (phrases the answer must contain), and for questions put to a collection
``file`` / ``page`` (the source the answer should cite) are optional. Bad lines are
reported with their numbers, all of them, as ``dataset check`` does.

Scores per answer, each in [0, 1]: exact match and token F1 (SQuAD's normalization:
lower case, no punctuation or articles), ROUGE-L F (Google's ``rouge-score``, Porter
stemming), sentence BLEU (``sacrebleu``, /100), the share of required phrases present
(case-insensitive), and whether a cited source is the expected file (and page).
Means come with 95 % bootstrap intervals (1,000 resamples of the items, seeded).
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput, NotFound
from engine.train.datasets import BadLine

METRICS = ("exact_match", "f1", "rouge_l", "bleu", "must_include", "citation")
BOOTSTRAP = 1000
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class GoldenItem:
    line: int
    messages: tuple[tuple[str, str], ...]  # (role, content)
    reference: str | None = None
    must_include: tuple[str, ...] = ()
    file: str | None = None
    page: int | None = None

    @property
    def question(self) -> str:
        return self.messages[-1][1]


@dataclass
class GoldenSet:
    items: list[GoldenItem] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)


def _item(line: int, data: Any) -> GoldenItem:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if "prompt" in data:
        if not isinstance(data["prompt"], str) or not data["prompt"].strip():
            raise ValueError("prompt must be a non-empty string")
        messages: tuple[tuple[str, str], ...] = (("user", data["prompt"]),)
    elif "messages" in data:
        raw = data["messages"]
        if (
            not isinstance(raw, list)
            or not raw
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in raw
            )
        ):
            raise ValueError("messages must be a list of {role, content}")
        messages = tuple((m["role"], m["content"]) for m in raw)
        if messages[-1][0] != "user":
            raise ValueError("the last message must be the user's")
    else:
        raise ValueError('needs "prompt" or "messages"')
    reference = data.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise ValueError("reference must be a string")
    must = data.get("must_include", [])
    if isinstance(must, str):
        must = [must]
    if not isinstance(must, list) or not all(isinstance(m, str) and m for m in must):
        raise ValueError("must_include must be a list of non-empty strings")
    file, page = data.get("file"), data.get("page")
    if file is not None and not isinstance(file, str):
        raise ValueError("file must be a string")
    if page is not None and (not isinstance(page, int) or isinstance(page, bool) or page < 1):
        raise ValueError("page must be a whole number from 1")
    if reference is None and not must and file is None:
        raise ValueError('nothing to score: give "reference", "must_include" or "file"')
    return GoldenItem(line, messages, reference, tuple(must), file, page)


def load_golden_set(path: Path) -> GoldenSet:
    """Read a golden set; every bad line is kept with its number and reason.

    Raises:
        NotFound: no such file; InvalidInput: not UTF-8, or no item at all.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not UTF-8 text") from None
    found = GoldenSet()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            found.items.append(_item(number, json.loads(line)))
        except ValueError as exc:  # JSONDecodeError is one
            found.bad_lines.append(BadLine(number, str(exc).splitlines()[0][:200]))
    if not found.items and not found.bad_lines:
        raise InvalidInput(f"{path} holds no items", hint="one JSON object per line")
    return found


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's content, or a one-line error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path} is a folder, not a text file") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not UTF-8 text") from None


# -- scores --------------------------------------------------------------------------------


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(answer: str, reference: str) -> float:
    got, want = normalize(answer).split(), normalize(reference).split()
    common = sum((Counter(got) & Counter(want)).values())
    if not got or not want or not common:
        return float(got == want)
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(answer: str, reference: str) -> float:
    return float(_rouge().score(reference, answer)["rougeL"].fmeasure)


def bleu(answer: str, reference: str) -> float:
    from sacrebleu.metrics.bleu import BLEU

    found = BLEU(effective_order=True).sentence_score(answer, [reference]).score
    return min(1.0, float(found) / 100)


def cited(citations: Sequence[dict[str, Any]], item: GoldenItem) -> float:
    for c in citations:
        path = str(c.get("path") or "")
        same_file = path == item.file or path.endswith("/" + str(item.file).lstrip("/"))
        if item.file and same_file and (item.page is None or c.get("page") == item.page):
            return 1.0
    return 0.0


def score(
    answer: str, item: GoldenItem, citations: Sequence[dict[str, Any]] = ()
) -> dict[str, float | None]:
    """Each metric of ``answer`` for ``item``; None where the item gives nothing to compare."""
    ref = item.reference
    lowered = answer.lower()
    return {
        "exact_match": float(normalize(answer) == normalize(ref)) if ref is not None else None,
        "f1": token_f1(answer, ref) if ref is not None else None,
        "rouge_l": rouge_l(answer, ref) if ref is not None else None,
        "bleu": bleu(answer, ref) if ref is not None else None,
        "must_include": (
            sum(m.lower() in lowered for m in item.must_include) / len(item.must_include)
        )
        if item.must_include
        else None,
        "citation": cited(citations, item) if item.file is not None else None,
    }


def mean_with_interval(values: Sequence[float], seed: int = 0) -> dict[str, float] | None:
    """The mean and its 95 % bootstrap interval, or None without values."""
    if not values:
        return None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(BOOTSTRAP))
    return {
        "mean": sum(values) / n,
        "low": means[int(0.025 * BOOTSTRAP)],
        "high": means[int(0.975 * BOOTSTRAP) - 1],
    }
