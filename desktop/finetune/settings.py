"""The training settings form: a preset, every hyperparameter under "Advanced", the run options.

The form is generated from one table keyed by ``Hyper``'s field names, so a field added
to the engine without a widget here is caught by a test instead of silently taking its
default. Choosing a preset loads all of its values into the form; what the user then
changes is what trains. Changing the rank moves alpha to 2 x rank, the rule the CLI's
``--rank`` follows, so a rank change alone keeps the adapter's effective scale.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QValidator
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from engine import PRESETS, Hyper

BACKENDS = ("auto", "peft", "unsloth")
DEFAULT_PRESET = "balanced"


class ScientificSpinBox(QDoubleSpinBox):
    """A spin box that reads and writes numbers like ``2e-4`` (learning rates)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setDecimals(12)  # the stored value is not rounded to what is displayed

    def textFromValue(self, value: float) -> str:
        return f"{value:.3g}"

    def valueFromText(self, text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int) -> tuple[QValidator.State, str, int]:
        try:
            float(text)
        except ValueError:
            return QValidator.State.Intermediate, text, pos
        return QValidator.State.Acceptable, text, pos

    def stepBy(self, steps: int) -> None:
        # A step multiplies or divides by two: learning rates live on a log scale.
        self.setValue(self.value() * (2.0**steps))


def _int(low: int, high: int, step: int = 1, none_text: str | None = None) -> QSpinBox:
    box = QSpinBox()
    box.setRange(0 if none_text else low, high)
    box.setSingleStep(step)
    if none_text:
        box.setSpecialValueText(none_text)  # shown at the minimum (0), which reads as None
    return box


def _float(low: float, high: float, step: float, decimals: int = 2) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setDecimals(decimals)
    box.setRange(low, high)
    box.setSingleStep(step)
    return box


def _lr() -> QDoubleSpinBox:
    box = ScientificSpinBox()
    box.setRange(1e-7, 0.5)
    return box


# Hyper field -> (label, widget factory, tooltip).
FIELDS: dict[str, tuple[str, Any, str]] = {
    "epochs": ("Epochs", lambda: _float(0.1, 1000, 0.5), "Passes over the training data."),
    "max_steps": (
        "Max steps",
        lambda: _int(1, 10_000_000, none_text="use epochs"),
        "Optimizer steps to run; when set, it overrides Epochs.",
    ),
    "lr": ("Learning rate", _lr, "Peak learning rate (cosine schedule after warm-up)."),
    "rank": ("LoRA rank", lambda: _int(1, 1024), "Size of the adapter; alpha follows as 2 × rank."),
    "alpha": ("LoRA alpha", lambda: _float(0.1, 8192, 1.0, 1), "Scale of the adapter's update."),
    "dropout": ("LoRA dropout", lambda: _float(0.0, 0.99, 0.05), "Dropout on the adapter."),
    "batch_size": ("Batch size", lambda: _int(1, 65536), "Examples per optimizer step."),
    "max_length": (
        "Max length",
        lambda: _int(16, 131072, 64),
        "Tokens per example; longer examples are cut.",
    ),
    "warmup_ratio": ("Warm-up", lambda: _float(0.0, 0.5, 0.01), "Share of steps warming up."),
    "weight_decay": ("Weight decay", lambda: _float(0.0, 1.0, 0.01, 3), "AdamW weight decay."),
    "seed": ("Seed", lambda: _int(0, 2**31 - 1), "Seed for order, split and initialization."),
    "save_every": (
        "Save every",
        lambda: _int(1, 10_000_000, none_text="about 10 per run"),
        "Steps between checkpoints (a stopped run resumes from the last one).",
    ),
    "tokens_per_batch": (
        "Tokens per pass",
        lambda: _int(64, 10_000_000, 256),
        "Tokens per forward pass: lower it when memory runs out.",
    ),
    "gradient_checkpointing": (
        "Gradient checkpointing",
        QCheckBox,
        "Recompute activations to save memory (slower).",
    ),
}


