"""Running the server: the rules on where it may listen, and a handle to start and stop it.

The command line (``bastion serve``) runs it in the foreground; the desktop's Server page
runs it on a thread of the app and stops it from there. Both go through ``check_bind``:
a server needs API keys, ``--no-auth`` is allowed on loopback only, and TLS takes a
certificate and its key together.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import EnvironmentFault, InvalidInput

if TYPE_CHECKING:
    from engine.engine import Engine


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(
    host: str, auth: bool, have_keys: bool, tls_cert: Path | None, tls_key: Path | None
) -> None:
    """Refuse, in one line, a server that would not be secure as asked.

    Raises:
        InvalidInput: --no-auth off loopback, no key at all, or half a TLS pair.
    """
    if not auth and not is_loopback(host):
        raise InvalidInput(
            f"--no-auth is refused on {host}, which other machines can reach",
            hint="serve on 127.0.0.1, or create keys with `bastion keys create NAME`",
        )
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInput("--tls-cert and --tls-key go together")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise InvalidInput(f"no such file: {path}")
    if auth and not have_keys:
        who = "other machines" if not is_loopback(host) else "clients"
        raise InvalidInput(
            f"the server needs API keys and none exists: {who} could not use it",
            hint="create one with `bastion keys create NAME`"
            + (" (or use --no-auth on loopback)" if is_loopback(host) else ""),
        )


@dataclass(frozen=True)
class ServerStatus:
    """What a running server has done: requests running, served and refused (429)."""

    url: str
    auth: bool
    running: int
    served: int
    refused: int
    recent: list[dict[str, Any]] = field(default_factory=list)


class ServerHandle:
    """A server started on a background thread (``Engine.start_server``)."""

    def __init__(self, server: Any, app: Any, url: str, auth: bool) -> None:
        self._server = server
        self._app = app
        self.url = url
        self.auth = auth
        self._thread = threading.Thread(target=server.run, name="bastion-server", daemon=True)

    def run_here(self) -> None:
        """Serve in this thread until Ctrl-C or SIGTERM (the command line)."""
        self._server.run()

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise EnvironmentFault(
                    f"the server could not listen on {self.url}",
                    hint="another program may use that port: choose another",
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EnvironmentFault(f"the server did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def status(self) -> ServerStatus:
        stats = self._app.state.stats
        with stats.lock:
            return ServerStatus(
                self.url,
                self.auth,
                stats.running,
                stats.served,
                stats.refused,
                list(stats.recent[:20]),
            )

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, end the requests in progress, and wait for the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)


def make_server(
    engine: Engine,
    host: str,
    port: int,
    *,
    auth: bool = True,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    max_tokens_cap: int = 2048,
    concurrent: int = 4,
) -> ServerHandle:
    """A server for ``engine``, checked but not started."""
    import uvicorn

    from engine.server.app import ServerOptions, create_app

    check_bind(host, auth, bool(engine.api_keys.list()), tls_cert, tls_key)
    app = create_app(
        engine,
        ServerOptions(auth=auth, max_tokens_cap=max_tokens_cap, concurrent_per_key=concurrent),
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
    scheme = "https" if tls_cert else "http"
    return ServerHandle(uvicorn.Server(config), app, f"{scheme}://{host}:{port}/v1", auth)
