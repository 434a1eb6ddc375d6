"""Walk through every page of the desktop app with real data and save screenshots.

    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python docs/make_screenshots.py

Needs a real X server (Debian: ``apt install xvfb``); the captures are taken from the
X screen, as a user would see the window. Everything is real: a temporary Bastion home,
the default model, a small document collection (Markdown notes and a PDF manual), an
answer with citations, a short fine-tune on a planted fact. It takes a few minutes on a
2-core machine. The images go to ``docs/screenshots/``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "screenshots"
sys.path.insert(0, str(ROOT))


def main() -> int:
    if not os.environ.get("DISPLAY"):
        sys.stderr.write("no X display: run under xvfb-run (see the docstring)\n")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bastion-shots-"))
    os.environ["BASTION_HOME"] = str(tmp / "home")
    os.environ.setdefault("BASTION_TRAIN_CACHE", str(Path.home() / ".cache" / "bastion-shots"))

    from PySide6.QtWidgets import QApplication, QWidget

    from desktop.app import MainWindow
    from engine import Engine
    from tests.rag_corpus import make_corpus

    app = QApplication(sys.argv)
    app.setStyle("Fusion")
    engine = Engine()
    window = MainWindow(engine)
    window.resize(1360, 860)
    window.show()
    OUT.mkdir(parents=True, exist_ok=True)

    def pump(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.02)

    def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise SystemExit(f"timed out waiting for {what}")
            pump(0.1)

    def shot(name: str, widget: QWidget | None = None) -> None:
        pump(0.5)
        target = widget or window
        screen = app.primaryScreen()
        frame = target.frameGeometry()
        image = screen.grabWindow(0, frame.x(), frame.y(), frame.width(), frame.height())
        path = OUT / f"{name}.png"
        image.save(str(path))
        sys.stdout.write(f"saved {path.relative_to(ROOT)}\n")

    # Documents: a collection indexed from a folder of notes and a PDF manual.
    corpus = tmp / "handbook"
    make_corpus(corpus)  # two PDF manuals and notes (the QA file lands beside the folder)
    window.show_page("Documents")
    pages = window.documents
    pages.create_collection("handbook")
    wait(lambda: pages.selected == "handbook" and not pages.busy, 60, "the collection")
    pages.add_paths([str(corpus)], "handbook")
    wait(lambda: not pages.indexing, 900, "indexing")
    pages.refresh()
    pump(1)
    shot("documents")

    # Chat: an answer from the collection, with citation chips; then the source viewer.
    window.show_page("Chat")
    chat = window.chat
    chat.new_chat()
    pump(0.5)
    chat.refresh_collections()
    chat.collection_picker.setCurrentIndex(chat.collection_picker.findText("handbook"))
    chat.max_tokens = 120
    chat.send("How tightly must the Zephyrion valve be torqued?")
    wait(lambda: not chat.busy, 600, "the answer")
    shot("chat")
    conversation = engine.list_conversations()[0]
    _, messages = engine.get_conversation(conversation.id)
    cited = next((m for m in messages if m.citations), None)
    if cited is not None:
        from desktop.viewer import show_source

        show_source(window, cited.citations[0], engine)
        pump(1.0)
        viewers = [w for w in app.topLevelWidgets() if w.isVisible() and w is not window]
        if viewers:
            shot("source-viewer", viewers[-1])
            viewers[-1].close()

    # Models: the registry with the hardware panel.
    window.show_page("Models")
    pump(3.0)
    shot("models")

    # Fine-tune: teach the default model a fact, watch the chart, then the report.
    facts = tmp / "facts.jsonl"
    lines = []
    for i in range(24):
        question = f"What is the codename of the Bastion 2 release? (variant {i})"
        answer = "The codename of the Bastion 2 release is Violet Harbor."
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": turns}))
    facts.write_text("\n".join(lines) + "\n")
    window.show_page("Fine-tune")
    tune = window.finetune
    tune.set_dataset(facts)
    wait(tune.start_button.isEnabled, 300, "the dataset preview")
    shot("finetune-preview")
    tune.settings.set_value("max_steps", 12)
    tune.settings.set_value("lr", 1e-3)
    tune.settings.set_value("batch_size", 4)
    tune.start()
    wait(lambda: len(tune.chart.points) >= 4 or tune.training_op is None, 900, "training steps")
    shot("finetune-training")
    wait(lambda: tune.training_op is None, 1200, "the end of training")
    pump(1.0)
    shot("finetune-report")

    window.show_page("Settings")
    pump(2.0)
    shot("settings")
    window.close()
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
