"""``bastion models``: list, import, inspect and tune installed models."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from engine.cli.common import get_engine, json_option
from engine.cli.output import emit_json, human_count, human_size, table


@click.group("models")
def models_group() -> None:
    """Installed GGUF models."""


@models_group.command("list")
@json_option
def list_models(as_json: bool) -> None:
    """List installed models (base models and fine-tunes)."""
    entries = get_engine().list_models()
    if as_json:
        emit_json([e.to_public() for e in entries])
        return
    if not entries:
        click.echo("No models installed. Import one with: bastion models import FILE.gguf")
        return
    table(
        ["ID", "ARCH", "QUANT", "PARAMS", "CONTEXT", "SIZE", "BASE"],
        [
            [
                e.id,
                e.arch,
                e.quant,
                human_count(e.params),
                e.context_length,
                human_size(e.size_bytes),
                e.base or "",
            ]
            for e in entries
        ],
    )


@models_group.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--id", "model_id", help="Id to register the model under (default: from the file name)."
)
@click.option(
    "--copy", is_flag=True, help="Copy the file into Bastion's home instead of using it in place."
)
@click.option(
    "--base", metavar="ID", help="PATH is a LoRA adapter for this model: register a fine-tune."
)
@json_option
def import_model(
    path: Path, model_id: str | None, copy: bool, base: str | None, as_json: bool
) -> None:
    """Validate a GGUF file from its header and register it."""
    entry = get_engine().import_model(path, model_id, copy=copy, base=base)
    if as_json:
        emit_json(entry.to_public())
    else:
        click.echo(
            f"Imported {entry.id}: {entry.arch}, {human_count(entry.params)} parameters, "
            f"{entry.quant}, context {entry.context_length}, {human_size(entry.size_bytes)}"
        )


@models_group.command("info")
@click.argument("model_id")
@json_option
def model_info(model_id: str, as_json: bool) -> None:
    """Metadata, chat template and hardware fit of a model."""
    info = get_engine().model_info(model_id)
    if as_json:
        emit_json(info.to_public())
        return
    entry, fit, load, hw = info.entry, info.fit, info.load, info.hardware
    lines = [
        ("id", entry.id),
        ("name", info.name or "-"),
        ("file", entry.path),
        ("architecture", entry.arch),
        ("parameters", f"{human_count(entry.params)} ({entry.params:,})"),
        ("quantization", entry.quant),
        ("size", human_size(entry.size_bytes)),
        ("context length", f"{entry.context_length} (loads with {load.context})"),
        (
            "chat template",
            "from the model file"
            if entry.chat_template is not None
            else "none in the file; ChatML is used",
        ),
        ("base / adapter", f"{entry.base} + {entry.adapter}" if entry.base else "-"),
        ("threads", load.threads),
        ("gpu layers", load.gpu_layers),
        (
            "memory needed",
            f"about {human_size(fit.estimated_bytes)} "
            f"({'fits' if fit.fits_in_ram else 'does NOT fit'} in "
            f"{human_size(hw.ram_available_bytes)} of free RAM); runs on {fit.runs_on}",
        ),
        (
            "machine",
            f"{hw.cpu}, {hw.physical_cores} cores, "
            f"{human_size(hw.ram_total_bytes)} RAM, "
            + (", ".join(f"{g.name} {human_size(g.total_bytes)}" for g in hw.gpus) or "no GPU"),
        ),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key.ljust(width)}  {value}")


def _setting(value: str | None, name: str) -> int | str | None:
    """Parse a settings option: a number, or 'auto' to clear the override."""
    if value is None:
        return "unchanged"
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(
            f"expected a number or 'auto', not {value!r}", param_hint=f"--{name}"
        ) from None


@models_group.command("set")
@click.argument("model_id")
@click.option("--gpu-layers", help="Layers to offload to the GPU (a number or 'auto').")
@click.option("--context", help="Context window in tokens (a number or 'auto').")
@click.option("--threads", help="CPU threads (a number or 'auto').")
@json_option
def set_model(
    model_id: str, gpu_layers: str | None, context: str | None, threads: str | None, as_json: bool
) -> None:
    """Override how a model is loaded."""
    changes = {
        key: parsed
        for key, raw in (("gpu_layers", gpu_layers), ("context", context), ("threads", threads))
        if (parsed := _setting(raw, key.replace("_", "-"))) != "unchanged"
    }
    entry = get_engine().set_model_settings(model_id, **changes)  # type: ignore[arg-type]
    if as_json:
        emit_json(entry.to_public())
    else:
        shown = {k: "auto" if v is None else v for k, v in asdict(entry.settings).items()}
        click.echo(
            f"{entry.id}: gpu layers {shown['gpu_layers']}, context {shown['context']}, "
            f"threads {shown['threads']}"
        )


@models_group.command("remove")
@click.argument("model_id")
@json_option
def remove_model(model_id: str, as_json: bool) -> None:
    """Forget a model (its file is not deleted)."""
    entry = get_engine().remove_model(model_id)
    if as_json:
        emit_json(entry.to_public())
    else:
        click.echo(f"Removed {entry.id} (the file {entry.path} is still there)")


@models_group.command("search")
@click.argument("text")
@click.option("--limit", default=10, show_default=True, help="Repositories to list (1-50).")
@json_option
def search_hub(text: str, limit: int, as_json: bool) -> None:
    """Find GGUF models on the Hugging Face Hub (connects to the hub, and only to it)."""
    repos = get_engine().search_hub(text, limit)
    if as_json:
        emit_json([r.to_public() for r in repos])
        return
    if not repos:
        click.echo(f"No GGUF repositories on the hub match {text!r}.")
        return
    fits = {"gpu": "fits GPU", "ram": "fits RAM", "no": "TOO BIG", None: "?"}
    for repo in repos:
        downloads = "" if repo.downloads is None else f", {repo.downloads:,} downloads"
        click.echo(f"{repo.repo}  (licence {repo.license or 'not stated'}{downloads})")
        for f in repo.files:
            click.echo(f"  {f.quant or '-':<8} {human_size(f.size):>9}  {fits[f.fits]:<9} {f.name}")
    click.echo("\nDownload one with: bastion models pull OWNER/NAME:QUANT")


@models_group.command("pull")
@click.argument("spec", metavar="OWNER/NAME[:FILE|QUANT]")
@click.option("--id", "model_id", help="Id to register the model under (default: the file name).")
@json_option
def pull(spec: str, model_id: str | None, as_json: bool) -> None:
    """Download a GGUF model from the Hugging Face Hub: resumable, checked, registered."""
    from engine.cli.common import cancel_on_signals
    from engine.cli.progress import ProgressBar
    from engine.jobs import JobContext

    engine = get_engine()
    bar = ProgressBar("bytes")
    job = JobContext(on_progress=bar)
    with cancel_on_signals(job):
        try:
            entry = engine.pull_model(spec, model_id, job)
        finally:
            bar.close()
    if as_json:
        emit_json(entry.to_public())
    else:
        click.echo(
            f"Pulled {entry.id}: {entry.arch}, {human_count(entry.params)} parameters, "
            f"{entry.quant}, {human_size(entry.size_bytes)} ({entry.path})"
        )


@models_group.command("add-remote")
@click.argument("name")
@click.option("--url", required=True, help="The server's OpenAI API, e.g. http://gpu:8000/v1.")
@click.option("--model", "remote_model", help="Its model id (default: the first it lists).")
@click.option(
    "--api-key-from-keyring",
    "secret",
    metavar="SECRET",
    help="The keyring secret holding its API key (`bastion secrets set SECRET`).",
)
@json_option
def add_remote(
    name: str, url: str, remote_model: str | None, secret: str | None, as_json: bool
) -> None:
    """Use a model of an OpenAI-compatible server (vLLM, llama-server, TGI, another Bastion)
    as model NAME: chat, collections, the desktop and the server then use it like a local one.
    The guard lets Bastion reach that server's host, and only it, during its calls."""
    entry = get_engine().add_remote_model(name, url, remote_model, secret)
    if as_json:
        emit_json(entry.to_public())
    else:
        assert entry.remote is not None
        click.echo(f"Added {entry.id}: {entry.remote['model']} at {entry.remote['url']}")
