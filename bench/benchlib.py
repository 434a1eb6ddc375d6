"""What every benchmark shares: a description of the machine and the results files."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """CPU model, cores, RAM, OS and Python: written next to every number."""
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = psutil.virtual_memory().total / 1024**3
    return (
        f"{cpu}, {psutil.cpu_count(logical=False)} cores / {os.cpu_count()} threads, "
        f"{ram:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def append_report(name: str, report: str) -> Path:
    """Append a Markdown report to ``bench/results/<name>.md`` and return its path."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.md"
    with out.open("a", encoding="utf-8") as fh:
        fh.write(report.rstrip("\n") + "\n\n")
    return out


def prepend_report(name: str, report: str) -> Path:
    """Put a Markdown report at the top of ``bench/results/<name>.md`` (newest first)."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.md"
    before = out.read_text(encoding="utf-8") if out.exists() else ""
    out.write_text(report.rstrip("\n") + "\n\n" + before, encoding="utf-8")
    return out
