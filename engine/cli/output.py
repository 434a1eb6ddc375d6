"""Terminal output for the CLI: JSON documents on stdout, one-line errors, tables."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from engine.units import human_count, human_size

__all__ = ["emit_json", "error_line", "human_count", "human_size", "note", "table"]


def emit_json(data: Any) -> None:
    """Print one JSON document on stdout (the contract for every ``--json``)."""
    json.dump(data, sys.stdout, ensure_ascii=False, indent=2, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def note(message: str) -> None:
    """A message for the person at the terminal, on stderr."""
    print(message, file=sys.stderr, flush=True)


def error_line(message: str) -> None:
    # One line, whatever the message holds.
    print(f"bastion: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table on stdout."""
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        print(line.rstrip())
