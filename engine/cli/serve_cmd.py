"""``bastion serve``: the OpenAI-compatible server, secure by default."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from engine.cli.common import get_engine
from engine.errors import InvalidInput


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    import uvicorn

    from engine.server.app import ServerOptions, create_app

    if no_auth and not is_loopback(host):
        raise InvalidInput(
            f"--no-auth is refused on {host}, which other machines can reach",
            hint="serve on 127.0.0.1, or create keys with `bastion keys create NAME`",
        )
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInput("--tls-cert and --tls-key go together")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise InvalidInput(f"no such file: {path}")
    engine = get_engine()
    engine.set_parallel(parallel)
    if not no_auth and not engine.api_keys.list():
        where = "other machines" if not is_loopback(host) else "clients"
        raise InvalidInput(
            f"the server needs API keys and none exists: {where} could not use it",
            hint="create one with `bastion keys create NAME`"
            + ("" if not is_loopback(host) else " (or use --no-auth on loopback)"),
        )
    if no_auth:
        click.echo("warning: --no-auth: any program on this machine can use the server", err=True)
    scheme = "https" if tls_cert else "http"
    app = create_app(
        engine,
        ServerOptions(
            auth=not no_auth, max_tokens_cap=max_tokens_cap, concurrent_per_key=concurrent
        ),
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    click.echo(
        f"Bastion serves {scheme}://{host}:{port}/v1 "
        f"({'no auth' if no_auth else 'API keys required'}); Ctrl-C stops it",
        err=True,
    )
    server.run()
