"""``ModelInfo``: everything known about one registered model, for ``models info`` and the GUI."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.models.hardware import Fit, Hardware
from engine.models.registry import ModelEntry


@dataclass(frozen=True)
class LoadPlan:
    """How the model would be loaded here: context, threads and GPU layers."""

    context: int
    threads: int
    gpu_layers: int


@dataclass(frozen=True)
class ModelInfo:
    """A model's registry entry, what its file's header says, and whether it fits here."""

    entry: ModelEntry
    name: str | None
    file_kind: str
    gguf_version: int
    tensor_count: int
    vocab_size: int | None
    layers: int | None
    load: LoadPlan
    fit: Fit
    hardware: Hardware

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def path(self) -> Path:
        return Path(self.entry.path)

    def to_public(self) -> dict[str, Any]:
        """The ``bastion models info --json`` document."""
        data = self.entry.to_public()
        data.update(
            {
                "name": self.name,
                "file_kind": self.file_kind,
                "gguf_version": self.gguf_version,
                "tensor_count": self.tensor_count,
                "vocab_size": self.vocab_size,
                "layers": self.layers,
                "chat_template": self.entry.chat_template,
                "load": asdict(self.load),
                "fit": asdict(self.fit),
                "hardware": self.hardware.to_dict(),
                "metadata": self.entry.metadata,
            }
        )
        return data
