"""``bastion dataset``: checking and preparing training data before any training."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import get_engine, json_option
from engine.cli.output import emit_json, note

FORMATS = click.Choice(["chat", "sharegpt", "alpaca", "text"])


@click.group("dataset")
def dataset_group() -> None:
    """Training data: validate, de-duplicate, redact personal data, split."""


@dataset_group.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=FORMATS, help="Skip detection: the file is in this format.")
@click.option("-m", "--model", "model_id", help="Count tokens with this model's tokenizer.")
@click.option(
    "--max-tokens",
    type=click.IntRange(16),
    default=1024,
    show_default=True,
    help="Longest example training will take whole.",
)
@json_option
def check(
    path: Path, fmt: str | None, model_id: str | None, max_tokens: int, as_json: bool
) -> None:
    """Validate and summarize a training file; exit 2 if any line is bad."""
    report = get_engine().training.check_dataset(path, fmt, model_id, max_tokens)
    if as_json:
        emit_json(report.to_public())
    else:
        click.echo(
            f"{report.format}: {report.examples} examples, {report.tokens} tokens "
            f"({report.too_long} longer than {max_tokens})"
        )
        pii = ", ".join(f"{k} {v}" for k, v in sorted(report.pii.items())) or "none found"
        click.echo(f"personal data: {pii}")
        for bad in report.bad_lines[:50]:
            note(f"line {bad.line}: {bad.error}")
        if len(report.bad_lines) > 50:
            note(f"... and {len(report.bad_lines) - 50} more bad lines")
    if not report.usable:
        raise SystemExit(2)


@dataset_group.command("prepare")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write the prepared JSONL.",
)
@click.option("--format", "fmt", type=FORMATS, help="Skip detection: the file is in this format.")
@click.option("--no-redact", is_flag=True, help="Keep personal data (not recommended).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 0.5), default=0.1, show_default=True)
@json_option
def prepare(
    path: Path, out: Path, fmt: str | None, no_redact: bool, val_fraction: float, as_json: bool
) -> None:
    """De-duplicate, redact personal data and split into train and validation."""
    report = get_engine().training.prepare_dataset(path, out, fmt, not no_redact, val_fraction)
    if as_json:
        emit_json(report.to_public())
        return
    red = ", ".join(f"{k} {v}" for k, v in sorted(report.redactions.items())) or "none"
    click.echo(
        f"{report.examples_out} of {report.examples_in} examples kept "
        f"({report.duplicates_removed} duplicates removed): {report.train} train, "
        f"{report.validation} validation; redacted: {red}"
    )
    click.echo(f"wrote {out}")
    if report.bad_lines:
        note(f"{len(report.bad_lines)} bad lines were left out (see: bastion dataset check)")


@dataset_group.command("from-feedback")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Where to write the JSONL."
)
@click.option("--since", help="Only feedback given on or after this date (YYYY-MM-DD).")
@json_option
def from_feedback(out: Path, since: str | None, as_json: bool) -> None:
    """Thumbs-up answers, corrected answers and A/B picks as a chat training set."""
    result = get_engine().feedback_dataset(out, since)
    if as_json:
        emit_json(result.to_public())
        return
    skipped = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(result.skipped.items()))
    click.echo(
        f"{result.examples} examples: {result.from_ratings} rated good, "
        f"{result.from_corrections} corrected, {result.from_ab} A/B picks"
        + (f"; not used: {skipped}" if skipped else "")
    )
    pii = ", ".join(f"{k} {v}" for k, v in sorted(result.pii.items()))
    if pii:
        note(f"personal data found ({pii}): `bastion finetune` redacts it unless --no-redact")
    click.echo(f"wrote {out}; review it with `bastion dataset check {out}`")
    if not result.examples:
        note("no usable feedback yet: rate or correct answers in chat, or vote in A/B")
