"""What the training facade returns: typed results that the CLI turns into JSON at its edge."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing this module stays cheap
    from engine.train.datasets import BadLine, LengthStats
    from engine.train.prepare import PrepareReport


@dataclass(frozen=True)
class DatasetCheck:
    """A training file's check: its format, sizes, every bad line and the personal data found."""

    format: str
    examples: int
    tokens: int
    bad_lines: list[BadLine]
    too_long: int
    pii: dict[str, int]
    length: LengthStats
    tokens_estimated: bool
    too_long_policy: str
    max_tokens: int
    tokenizer: str

    @property
    def usable(self) -> bool:
        """Whether training can start from it: examples, and no bad line."""
        return self.examples > 0 and not self.bad_lines

    def to_public(self) -> dict[str, Any]:
        """The contract's ``bastion dataset check --json`` document."""
        return {
            "format": self.format,
            "examples": self.examples,
            "tokens": self.tokens,
            "bad_lines": [{"line": b.line, "error": b.error} for b in self.bad_lines],
            "too_long": self.too_long,
            "pii": dict(self.pii),
            "length": self.length.to_public(),
            "tokens_estimated": self.tokens_estimated,
            "too_long_policy": self.too_long_policy,
            "max_tokens": self.max_tokens,
            "tokenizer": self.tokenizer,
        }


@dataclass(frozen=True)
class DatasetPreview:
    """What the data would become: the check, and a dry run of redaction and de-duplication.

    ``prepared`` is None when there was nothing to prepare (no usable example). Its
    redaction sample holds the very personal data that would be removed (that is its
    purpose: a before/after to review); it lives only in this object, the dry run's
    files are deleted before it is returned.
    """

    check: DatasetCheck
    prepared: PrepareReport | None
    val_fraction: float


@dataclass(frozen=True)
class LossCurve:
    """A run's losses as (step, loss) points, from its ``metrics.jsonl``."""

    train: list[tuple[int, float]]
    validation: list[tuple[int, float]]


def _perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50))


@dataclass(frozen=True)
class FinetuneResult:
    """A finished fine-tune: the new model, how training went, and where its report is.

    Also kept as the run's record (``to_public`` in the database), so the fields after
    ``report`` are optional: older records may lack them.
    """

    model: str
    adapter: str
    backend: str
    train_loss: float
    eval_loss_before: float | None
    eval_loss_after: float | None
    tokens_per_second: float
    report: str = ""
    backend_reason: str | None = None
    device: str | None = None
    base: str | None = None
    steps: int | None = None
    train_seconds: float | None = None
    adapter_dir: str | None = None
    merged_dir: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # what the data became (counts)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # base vs tuned answers
    comparisons_note: str | None = None
    # The golden set answered by the new model and the one it improves on (see finetune).
    golden: dict[str, Any] | None = None
    continued_from: str | None = None  # the fine-tune this one continued
    created: str | None = None

    @property
    def perplexity_before(self) -> float | None:
        return _perplexity(self.eval_loss_before)

    @property
    def perplexity_after(self) -> float | None:
        return _perplexity(self.eval_loss_after)

    def to_public(self) -> dict[str, Any]:
        """The contract's ``bastion finetune --json`` document."""
        data = asdict(self)
        data["perplexity_before"] = self.perplexity_before
        data["perplexity_after"] = self.perplexity_after
        return data

    @classmethod
    def from_public(cls, data: dict[str, Any]) -> FinetuneResult:
        """A result from its stored document (unknown keys ignored, missing ones defaulted)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
