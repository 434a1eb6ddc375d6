"""Generation speed in the desktop app against the engine alone, and GUI responsiveness.

    .venv/bin/python bench/bench_desktop_chat.py [--runs 5] [--tokens 128]

One process, offscreen Qt (or ``$DISPLAY``), a temporary home, the default model. Runs
alternate between (a) the engine alone: ``Engine.chat`` with a no-op text callback, and
(b) the Chat page: ``ChatPage.send`` — tokens go through the operation helper's worker
thread and the text pump into the transcript widget while the event loop runs. Both
report the engine's own tokens/s for the answer (prompt excluded), with the same
request (model, sampling, length). While the page streams, a 10 ms timer measures the
longest gap in the event loop: what a user would feel as a stall.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import append_report, machine

PROMPT = "Write a short story about a lighthouse keeper and a storm."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    if not os.environ.get("DISPLAY"):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    os.environ["BASTION_HOME"] = tempfile.mkdtemp(prefix="bastion-bench-")

    from dataclasses import replace

    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    from desktop.app import MainWindow
    from engine import Engine
    from engine.jobs import JobContext

    app = QApplication(sys.argv)
    engine = Engine()
    window = MainWindow(engine)
    window.show()
    from desktop import ops

    ops.preload_native()  # as desktop.app.main does after the first paint, before any answer
    chat = window.chat
    chat.max_tokens = args.tokens
    request = chat.build_request(PROMPT)
    request = replace(request, sampling=replace(request.sampling, temperature=0.0, seed=1))
    engine.load_model(request.model_id)

    def engine_alone() -> float:
        result = engine.chat(request, JobContext(), lambda _text: None)
        return result.tokens_per_second or 0.0

    gaps: list[float] = []

    def in_app() -> float:
        chat.new_chat()
        app.processEvents()
        last = [time.perf_counter()]
        worst = [0.0]

        def tick() -> None:
            now = time.perf_counter()
            worst[0] = max(worst[0], now - last[0])
            last[0] = now

        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(tick)
        timer.start()
        chat.build_request = lambda prompt: replace(request, prompt=prompt)  # type: ignore[method-assign]
        loop = QEventLoop()
        chat.send(PROMPT)
        assert chat.operation is not None
        chat.operation.finished.connect(loop.quit)
        if chat.busy:
            loop.exec()  # the real event loop: it sleeps between events, as the app does
        timer.stop()
        gaps.append(worst[0])
        conversation = engine.list_conversations()[0]
        _, messages = engine.get_conversation(conversation.id)
        return messages[-1].tokens_per_second or 0.0

    alone: list[float] = []
    gui: list[float] = []
    engine_alone()  # warm-up
    for _ in range(args.runs):
        alone.append(engine_alone())
        gui.append(in_app())
    window.close()
    engine.close()
    a, g = statistics.median(alone), statistics.median(gui)
    text = "\n".join(
        [
            f"Generation in the app vs the engine alone (default model, {args.tokens} tokens, "
            f"greedy, medians of {args.runs} alternating runs; "
            f"{'Xvfb' if os.environ.get('DISPLAY') else 'offscreen'}):",
            "",
            "| path | tokens/s |",
            "|---|---|",
            f"| engine alone | {a:.1f} |",
            f"| desktop Chat page (streamed into the transcript) | {g:.1f} |",
            "",
            f"App vs engine: {g / a:.3f}x; longest event-loop gap while streaming: "
            f"median {statistics.median(gaps) * 1000:.0f} ms, worst {max(gaps) * 1000:.0f} ms "
            f"(per run: {', '.join(f'{gap * 1000:.0f}' for gap in gaps)} ms).",
        ]
    )
    sys.stdout.write(text + "\n")
    append_report("desktop", f"{machine()}\n\n{text}")


if __name__ == "__main__":
    main()
