"""The training loop: ``transformers.Trainer`` fitted to Bastion's run (data, loss, events).

``transformers.Trainer`` owns the loop: the optimizer step, gradient clipping
(``max_grad_norm`` 1.0), the learning-rate schedule, mixed precision, checkpoints and
resuming (it skips the batches a checkpoint has seen and restores the RNG state). What is
Bastion's own, and why:

- One dataset item is one optimizer step: the ``batch_size`` examples that
  ``worker.Trainer.examples_for`` picks for it (a seeded shuffle per epoch), read in order
  (``train_sampling_strategy="sequential"``), so a resumed run sees exactly the batches
  of the uninterrupted one, and a short last step of an epoch stays short.
- The collator packs a step's examples into forward passes of at most
  ``tokens_per_batch`` tokens (``packing.make_batches``: position ids restart per
  example, no attention across examples, a pass padded only to its longest row), and
  ``training_step`` runs a backward pass after each: memory is bounded by one pass, not
  by the step. Trainer's own gradient accumulation takes a fixed number of micro-batches
  per step, which a packed step does not have.
- ``compute_loss`` sends only the positions that predict a target through the output
  layer: cross-entropy summed there and divided by the step's number of targets (the
  ``num_items_in_batch`` of the step), so the step's loss is the mean over its targets.
- The optimizer is ``worker._adamw`` (fused AdamW, for-each where the device has no fused
  kernel); the schedule is ``worker.lr_at`` through a ``LambdaLR``.
- Checkpoints are Trainer's (adapter, optimizer, scheduler, RNG, trainer state) plus
  Bastion's ``state.json`` (tokens, seconds, the loss before training), renamed
  ``checkpoints/step-NNNNNNN`` once complete (the rename is atomic; ``state.json`` is
  written last), two kept.
- Events go out through ``Events``, a ``TrainerCallback``: progress at most every
  ``PROGRESS_EVERY_S`` seconds, a checkpoint event per save; when the stop flag is up it
  asks Trainer to save and stop after the current step.

Unsloth: ``backends.load`` returns a PEFT model for it too, and the same loop drives it
(one row per example, since its attention ignores restarting positions; bf16 or fp16 as
it loaded the weights). That path needs an NVIDIA GPU and is not exercised by the tests.

This module runs inside the training child process only; it imports transformers at
import time, so ``worker`` imports it once the model is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from engine.protocol import Event
from engine.train.packing import Batch

if TYPE_CHECKING:
    from engine.train.worker import Trainer as Run

KEEP_CHECKPOINTS = 2
PROGRESS_EVERY_S = 0.25
MAX_GRAD_NORM = 1.0


class StepData(torch.utils.data.Dataset[Any]):
    """Item ``i``: the examples of optimizer step ``i``."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def __len__(self) -> int:
        return self.run.total_steps

    def __getitem__(self, index: int) -> Any:
        return self.run.examples_for(index)


def training_arguments(run: Run, dtype: torch.dtype) -> TrainingArguments:
    """Trainer's settings for ``run``; precision follows the weights the backend loaded."""
    hp = run.hp
    return TrainingArguments(
        output_dir=str(run.spec.path("checkpoints")),
        per_device_train_batch_size=1,  # one item: a whole step's examples
        gradient_accumulation_steps=1,
        max_steps=run.total_steps,
        learning_rate=hp.lr,
        weight_decay=hp.weight_decay,
        max_grad_norm=MAX_GRAD_NORM,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=run.choice.device == "cpu",
        seed=hp.seed,
        logging_strategy="no",  # progress goes out through Events
        save_strategy="steps",
        save_steps=run.save_every,
        save_total_limit=None,  # Trainer only rotates checkpoint-*; _save_checkpoint does it
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=True,
    )


