"""``bastion bundle create``: everything needed to install Bastion where there is no network."""

from __future__ import annotations

from pathlib import Path

import click

from engine.bundle import BACKENDS, LLAMA_BUILDS
from engine.cli.common import get_engine, json_option
from engine.cli.output import emit_json, human_size


@click.group("bundle")
def bundle_group() -> None:
    """Offline install bundles for air-gapped machines."""


@bundle_group.command("create")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--models", "model_ids", default="", help="Models to include: ID,ID,...")
@click.option("--backend", type=click.Choice(BACKENDS), default="cpu", show_default=True,
              help="The llama.cpp backend of the target machines.")  # fmt: skip
@click.option(
    "--llama-build",
    type=click.Choice(LLAMA_BUILDS),
    default="portable",
    show_default=True,
    help="For cpu: portable (any x86-64 CPU with AVX2) or this machine's native build.",
)
@click.option("--archive", is_flag=True, help="Also write OUT.tar, one file to carry.")
@json_option
def create(
    out: Path, model_ids: str, backend: str, llama_build: str, archive: bool, as_json: bool
) -> None:
    """Write OUT: the locked wheels, PyTorch, a self-tested llama.cpp wheel, the default
    models and the chosen ones, Bastion's source and a manifest with hashes. Install it on
    the other machine with `python3 OUT/source/installer/bootstrap.py setup --from-bundle OUT`.
    Downloads the wheels from the package index (the one command besides `models pull`
    that connects out)."""
    ids = [part.strip() for part in model_ids.split(",") if part.strip()]
    summary = get_engine().create_bundle(
        out, ids, backend=backend, llama_build=llama_build, archive=archive,
        on_line=lambda line: click.echo(line, err=True),
    )  # fmt: skip
    if as_json:
        emit_json(summary)
        return
    click.echo(
        f"Bundle in {summary['path']}: {summary['files']} files, "
        f"{human_size(int(summary['size_bytes']))}, {summary['backend']} "
        f"({summary['llama_build']} llama.cpp build), models: "
        + (", ".join(m["id"] for m in summary["models"]) or "the default ones")
    )
    if archive:
        click.echo(f"Archive: {summary['archive']}")
    click.echo(
        "Install it with: python3 "
        f"{Path(summary['path']) / 'source' / 'installer' / 'bootstrap.py'} setup --from-bundle "
        f"{summary.get('archive') or summary['path']}"
    )
