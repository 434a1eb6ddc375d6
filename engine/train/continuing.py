"""A fine-tune that continues another (``finetune --from``), and the golden-set comparison.

``previous`` checks that an earlier fine-tune can be continued and says what it brings: its
base, its LoRA shape (rank, alpha) and its trained adapter, which the new run copies and
starts from. ``check_golden`` refuses a bad golden set before training; ``compare_on_golden``
scores the new model and the one it improves on (the earlier fine-tune, else the base)
after training, for the report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidInput
from engine.models.registry import ModelRegistry
from engine.train.runs import RunStore
from engine.train.spec import RunSpec

if TYPE_CHECKING:
    from engine.train.evalrun import EvalRun

Evaluate = Callable[[Path, list[str], Path], "EvalRun"]
"""Scores models on a golden set, writing the report into a folder (``Engine.evaluate``)."""


@dataclass(frozen=True)
class Previous:
    """An earlier fine-tune that a new run continues from."""

    model: str
    adapter_dir: Path  # its PEFT adapter (adapter_config.json, adapter_model.safetensors)
    base_source: str
    gguf: str | None
    rank: int
    alpha: float


def previous(models: ModelRegistry, runs: RunStore, model_id: str, base: str | None) -> Previous:
    """The fine-tune ``model_id`` as a starting point, or InvalidInput saying why not."""
    entry = models.get(model_id)
    if not entry.adapter:
        raise InvalidInput(
            f"{model_id!r} is not a fine-tune",
            hint=f"--from continues a fine-tune; train {model_id!r} itself with --base",
        )
    run = runs.get(entry.id)
    folder = run.run_dir / "adapter" if run is not None else None
    if run is None or folder is None or not (folder / "adapter_config.json").is_file():
        raise InvalidInput(
            f"the trained weights of {model_id!r} are not on this machine (only its "
            "llama.cpp adapter is), so training cannot continue from them",
            hint=f"train a new fine-tune from its base {entry.base!r} with all the data",
        )
    if base is not None and base not in (run.base, run.base_source):
        raise InvalidInput(
            f"--base {base!r} is not the base of {model_id!r} ({run.base_source})",
            hint="leave --base out with --from",
        )
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    source = run.base_source
    return Previous(
        model=entry.id,
        adapter_dir=folder,
        base_source=source,
        # A Hugging Face base is paired again with the GGUF the earlier run chatted with.
        gguf=run.base if source != run.base else None,
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
    )


def check_golden(path: Path) -> None:
    """Refuse a golden set with bad lines or no items (InvalidInput), before training."""
    from engine.train.golden import load_golden_set

    golden = load_golden_set(path)
    if golden.bad_lines:
        first = golden.bad_lines[0]
        raise InvalidInput(
            f"{len(golden.bad_lines)} bad line(s) in {path}; line {first.line}: {first.error}",
            hint=f"`bastion eval run --set {path} -m MODEL --json` lists them all",
        )
    if not golden.items:
        raise InvalidInput(f"the golden set {path} has no items")


def compare_on_golden(
    evaluate: Evaluate,
    models: ModelRegistry,
    spec: RunSpec,
    data: dict[str, Any],
    base_id: str,
    tuned_id: str,
) -> dict[str, Any] | None:
    """The new model and the one it improves on, scored on the run's golden set."""
    path = data.get("golden_set")
    if path is None:
        return None
    against = data.get("continued_from") or base_id
    if not any(m.id == against for m in models.list()):
        against = base_id  # the earlier fine-tune was removed meanwhile
    run = evaluate(Path(path), [against, tuned_id], spec.path("golden"))
    return {
        "set": path,
        "against": against,
        "models": {
            m: {k: (v["mean"] if v else None) for k, v in run.summary[m].items()}
            for m in run.models
        },
        "intervals": run.summary,
        "report": run.report_md,
    }