class StepTrainer(Trainer):
    """``transformers.Trainer`` with Bastion's steps, loss, optimizer and checkpoints."""

    def __init__(self, run: Run, **kwargs: Any) -> None:
        self.run = run
        super().__init__(**kwargs)
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)

    def create_optimizer(self, model: Any = None) -> Any:
        from engine.train.worker import _adamw

        if self.optimizer is None:
            params = [p for p in self.run.model.parameters() if p.requires_grad]
            self.optimizer = _adamw(params, self.args.learning_rate, self.args.weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        from engine.train.worker import lr_at

        if self.lr_scheduler is None:
            run = self.run
            to_schedule = optimizer or self.optimizer
            assert to_schedule is not None  # create_optimizer ran first
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                to_schedule,
                lambda s: lr_at(s, run.total_steps, run.hp.lr, run.warmup) / run.hp.lr,
            )
        return self.lr_scheduler

    def compute_loss(
        self,
        model: Any,
        inputs: Any,
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """One forward pass's share of the step's loss: its targets' summed cross-entropy
        divided by the step's number of targets (logits at target positions only)."""
        total, _n = self.run.loss_sum(inputs)
        return total / num_items_in_batch

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        """A whole optimizer step's forward and backward passes, one packed pass at a time."""
        assert self.optimizer is not None  # Trainer creates it before the first step
        model.train()
        batches: list[Batch] = inputs["batches"]
        n_targets = inputs["n_targets"]
        self.run.step_lr = float(self.optimizer.param_groups[0]["lr"])
        total = torch.zeros((), device=self.args.device)
        for batch in batches:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, batch, num_items_in_batch=n_targets)
            self.accelerator.backward(loss)
            total += loss.detach().to(total.device)
        self.run.step_loss = float(total)
        self.run.state["tokens"] += inputs["tokens"]
        return total

    def floating_point_ops(self, inputs: Any) -> int:
        return 0  # not tracked; the default looks for input_ids in a dict we don't have

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Loaded here rather than by Trainer so that the rule every ``torch.load`` in the
        # engine follows is visible in it (tests/test_hardening_input.py): weights_only,
        # never pickled code, even if a default changes or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
        # is set. One process, one device: Trainer's other branches don't apply.
        if checkpoint is None:
            return
        assert self.optimizer is not None and self.lr_scheduler is not None
        folder = Path(checkpoint)
        self.optimizer.load_state_dict(
            torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        )
        self.lr_scheduler.load_state_dict(
            torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True)
        )

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Trainer's checkpoint, plus ``state.json``, renamed ``step-NNNNNNN``."""
        super()._save_checkpoint(model, trial)
        step = self.state.global_step
        root = Path(str(self.args.output_dir))
        saved = root / f"checkpoint-{step}"
        self.run.state["step"] = step
        (saved / "state.json").write_text(json.dumps(self.run.state))
        for path in saved.iterdir():
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        final = root / f"step-{step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(saved, final)
        for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)


def collate(run: Run) -> Any:
    """The collator: one step's examples packed into forward passes (see the docstring)."""

    def collate_step(items: list[Any]) -> dict[str, Any]:
        (examples,) = items
        return {
            "batches": run.batches(examples),
            "n_targets": sum(e.n_targets for e in examples),
            "tokens": sum(len(e.ids) for e in examples),
        }

    return collate_step


class Events(TrainerCallback):
    """Progress, checkpoint and metrics out of Trainer's loop; the stop flag into it."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.began = 0.0
        self.last_report = 0.0
        self.recent: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.began = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        run = self.run
        step = state.global_step
        spent = time.perf_counter() - self.began
        run.state["train_s"] += spent
        run.state["last_loss"] = run.step_loss
        self.recent = [*self.recent, spent][-20:]
        run.metric({"step": step, "loss": run.step_loss, "lr": run.step_lr})
        now = time.monotonic()
        per_step = sum(self.recent) / len(self.recent)
        if now - self.last_report >= PROGRESS_EVERY_S or step == run.total_steps:
            self.last_report = now
            run.emit(
                Event.PROGRESS,
                step=step,
                total_steps=run.total_steps,
                epoch=round(step / run.steps_per_epoch, 3),
                loss=round(run.step_loss, 5),
                lr=run.step_lr,
                tokens_per_second=round(run.state["tokens"] / max(run.state["train_s"], 1e-9), 1),
                eta_seconds=round(per_step * (run.total_steps - step), 1),
            )
        if run.stop.stopped and step < run.total_steps:
            run.stopped_at = step
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.run.emit(Event.CHECKPOINT, step=state.global_step)
