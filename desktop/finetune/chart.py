"""A live training-loss chart drawn with QPainter (QtCharts is not part of Essentials).

The chart holds at most one loss per step (a resumed run that repeats a step replaces
it), so it can be fed from throttled progress events and from ``metrics.jsonl`` alike.
Painting is proportional to the number of points; runs have thousands of steps at most.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPalette, QPen, QPolygonF
from PySide6.QtWidgets import QSizePolicy, QWidget

_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 52, 16, 24, 30
_TRAIN_COLOR = QColor("#1f77b4")
_VALIDATION_COLOR = QColor("#d62728")


class LossChart(QWidget):
    """Training loss per step as a line; validation losses as dots."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._train: dict[int, float] = {}
        self._validation: dict[int, float] = {}
        self._total: int | None = None
        self.setAccessibleName("Training loss chart")
        self.setMinimumHeight(160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    # -- data ----------------------------------------------------------------------------

    @property
    def points(self) -> list[tuple[int, float]]:
        """The training losses shown, as (step, loss), by step."""
        return sorted(self._train.items())

    @property
    def validation_points(self) -> list[tuple[int, float]]:
        return sorted(self._validation.items())

    @property
    def total_steps(self) -> int | None:
        return self._total

    def add_point(self, step: int, loss: float) -> None:
        """Add (or replace) the loss at ``step``; non-finite losses are not drawn."""
        if math.isfinite(loss):
            self._train[step] = loss
            self.update()

    def set_points(
        self,
        train: Iterable[tuple[int, float]],
        validation: Iterable[tuple[int, float]] = (),
    ) -> None:
        self._train = {s: v for s, v in train if math.isfinite(v)}
        self._validation = {s: v for s, v in validation if math.isfinite(v)}
        self.update()

    def set_total(self, total: int | None) -> None:
        """The run's planned steps: the x axis spans them from the start."""
        self._total = total
        self.update()

    def clear(self) -> None:
        self._train.clear()
        self._validation.clear()
        self._total = None
        self.update()

    # -- painting ------------------------------------------------------------------------

    def sizeHint(self) -> QSize:
        return QSize(480, 240)

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        palette = self.palette()
        painter.fillRect(self.rect(), palette.color(QPalette.ColorRole.Base))
        text_color = palette.color(QPalette.ColorRole.Text)
        plot = QRectF(
            _PAD_LEFT,
            _PAD_TOP,
            max(1.0, self.width() - _PAD_LEFT - _PAD_RIGHT),
            max(1.0, self.height() - _PAD_TOP - _PAD_BOTTOM),
        )
        points = self.points + self.validation_points
        if not points:
            painter.setPen(palette.color(QPalette.ColorRole.PlaceholderText))
            painter.drawText(
                self.rect(), Qt.AlignmentFlag.AlignCenter, "The loss appears here as training runs"
            )
            painter.end()
            return
        max_step = max(1, self._total or 0, *(s for s, _ in points))
        lo = min(v for _, v in points)
        hi = max(v for _, v in points)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        margin = (hi - lo) * 0.05
        lo, hi = max(0.0, lo - margin), hi + margin

        def to_xy(step: int, loss: float) -> QPointF:
            x = plot.left() + plot.width() * step / max_step
            y = plot.bottom() - plot.height() * (loss - lo) / (hi - lo)
            return QPointF(x, y)

        grid = QColor(text_color)
        grid.setAlpha(40)
        for i in range(5):
            value = lo + (hi - lo) * i / 4
            y = to_xy(0, value).y()
            painter.setPen(grid)
            painter.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
            painter.setPen(text_color)
            painter.drawText(
                QRectF(0, y - 8, _PAD_LEFT - 6, 16),
                Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                f"{value:.2f}",
            )
        painter.setPen(text_color)
        painter.drawLine(plot.bottomLeft(), plot.bottomRight())
        painter.drawLine(plot.bottomLeft(), plot.topLeft())
        below = QRectF(plot.left(), plot.bottom() + 4, plot.width(), _PAD_BOTTOM - 4)
        painter.drawText(below, Qt.AlignmentFlag.AlignLeft, "0")
        painter.drawText(below, Qt.AlignmentFlag.AlignHCenter, "step")
        painter.drawText(below, Qt.AlignmentFlag.AlignRight, str(max_step))

        train = self.points
        if train:
            painter.setPen(QPen(_TRAIN_COLOR, 2))
            if len(train) == 1:
                painter.setBrush(_TRAIN_COLOR)
                painter.drawEllipse(to_xy(*train[0]), 3, 3)
            else:
                painter.drawPolyline(QPolygonF([to_xy(s, v) for s, v in train]))
            step, loss = train[-1]
            painter.setPen(text_color)
            painter.drawText(
                QRectF(plot.left(), 2, plot.width(), _PAD_TOP - 4),
                Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                f"step {step}: loss {loss:.3f}",
            )
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(_VALIDATION_COLOR)
        for step, loss in self.validation_points:
            painter.drawEllipse(to_xy(step, loss), 4, 4)
        legend = [(_TRAIN_COLOR, "— "), (text_color, "training loss")]
        if self._validation:
            legend += [(_VALIDATION_COLOR, "   ● "), (text_color, "validation loss")]
        x = plot.left()
        metrics = painter.fontMetrics()
        for color, text in legend:
            painter.setPen(color)
            painter.drawText(
                QRectF(x, 2, plot.width(), _PAD_TOP - 4),
                Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                text,
            )
            x += metrics.horizontalAdvance(text)
        painter.end()
