"""``bastion export``: a model or fine-tune, ready for another runtime."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import get_engine, json_option
from engine.cli.output import emit_json
from engine.models.exports import TARGETS


@click.command("export")
@click.argument("model_id", metavar="MODEL")
@click.option("--to", "target", required=True, type=click.Choice(TARGETS), help="The runtime.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder to write into (default: <home>/exports/MODEL/TARGET).",
)
@json_option
def export(model_id: str, target: str, out: Path | None, as_json: bool) -> None:
    """Write what Ollama, llama-server or vLLM needs to run MODEL (a fine-tune keeps its
    adapter), or with --to gguf a fine-tune merged into one GGUF for tools without adapters."""
    from engine.cli.common import cancel_on_signals
    from engine.cli.progress import ProgressBar
    from engine.jobs import JobContext

    engine = get_engine()
    bar = ProgressBar("tensors")
    job = JobContext(on_progress=bar)
    with cancel_on_signals(job):
        try:
            result = engine.export_model(model_id, target, out, job)
        finally:
            bar.close()
    if as_json:
        emit_json(result.to_public())
        return
    for name in result.files:
        click.echo(f"wrote {name}")
    click.echo(f"\nRun it with:\n  {result.command}")
