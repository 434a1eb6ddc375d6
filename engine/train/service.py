"""The training area as the engine facade uses it: checking and preparing datasets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from engine.models.registry import ModelRegistry
from engine.models.tokenizer import token_counter

DEFAULT_MAX_TOKENS = 1024


class Training:
    """Dataset checks and preparation; fine-tuning jobs come next."""

    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def check_dataset(
        self,
        path: Path,
        fmt: str | None = None,
        model_id: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> dict[str, Any]:
        """Validate and summarize a training file, counting tokens with the model's tokenizer.

        Returns the contract's ``dataset check`` document; ``bad_lines`` lists every bad line.
        """
        from engine.train.datasets import read_dataset
        from engine.train.pii import scan

        entry = self._models.get(model_id or self._models.default_id())
        report = read_dataset(Path(path), fmt, token_counter(entry.path), max_tokens)
        pii: Counter[str] = Counter()
        for example in report.examples:
            for _role, content in example.turns:
                pii.update(scan(content))
        data = report.to_public(dict(pii))
        data["tokenizer"] = entry.id
        return data

    def prepare_dataset(
        self,
        path: Path,
        out: Path,
        fmt: str | None = None,
        redact: bool = True,
        val_fraction: float = 0.1,
    ) -> dict[str, Any]:
        """De-duplicate, redact personal data and split; see ``engine.train.prepare``."""
        from engine.train.datasets import read_dataset
        from engine.train.prepare import prepare

        report = read_dataset(Path(path), fmt)
        result = prepare(report, Path(out), redact_pii=redact, val_fraction=val_fraction)
        data = result.to_public()
        data["bad_lines"] = [{"line": b.line, "error": b.error} for b in report.bad_lines]
        return data
