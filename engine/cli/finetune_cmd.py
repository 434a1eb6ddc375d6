"""``bastion finetune``: train a LoRA adapter on your data and chat with it at once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from engine.cli.common import cancel_on_signals, get_engine, json_option
from engine.cli.output import emit_json, note
from engine.cli.progress import ProgressBar
from engine.errors import Cancelled
from engine.jobs import JobContext, Progress
from engine.protocol import Event

_PLAIN_EVERY_S = 10.0


class _TrainingProgress:
    """A bar on a terminal; otherwise a line per status and one every ten seconds."""

    def __init__(self) -> None:
        self.bar = ProgressBar("steps")
        self._last_label = ""
        self._last_line = 0.0

    def __call__(self, p: Progress) -> None:
        if self.bar._tty:
            self.bar(p)
            return
        if p.detail is None:  # the parent's own steps (checks, preparation): quick, quiet
            return
        now = time.monotonic()
        is_step = p.detail.get("event") == Event.PROGRESS
        if (not is_step and p.label != self._last_label) or (
            is_step and now - self._last_line >= _PLAIN_EVERY_S
        ):
            self._last_label = p.label
            self._last_line = now
            where = f"step {int(p.done)}/{int(p.total)} " if p.total and is_step else ""
            note(f"{where}{p.label}")

    def close(self) -> None:
        self.bar.close()


@click.command("finetune")
@click.option("--name", required=True, help="Id of the new model (base + adapter).")
@click.option("--base", help="Registered GGUF model id, Hugging Face folder, or cached hub id.")
@click.option("--data", type=click.Path(path_type=Path), help="Training JSONL (any format).")
@click.option(
    "--from",
    "from_model",
    help="Continue from this fine-tune: its base, LoRA shape and trained weights.",
)
@click.option(
    "--golden",
    type=click.Path(path_type=Path),
    help="A golden set (eval run format): afterwards, score this model and the one it improves on.",
)
@click.option("--resume", is_flag=True, help="Continue the stopped or failed run NAME.")
@click.option(
    "--preset",
    type=click.Choice(["quick", "balanced", "thorough"]),
    default="balanced",
    show_default=True,
    help="Defaults for the settings below.",
)
@click.option("--epochs", type=float, help="Passes over the data.")
@click.option("--max-steps", type=int, help="Optimizer steps (instead of --epochs).")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--rank", type=int, help="LoRA rank (alpha follows as 2 x rank).")
@click.option("--alpha", type=float, help="LoRA alpha.")
@click.option("--dropout", type=float, help="LoRA dropout.")
@click.option("--batch-size", type=int, help="Examples per optimizer step.")
@click.option("--max-length", type=int, help="Tokens per example; longer ones are cut.")
@click.option("--tokens-per-batch", type=int, help="Tokens per forward pass (memory).")
@click.option("--save-every", type=int, help="Steps between checkpoints.")
@click.option("--seed", type=int, help="Seed for order, split and initialization.")
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Save memory.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "unsloth", "peft"]),
    default="auto",
    show_default=True,
)
@click.option("--format", "fmt", type=click.Choice(["chat", "sharegpt", "alpaca", "text"]))
@click.option("--no-redact", is_flag=True, help="Keep personal data (not recommended).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 0.5), default=0.1, show_default=True)
@click.option("--gguf", "gguf", help="Registered GGUF to pair a Hugging Face base with.")
@click.option("--merged", is_flag=True, help="Also write a merged Hugging Face model.")
@json_option
def finetune(
    name: str,
    base: str | None,
    data: Path | None,
    from_model: str | None,
    golden: Path | None,
    resume: bool,
    preset: str,
    backend: str,
    fmt: str | None,
    no_redact: bool,
    val_fraction: float,
    gguf: str | None,
    merged: bool,
    as_json: bool,
    **settings: Any,
) -> None:
    """Train a LoRA adapter, export it for llama.cpp and register it as model NAME."""
    from engine.train.finetune import FinetuneRequest
    from engine.train.spec import hyper_from

    engine = get_engine()
    request = FinetuneRequest(
        name=name,
        base=base,
        data=data,
        hyper=hyper_from(preset, **settings),
        backend=backend,
        fmt=fmt,
        redact=not no_redact,
        val_fraction=val_fraction,
        merged=merged,
        resume=resume,
        gguf=gguf,
        from_model=from_model,
        golden=golden,
    )
    progress = _TrainingProgress()
    job = JobContext(on_progress=progress)
    with cancel_on_signals(job) as seen:
        try:
            result = engine.training.finetune(request, job)
        except Cancelled as exc:
            progress.close()
            note(str(exc))
            raise SystemExit(128 + seen.get("signal", 2)) from None
        finally:
            progress.close()
    if as_json:
        emit_json(result.to_public())
        return
    before, after = result.eval_loss_before, result.eval_loss_after
    click.echo(
        f"model {result.model} is ready: `bastion chat -m {result.model}`\n"
        f"backend {result.backend} ({result.backend_reason}); "
        f"train loss {result.train_loss:.3f}"
        + (f"; validation loss {before:.3f} -> {after:.3f}" if before and after else "")
        + f"; {result.tokens_per_second:.0f} tokens/s\n"
        f"report: {result.report}"
    )
    if result.golden:
        click.echo(f"golden set ({result.golden['set']}):")
        for model, scores in result.golden["models"].items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if v is not None)
            click.echo(f"  {model}: {shown}")
