"""Desktop start-up: time from launch to the first painted window, and idle memory.

    .venv/bin/python bench/bench_desktop.py [--runs 5]

Each run starts the real entry point (``bastion-desktop``) as a new process on the
display given by ``$DISPLAY`` (Xvfb: ``xvfb-run -a``), or offscreen when there is none,
with ``BASTION_DESKTOP_PROBE=1``: the window reports the wall-clock time of its first
paint event, waits three seconds idle and reports its resident memory, then quits.
"Cold" is the first run after the page cache was dropped (when this process may drop it;
otherwise the first run of this invocation), "warm" the median of the rest.

Baseline, measured in the same run: a bare PySide6 window (QApplication + QMainWindow
shown) started the same way — what any Qt app pays before its own code runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import append_report, machine

BARE = (
    "import json, os, sys, time\n"
    "from PySide6.QtCore import QEvent, QObject, QTimer\n"
    "from PySide6.QtWidgets import QApplication, QMainWindow\n"
    "app = QApplication(sys.argv)\n"
    "w = QMainWindow(); w.setWindowTitle('bare'); w.resize(1180, 760)\n"
    "class F(QObject):\n"
    "    done = False\n"
    "    def eventFilter(self, o, e):\n"
    "        if not self.done and e.type() == QEvent.Type.Paint:\n"
    "            self.done = True; t = time.time()\n"
    "            def r():\n"
    "                import psutil\n"
    "                print(json.dumps({'painted_at': t,"
    " 'idle_rss': psutil.Process().memory_info().rss}), flush=True); app.quit()\n"
    "            QTimer.singleShot(3000, r)\n"
    "        return False\n"
    "f = F(); w.installEventFilter(f); w.show(); app.exec()\n"
)


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def launch(command: list[str], home: Path) -> tuple[float, int]:
    env = {**os.environ, "BASTION_HOME": str(home), "BASTION_DESKTOP_PROBE": "1"}
    if not env.get("DISPLAY"):
        env["QT_QPA_PLATFORM"] = "offscreen"
    started = time.time()
    out = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"no probe output from {command[0]}: {out.stderr[-800:]}")
    data = json.loads(lines[-1])
    return data["painted_at"] - started, int(data["idle_rss"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    desktop = [str(Path(sys.executable).parent / "bastion-desktop")]
    bare = [sys.executable, "-c", BARE]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        results: dict[str, list[tuple[float, int]]] = {"bastion": [], "bare": []}
        dropped = _drop_caches()
        cold = {"bastion": launch(desktop, home)}
        _drop_caches()
        cold["bare"] = launch(bare, home)
        for _ in range(args.runs):
            for name, command in (("bastion", desktop), ("bare", bare)):
                results[name].append(launch(command, home))
    rows = []
    for name in ("bastion", "bare"):
        warm = statistics.median(t for t, _ in results[name])
        rss = statistics.median(m for _, m in results[name])
        rows.append((name, cold[name][0], warm, rss / 2**20))
    ratio = rows[0][2] / rows[1][2]
    display = "Xvfb" if os.environ.get("DISPLAY") else "offscreen"
    lines = [
        f"Launch to first paint ({display}; cold = "
        f"{'page cache dropped' if dropped else 'first run'}; warm = median of {args.runs}):",
        "",
        "| app | cold s | warm s | idle RSS MiB |",
        "|---|---|---|---|",
        *[f"| {n} | {c:.2f} | {w:.2f} | {m:.0f} |" for n, c, w, m in rows],
        "",
        f"Bastion warm start vs a bare PySide6 window: {ratio:.2f}x "
        f"(+{(rows[0][2] - rows[1][2]) * 1000:.0f} ms); goal: under 1.5 s warm.",
    ]
    text = "\n".join(lines)
    print(text)
    append_report("desktop", f"{machine()}\n\n{text}")


if __name__ == "__main__":
    main()
