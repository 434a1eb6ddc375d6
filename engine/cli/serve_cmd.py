"""``bastion serve``: the OpenAI-compatible server, secure by default."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import get_engine


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--tls-cert", type=click.Path(path_type=Path, dir_okay=False), help="HTTPS: cert.")
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False), help="HTTPS: key.")
@click.option("--no-auth", is_flag=True, help="No API keys (loopback addresses only).")
@click.option(
    "--max-tokens-cap",
    default=2048,
    show_default=True,
    type=click.IntRange(1),
    help="The most tokens one answer may ask for (higher asks are lowered).",
)
@click.option(
    "--parallel",
    default=8,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Answers generated together in one batch (continuous batching).",
)
@click.option(
    "--concurrent",
    default=4,
    show_default=True,
    type=click.IntRange(1),
    help="Requests one key may have running at once.",
)
def serve(
    host: str,
    port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    no_auth: bool,
    max_tokens_cap: int,
    parallel: int,
    concurrent: int,
) -> None:
    """Serve the models, fine-tunes and collections over the OpenAI API (`/v1/...`).

    Every /v1 call needs an API key (`bastion keys create NAME`). The server only listens:
    it never connects out."""
    from engine.server.runner import make_server

    engine = get_engine()
    server = make_server(
        engine,
        host,
        port,
        auth=not no_auth,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_tokens_cap=max_tokens_cap,
        concurrent=concurrent,
    )
    engine.set_parallel(parallel)
    if no_auth:
        click.echo("warning: --no-auth: any program on this machine can use the server", err=True)
    click.echo(
        f"Bastion serves {server.url} ({'no auth' if no_auth else 'API keys required'}); "
        "Ctrl-C stops it",
        err=True,
    )
    server.run_here()