class TrainingSettings(QWidget):
    """Preset, advanced hyperparameters, backend, redaction and validation split."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        top = QFormLayout()
        self.preset = QComboBox()
        self.preset.addItems(list(PRESETS))
        self.preset.setToolTip("quick: 1 epoch, rank 8 · balanced: 3 epochs, rank 16 · "
                               "thorough: 5 epochs, rank 32")  # fmt: skip
        top.addRow("Preset", self.preset)
        self.backend = QComboBox()
        self.backend.addItems(list(BACKENDS))
        self.backend.setToolTip("auto takes Unsloth on an NVIDIA GPU when installed, else PEFT")
        top.addRow("Backend", self.backend)
        self.redact = QCheckBox("Redact personal data before training")
        self.redact.setChecked(True)
        top.addRow("", self.redact)
        self.val_fraction = _float(0.0, 0.5, 0.05)
        self.val_fraction.setValue(0.1)
        self.val_fraction.setToolTip("Share of examples held out to measure the validation loss")
        top.addRow("Validation share", self.val_fraction)
        layout.addLayout(top)

        self.advanced_toggle = QToolButton()
        self.advanced_toggle.setText("Advanced settings")
        self.advanced_toggle.setCheckable(True)
        self.advanced_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced_toggle.setAutoRaise(True)
        layout.addWidget(self.advanced_toggle)
        self.advanced = QWidget()
        form = QFormLayout(self.advanced)
        form.setContentsMargins(16, 0, 0, 0)
        self.fields: dict[str, QWidget] = {}
        for name, (label, factory, tip) in FIELDS.items():
            widget: QWidget = factory()
            widget.setToolTip(tip)
            widget.setAccessibleName(label)
            if isinstance(widget, QAbstractSpinBox):
                widget.setKeyboardTracking(False)
            self.fields[name] = widget
            form.addRow(label, widget)
        self.advanced.setVisible(False)
        layout.addWidget(self.advanced)

        self.advanced_toggle.toggled.connect(self._on_advanced_toggle_toggled)
        self.preset.currentTextChanged.connect(self.apply_preset)
        rank = self.fields["rank"]
        assert isinstance(rank, QSpinBox)
        rank.valueChanged.connect(self._on_rank_value_changed)
        self.preset.setCurrentText(DEFAULT_PRESET)
        self.apply_preset(DEFAULT_PRESET)

    def apply_preset(self, name: str) -> None:
        """Load every value of preset ``name`` into the form."""
        self.set_hyper(PRESETS[name])

    def set_hyper(self, hyper: Hyper) -> None:
        for name, value in asdict(hyper).items():
            widget = self.fields[name]
            if isinstance(widget, QCheckBox):
                widget.setChecked(bool(value))
            elif isinstance(widget, QSpinBox):
                widget.setValue(0 if value is None else int(value))
            elif isinstance(widget, QDoubleSpinBox):
                widget.setValue(float(value))
        # set after rank: its signal moved alpha to 2 x rank, the preset may say otherwise
        alpha = self.fields["alpha"]
        assert isinstance(alpha, QDoubleSpinBox)
        alpha.setValue(hyper.alpha)

    def hyper(self) -> Hyper:
        """The hyperparameters in the form.

        Raises:
            InvalidInput: a value out of the engine's range (``Hyper.check``).
        """
        values: dict[str, Any] = {}
        for f in fields(Hyper):
            widget = self.fields[f.name]
            if isinstance(widget, QCheckBox):
                values[f.name] = widget.isChecked()
            elif isinstance(widget, QSpinBox):
                number = widget.value()
                values[f.name] = None if widget.specialValueText() and number == 0 else number
            elif isinstance(widget, QDoubleSpinBox):
                values[f.name] = widget.value()
        return Hyper(**values).check()

    def set_value(self, name: str, value: float | bool | None) -> None:
        """Set one hyperparameter's widget (``None`` for "off" where the field allows it)."""
        widget = self.fields[name]
        if isinstance(widget, QCheckBox):
            widget.setChecked(bool(value))
        elif isinstance(widget, QSpinBox):
            widget.setValue(0 if value is None else int(value))
        elif isinstance(widget, QDoubleSpinBox):
            widget.setValue(0.0 if value is None else float(value))

    def _on_advanced_toggle_toggled(self, shown: bool) -> None:
        self.advanced.setVisible(shown)
        arrow = Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow
        self.advanced_toggle.setArrowType(arrow)

    def _on_rank_value_changed(self, rank: int) -> None:
        alpha = self.fields["alpha"]
        assert isinstance(alpha, QDoubleSpinBox)
        alpha.setValue(2.0 * rank)
