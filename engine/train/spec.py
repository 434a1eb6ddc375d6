"""What a training run is asked to do: hyperparameters, presets, and the run's files.

The parent process writes a ``RunSpec`` as ``spec.json`` in the run's folder; the child
process reads it. Everything the child needs is in it, so ``--resume`` is the same spec
run again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput
from engine.paths import atomic_write_bytes


@dataclass(frozen=True)
class Hyper:
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    lr: float = 2e-4
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    batch_size: int = 8  # examples per optimizer step
    max_length: int = 1024  # tokens per example; longer ones are cut
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int | None = None  # steps between checkpoints; None: about 10 per run
    tokens_per_batch: int = 2048  # tokens per forward pass (memory), rows packed to fit
    gradient_checkpointing: bool = False

    def check(self) -> Hyper:
        """Raise ``InvalidInput`` for a value out of range; return self."""
        problems = []
        if not self.epochs > 0:
            problems.append(f"--epochs must be above 0, not {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"--max-steps must be at least 1, not {self.max_steps}")
        if not 0 < self.lr < 1:
            problems.append(f"--lr must be between 0 and 1, not {self.lr}")
        if not 1 <= self.rank <= 1024:
            problems.append(f"--rank must be between 1 and 1024, not {self.rank}")
        if not self.alpha > 0:
            problems.append(f"--alpha must be above 0, not {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout must be in [0, 1), not {self.dropout}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, not {self.batch_size}")
        if not 16 <= self.max_length <= 131072:
            problems.append(f"--max-length must be between 16 and 131072, not {self.max_length}")
        if self.save_every is not None and self.save_every < 1:
            problems.append(f"--save-every must be at least 1, not {self.save_every}")
        if problems:
            raise InvalidInput("; ".join(problems))
        return self


# Presets trade time for fit. Rank and alpha follow the common alpha = 2 x rank rule;
# learning rates are the usual LoRA range (1e-4 .. 3e-4); a few epochs suit the small
# instruction sets people bring.
PRESETS: dict[str, Hyper] = {
    "quick": Hyper(epochs=1, lr=3e-4, rank=8, alpha=16),
    "balanced": Hyper(),
    "thorough": Hyper(epochs=5, lr=1e-4, rank=32, alpha=64),
}


def hyper_from(preset: str, **overrides: Any) -> Hyper:
    """A preset with the given fields replaced (``None`` values leave the preset's)."""
    if preset not in PRESETS:
        raise InvalidInput(f"unknown preset {preset!r}: use {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    hyper = replace(PRESETS[preset], **changes)
    if "rank" in changes and "alpha" not in changes:
        hyper = replace(hyper, alpha=2.0 * hyper.rank)
    return hyper.check()


@dataclass(frozen=True)
class RunSpec:
    name: str
    run_dir: str
    base_kind: str  # "gguf" or "hf"
    base_path: str  # the GGUF file, or the Hugging Face folder
    arch: str  # GGUF architecture of the paired llama.cpp model
    n_head: int
    n_head_kv: int
    pad_id: int
    cache_dir: str
    backend: str = "auto"
    merged: bool = False
    hyper: Hyper = field(default_factory=Hyper)
    init_adapter: str | None = None  # a PEFT adapter folder to start from (``--from``)

    @property
    def folder(self) -> Path:
        return Path(self.run_dir)

    def path(self, name: str) -> Path:
        """A file of the run: spec.json, train.jsonl, validation.jsonl, metrics.jsonl, ..."""
        return self.folder / name

    def save(self) -> None:
        atomic_write_bytes(self.path("spec.json"), json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, path: Path) -> RunSpec:
        data = json.loads(path.read_text(encoding="utf-8"))
        hyper_names = {f.name for f in fields(Hyper)}
        data["hyper"] = Hyper(**{k: v for k, v in data["hyper"].items() if k in hyper_names})
        return cls(**data)
