"""``bastion secrets``: tokens kept in the OS keyring (or Bastion's encrypted file)."""

from __future__ import annotations

import re

import click

from engine.cli.common import get_engine

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


def _checked(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise click.BadParameter(
            f"{name!r} is not a secret name (lower-case letters, digits and '-')",
            param_hint="NAME",
        )
    return name


@click.group("secrets")
def secrets_group() -> None:
    """Tokens Bastion uses, e.g. hf-token for gated models on the Hugging Face Hub."""


@secrets_group.command("set")
@click.argument("name")
def set_secret(name: str) -> None:
    """Store a secret; its value is asked for (hidden), or read from standard input."""
    value = click.prompt(f"Value of {_checked(name)}", hide_input=True, err=True).strip()
    if not value:
        raise click.BadParameter("the value is empty", param_hint="value")
    get_engine().secrets.set(name, value)
    click.echo(f"Stored {name}.")


@secrets_group.command("delete")
@click.argument("name")
def delete_secret(name: str) -> None:
    """Forget a secret."""
    get_engine().secrets.delete(_checked(name))
    click.echo(f"Deleted {name}.")
