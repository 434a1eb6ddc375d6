"""``bastion keys``: API keys of the server (``bastion serve``)."""

from __future__ import annotations

import click

from engine.cli.common import get_engine, json_option
from engine.cli.output import emit_json, table


@click.group("keys")
def keys_group() -> None:
    """API keys for `bastion serve`: made once, shown once, kept only as a salted hash."""


@keys_group.command("create")
@click.argument("name")
@click.option("--rpm", type=int, help="Requests per minute this key may make.")
@click.option("--tpm", type=int, help="Tokens (prompt + completion) per minute.")
@click.option("--models", "models", default="", help="Models it may use: ID,ID,... (all if unset).")
@json_option
def create(name: str, rpm: int | None, tpm: int | None, models: str, as_json: bool) -> None:
    """Make a key named NAME and print it (the only time it is shown)."""
    wanted = [m.strip() for m in models.split(",") if m.strip()] or None
    entry, key = get_engine().api_keys.create(name, rpm=rpm, tpm=tpm, models=wanted)
    if as_json:
        emit_json({"name": entry.name, "key": key})
        return
    click.echo(key)
    click.echo(
        f"This is the key {entry.name!r}; it is shown only now. Clients send it as "
        "'Authorization: Bearer <key>' (the OpenAI clients' api_key).",
        err=True,
    )


@keys_group.command("list")
@json_option
def list_keys(as_json: bool) -> None:
    """The keys (never the keys themselves: their first characters)."""
    keys = get_engine().api_keys.list()
    if as_json:
        emit_json([k.to_public() for k in keys])
        return
    if not keys:
        click.echo("No API keys. Make one with: bastion keys create NAME")
        return
    table(
        ["NAME", "STARTS", "RPM", "TPM", "MODELS", "LAST USED"],
        [
            [
                k.name,
                k.prefix + "…",
                k.rpm or "-",
                k.tpm or "-",
                ",".join(k.models) if k.models else "all",
                k.last_used_at or "never",
            ]
            for k in keys
        ],
    )


@keys_group.command("revoke")
@click.argument("name")
@json_option
def revoke(name: str, as_json: bool) -> None:
    """Delete the key NAME; the server refuses it from its next request."""
    entry = get_engine().api_keys.revoke(name)
    if as_json:
        emit_json(entry.to_public())
    else:
        click.echo(f"Revoked {entry.name}.")
