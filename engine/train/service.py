"""The training area as the engine facade uses it: datasets, fine-tuning, runs."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from engine.jobs import JobContext
from engine.models.registry import ModelRegistry
from engine.models.tokenizer import token_counter
from engine.store.db import Database
from engine.train.continuing import Evaluate
from engine.train.finetune import Complete, FineTuner, FinetuneRequest
from engine.train.prepare import PrepareReport
from engine.train.results import DatasetCheck, DatasetPreview, FinetuneResult, LossCurve
from engine.train.runs import RunRecord, RunStore

DEFAULT_MAX_TOKENS = 1024


class Training:
    """Dataset checks and preparation, and fine-tuning runs."""

    def __init__(
        self,
        models: ModelRegistry,
        db: Database,
        home: Path,
        complete: Complete | None = None,
        evaluate: Evaluate | None = None,
    ) -> None:
        self._models = models
        self.runs = RunStore(db)
        self._tuner = FineTuner(models, self.runs, home, complete, evaluate)

    def finetune(self, request: FinetuneRequest, ctx: JobContext | None = None) -> FinetuneResult:
        """Train a LoRA adapter in a child process, export it for llama.cpp and register it.

        Returns the new model, the losses, the report's path and side-by-side answers.
        See ``engine.train.finetune``.

        Raises:
            InvalidInput / AlreadyExists / NotFound: refused before training started.
            Cancelled: stopped by ``ctx``; a checkpoint is kept for ``resume``.
            OperationFailed: out of memory, or the trainer died (checkpoint kept).
        """
        return self._tuner.run(request, ctx)

    def list_runs(self) -> list[RunRecord]:
        return self.runs.list()

    def get_run(self, name: str) -> RunRecord | None:
        """The run of that name, or None."""
        return self.runs.get(name)

    def loss_curve(self, name: str) -> LossCurve:
        """The run's losses so far (empty for an unknown run or one not started)."""
        from engine.train.report import read_metrics

        run = self.runs.get(name)
        if run is None:
            return LossCurve([], [])
        return LossCurve(*read_metrics(run.run_dir / "metrics.jsonl"))

    def check_dataset(
        self,
        path: Path,
        fmt: str | None = None,
        model_id: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> DatasetCheck:
        """Validate and summarize a training file, counting tokens with the model's tokenizer.

        ``bad_lines`` lists every bad line.
        """
        from engine.train.datasets import read_dataset
        from engine.train.pii import scan

        entry = self._models.get(model_id or self._models.default_id())
        report = read_dataset(Path(path), fmt, token_counter(entry.path), max_tokens)
        pii: Counter[str] = Counter()
        for example in report.examples:
            for _role, content in example.turns:
                pii.update(scan(content))
        return DatasetCheck(
            format=report.format,
            examples=len(report.examples),
            tokens=report.tokens,
            bad_lines=list(report.bad_lines),
            too_long=report.too_long,
            pii=dict(pii),
            length=report.length,
            tokens_estimated=report.tokens_estimated,
            too_long_policy=report.too_long_policy,
            max_tokens=report.max_tokens,
            tokenizer=entry.id,
        )

    def prepare_dataset(
        self,
        path: Path,
        out: Path,
        fmt: str | None = None,
        redact: bool = True,
        val_fraction: float = 0.1,
    ) -> PrepareReport:
        """De-duplicate, redact personal data and split; see ``engine.train.prepare``."""
        from engine.train.datasets import read_dataset
        from engine.train.prepare import prepare

        report = read_dataset(Path(path), fmt)
        return prepare(report, Path(out), redact_pii=redact, val_fraction=val_fraction)

    def preview_dataset(
        self,
        path: Path,
        model_id: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        val_fraction: float = 0.1,
        ctx: JobContext | None = None,
    ) -> DatasetPreview:
        """Check ``path`` and dry-run its preparation, to show before training what it holds.

        Redaction is always on here: the preview shows what it would remove even when the
        user means to turn it off. The dry run's folder (whose report holds the personal
        data removed) is deleted before this returns.
        """
        ctx = ctx or JobContext()
        ctx.report(0, 2, "checking the data")
        check = self.check_dataset(path, model_id=model_id, max_tokens=max_tokens)
        ctx.check_cancelled()
        prepared = None
        if check.examples:
            ctx.report(1, 2, "trying redaction and de-duplication")
            with tempfile.TemporaryDirectory(prefix="bastion-preview-") as folder:
                prepared = self.prepare_dataset(
                    path, Path(folder) / "prepared.jsonl", val_fraction=val_fraction
                )
        ctx.report(2, 2, "done")
        return DatasetPreview(check, prepared, val_fraction)
