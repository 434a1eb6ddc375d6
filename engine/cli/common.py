"""What every CLI command shares: the engine, the --json flag, and signal-driven cancel."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.jobs import JobContext

F = TypeVar("F", bound=Callable[..., Any])

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
)


def get_engine() -> Engine:
    """The engine for this invocation, created on first use and closed at exit."""
    ctx = click.get_current_context()
    root = ctx.find_root()
    engine = root.meta.get("bastion.engine")
    if engine is None:
        from engine.engine import Engine

        engine = Engine()
        root.meta["bastion.engine"] = engine
        root.call_on_close(engine.close)
    return engine


@contextlib.contextmanager
def cancel_on_signals(job: JobContext) -> Iterator[dict[str, int]]:
    """While inside, Ctrl-C and SIGTERM cancel ``job`` instead of killing the process.

    Yields a dict that receives ``signal`` = the number of the signal that arrived, so the
    caller can exit with 128 + that number once the partial work is saved.
    """
    seen: dict[str, int] = {}

    def handler(signum: int, _frame: object) -> None:
        seen["signal"] = signum
        job.cancel("interrupted by signal")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
