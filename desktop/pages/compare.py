"""The Compare page: blind A/B between two models, and their win rates.

The user picks two models and asks one question; both answer (``Engine.answer_pair``:
same sampling, shared seed, nothing in the history) and the answers are shown as
"Answer 1" and "Answer 2" in random order, without the models' names. The user picks one
or a tie; the pick is stored (``Engine.record_vote``) and only then are the names shown.
The table below holds every model's record so far, a tie counting half, with a 95 %
interval; the Models page shows the same. Picks also become training data (``dataset
from-feedback``; the Fine-tune page's "Use feedback").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import (
    QComboBox,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QTextBrowser,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from desktop import ops

if TYPE_CHECKING:
    from desktop.app import MainWindow
    from engine import AnswerPair, Engine, ModelEntry, Progress, Vote, WinRate

RATE_COLUMNS = ["Model", "Votes", "Wins", "Losses", "Ties", "Win rate (95 % interval)"]


def rate_row(rate: WinRate) -> list[str]:
    """A win-rate table row (also used by the Models page)."""
    return [
        rate.model,
        str(rate.votes),
        str(rate.wins),
        str(rate.losses),
        str(rate.ties),
        f"{rate.rate:.0%} ({rate.low:.0%}–{rate.high:.0%})",
    ]


class ComparePage(QWidget):
    def __init__(self, engine: Engine, window: MainWindow) -> None:
        super().__init__()
        self.engine = engine
        self.window_ = window
        self.pair: AnswerPair | None = None
        self._op: ops.Operation | None = None
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<h2>Compare</h2>"))
        intro = QLabel(
            "Two models answer the same question; you see the answers without their names, "
            "in random order, and pick the better one. Your picks show which model serves "
            "you better, and become training data for the next fine-tune."
        )
        intro.setWordWrap(True)
        layout.addWidget(intro)

        pick = QHBoxLayout()
        self.model_a = QComboBox()
        self.model_a.setAccessibleName("First model")
        self.model_b = QComboBox()
        self.model_b.setAccessibleName("Second model")
        pick.addWidget(QLabel("Models"))
        pick.addWidget(self.model_a, 1)
        pick.addWidget(QLabel("and"))
        pick.addWidget(self.model_b, 1)
        layout.addLayout(pick)
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("A question both models answer")
        self.prompt.setAccessibleName("Question for both models")
        self.prompt.setMaximumHeight(90)
        layout.addWidget(self.prompt)
        ask = QHBoxLayout()
        self.ask_button = QPushButton("Answer both")
        self.ask_button.clicked.connect(self.ask)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.status = QLabel()
        self.status.setWordWrap(True)
        ask.addWidget(self.ask_button)
        ask.addWidget(self.cancel_button)
        ask.addWidget(self.progress, 1)
        layout.addLayout(ask)
        layout.addWidget(self.status)

        answers = QHBoxLayout()
        self.views: list[QTextBrowser] = []
        self.titles: list[QGroupBox] = []
        for n in (1, 2):
            box = QGroupBox(f"Answer {n}")
            inner = QVBoxLayout(box)
            view = QTextBrowser()
            view.setAccessibleName(f"Answer {n}")
            inner.addWidget(view)
            answers.addWidget(box)
            self.views.append(view)
            self.titles.append(box)
        layout.addLayout(answers, 2)
        votes = QHBoxLayout()
        self.first_button = QPushButton("Answer 1 is better")
        self.tie_button = QPushButton("Tie")
        self.second_button = QPushButton("Answer 2 is better")
        for button, choice in (
            (self.first_button, "first"),
            (self.tie_button, "tie"),
            (self.second_button, "second"),
        ):
            button.clicked.connect(lambda _=False, c=choice: self.vote(c))
            votes.addWidget(button)
        layout.addLayout(votes)
        self._set_voting(False)

        self.rates = QTreeWidget()
        self.rates.setHeaderLabels(RATE_COLUMNS)
        self.rates.setRootIsDecorated(False)
        self.rates.setAccessibleName("Win rates")
        self.rates.header().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        layout.addWidget(QLabel("Win rates in your votes (a tie counts half)"))
        layout.addWidget(self.rates, 1)

        self.model_list = ops.Refresher(
            lambda: lambda _ctx: self.engine.list_models(),
            self._show_models,
            parent=self,
            name="list models for A/B",
        )
        self.rate_list = ops.Refresher(
            lambda: lambda _ctx: self.engine.win_rates(),
            self._show_rates,
            parent=self,
            name="win rates",
        )
        self.model_list.refresh()
        self.rate_list.refresh()

    def showEvent(self, event: QShowEvent) -> None:
        self.model_list.refresh()
        self.rate_list.refresh()
        super().showEvent(event)

    # -- models -----------------------------------------------------------------------

    def _show_models(self, models: list[ModelEntry]) -> None:
        ids = [m.id for m in models]
        for combo, fallback in ((self.model_a, 0), (self.model_b, 1)):
            chosen = combo.currentText()
            combo.clear()
            combo.addItems(ids)
            if chosen in ids:
                combo.setCurrentText(chosen)
            elif len(ids) > fallback:
                combo.setCurrentIndex(fallback)

    def choose(self, model_a: str, model_b: str) -> None:
        """Preselect two models (the Fine-tune page sends a new fine-tune and its base)."""
        for combo, model in ((self.model_a, model_a), (self.model_b, model_b)):
            if combo.findText(model) < 0:
                combo.addItem(model)
            combo.setCurrentText(model)
        self.model_list.refresh()

    # -- asking -----------------------------------------------------------------------

    def ask(self) -> None:
        a, b = self.model_a.currentText(), self.model_b.currentText()
        prompt = self.prompt.toPlainText()
        self.pair = None
        self._set_voting(False)
        for view, box, n in zip(self.views, self.titles, (1, 2), strict=True):
            view.clear()
            box.setTitle(f"Answer {n}")
        self.ask_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setVisible(True)
        self.progress.setRange(0, 0)
        self.status.setText("Both models are answering…")
        self._op = ops.run(
            lambda ctx: self.engine.answer_pair(prompt, a, b, ctx=ctx),
            on_success=self._show_pair,
            on_failure=self._failed,
            on_progress=self._progressed,
            on_cancel=lambda: self.status.setText("Cancelled."),
            on_finished=self._finished,
            parent=self,
            name="A/B answers",
        )

    def cancel(self) -> None:
        if self._op is not None:
            self._op.cancel()

    def _progressed(self, progress: Progress) -> None:
        if progress.total:
            self.progress.setRange(0, int(progress.total))
            self.progress.setValue(int(progress.done))
        self.status.setText(progress.label.capitalize() + "…")

    def _failed(self, exc: BaseException) -> None:
        hint = getattr(exc, "hint", None)
        self.status.setText(f"Could not answer: {exc}" + (f" — {hint}" if hint else ""))

    def _finished(self) -> None:
        self._op = None
        self.ask_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setVisible(False)

    def _show_pair(self, pair: AnswerPair) -> None:
        self.pair = pair
        for view, text in zip(self.views, (pair.first, pair.second), strict=True):
            view.setMarkdown(text or "*(no text)*")
        self.status.setText("Which answer is better? The models' names show after you pick.")
        self._set_voting(True)

    # -- voting -----------------------------------------------------------------------

    def _set_voting(self, on: bool) -> None:
        for button in (self.first_button, self.tie_button, self.second_button):
            button.setEnabled(on)

    def vote(self, choice: str) -> None:
        pair = self.pair
        if pair is None:
            return
        self._set_voting(False)
        ops.run(
            lambda _ctx: self.engine.record_vote(pair, choice),
            on_success=self._voted,
            on_failure=self._vote_failed,
            parent=self,
            name="record vote",
            native=False,
        )

    def _vote_failed(self, exc: BaseException) -> None:
        self._set_voting(True)
        self.status.setText(f"The pick was not kept: {exc}")

    def _voted(self, vote: Vote) -> None:
        self.pair = None
        for box, model, n in zip(self.titles, (vote.model_a, vote.model_b), (1, 2), strict=True):
            box.setTitle(f"Answer {n}: {model}")
        said = {"a": "Answer 1", "b": "Answer 2", "tie": "A tie"}[vote.winner]
        self.status.setText(f"{said} — kept. Ask another question to vote again.")
        self.rate_list.refresh()

    def _show_rates(self, rates: list[WinRate]) -> None:
        self.rates.clear()
        for rate in rates:
            QTreeWidgetItem(self.rates, rate_row(rate))
