"""The training area as the engine facade uses it: datasets, fine-tuning, runs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from engine.jobs import JobContext
from engine.models.registry import ModelRegistry
from engine.models.tokenizer import token_counter
from engine.store.db import Database
from engine.train.finetune import Complete, FineTuner, FinetuneRequest
from engine.train.runs import RunRecord, RunStore

DEFAULT_MAX_TOKENS = 1024


class Training:
    """Dataset checks and preparation, and fine-tuning runs."""

    def __init__(
        self, models: ModelRegistry, db: Database, home: Path, complete: Complete | None = None
    ) -> None:
        self._models = models
        self.runs = RunStore(db)
        self._tuner = FineTuner(models, self.runs, home, complete)

    def finetune(self, request: FinetuneRequest, ctx: JobContext | None = None) -> dict[str, Any]:
        """Train a LoRA adapter in a child process, export it for llama.cpp and register it.

        Returns the contract's ``finetune`` document (plus details: data, report path,
        side-by-side answers). See ``engine.train.finetune``.

        Raises:
            InvalidInput / AlreadyExists / NotFound: refused before training started.
            Cancelled: stopped by ``ctx``; a checkpoint is kept for ``resume``.
            OperationFailed: out of memory, or the trainer died (checkpoint kept).
        """
        return self._tuner.run(request, ctx)

    def list_runs(self) -> list[RunRecord]:
        return self.runs.list()

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
