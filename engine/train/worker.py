"""The training child process: ``python -m engine.train.worker RUN_DIR [--resume]``.

It reads ``RUN_DIR/spec.json`` and the encoded examples the parent wrote, trains a LoRA,
and speaks only JSON lines on stdout, one event each (every event and exit code is
defined in ``engine.protocol``)::

    {"event": "start", "backend": "peft", "reason": "...", "device": "cpu", "total_steps": 40}
    {"event": "eval", "phase": "before", "loss": 2.31}
    {"event": "progress", "step": 12, "total_steps": 40, "loss": 1.83, "lr": 0.0002,
     "tokens_per_second": 812.5, "eta_seconds": 31.0, "epoch": 0.9}
    {"event": "checkpoint", "step": 20}
    {"event": "done", "train_loss": ..., "eval_loss_before": ..., "eval_loss_after": ...}
    {"event": "error", "kind": "oom" | "invalid" | "failed", "message": "..."}

Anything libraries print goes to stderr (the parent keeps it in the run's log).

The loop is ``transformers.Trainer`` (``engine.train.hf_trainer`` says what Bastion adds
to it: one dataset item per optimizer step, packed forward passes, the loss on target
positions only, events through a callback). This module keeps what is the run's own: the
data order, loading the model (``backends``), the validation loss, and the export.

Stopping: SIGTERM, SIGINT, or the parent closing our stdin (it died) make the loop save a
checkpoint after the current step and exit with ``stopped``. A checkpoint is also saved
every ``save_every`` steps; it holds the LoRA weights, the optimizer and scheduler state,
the RNG state and where the run was, so ``--resume`` continues the same sequence of batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput
from engine.protocol import ErrorKind, Event, EventWriter, ExitCode
from engine.train.encode import Encoded
from engine.train.spec import RunSpec


class StopFlag:
    """Set by SIGTERM/SIGINT or when the parent's end of stdin closes."""

    def __init__(self) -> None:
        self.event = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        signal.signal(signal.SIGINT, lambda *_: self.event.set())
        threading.Thread(target=self._watch_parent, daemon=True).start()

    def _watch_parent(self) -> None:
        try:  # the raw descriptor: a buffered reader would hold a lock at shutdown
            while os.read(0, 1):
                pass
        except OSError:
            pass
        self.event.set()

    @property
    def stopped(self) -> bool:
        return self.event.is_set()


def read_encoded(path: Path) -> list[Encoded]:
    examples = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            examples.append(Encoded(record["ids"], [bool(t) for t in record["t"]], False))
    return examples


def write_encoded(path: Path, examples: list[Encoded]) -> None:
    from engine.paths import atomic_write_bytes

    lines = (json.dumps({"ids": e.ids, "t": [int(t) for t in e.targets]}) + "\n" for e in examples)
    atomic_write_bytes(path, "".join(lines).encode())


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (one with its state.json)."""
    found = sorted(root.glob("step-*/state.json"))
    return found[-1].parent if found else None


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return type(exc).__name__ == "OutOfMemoryError" or any(
        s in text for s in ("out of memory", "can't allocate memory", "not enough memory")
    )


class Trainer:
    """One run: data order, model, evaluation, and ``transformers.Trainer`` for the loop."""

    def __init__(self, spec: RunSpec, emit: EventWriter, stop: StopFlag) -> None:
        self.spec = spec
        self.hp = spec.hyper
        self.emit = emit
        self.stop = stop
        self.train = read_encoded(spec.path("train.jsonl"))
        self.val = read_encoded(spec.path("validation.jsonl"))
        if not self.train:
            raise InvalidInput("no training examples are left")
        longest = max(len(e.ids) for e in self.train + self.val)
        self.row_len = min(self.hp.max_length, max(longest, 512))
        self.steps_per_epoch = math.ceil(len(self.train) / self.hp.batch_size)
        self.total_steps = self.hp.max_steps or max(
            1, math.ceil(self.hp.epochs * self.steps_per_epoch)
        )
        self.save_every = self.hp.save_every or max(1, math.ceil(self.total_steps / 10))
        self.warmup = max(1, round(self.hp.warmup_ratio * self.total_steps))
        # What checkpoints carry besides Trainer's own state (state.json), and the last
        # step's loss and learning rate, which the loop's callback reports.
        self.state: dict[str, Any] = {"tokens": 0, "train_s": 0.0, "eval_before": None}
        self.step_loss = float("nan")
        self.step_lr = 0.0
        self.stopped_at: int | None = None

    # -- data order ------------------------------------------------------------------

    def examples_for(self, step: int) -> list[Encoded]:
        """The examples of optimizer step ``step``: a seeded shuffle per epoch, so a resumed
        run sees exactly the batches the first one would have."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.train)))
        random.Random(self.hp.seed * 1_000_003 + epoch).shuffle(order)
        chosen = order[index * self.hp.batch_size : (index + 1) * self.hp.batch_size]
        return [self.train[i] for i in chosen]

    # -- model -----------------------------------------------------------------------

    def load_model(self) -> None:
        import torch

        from engine.train import backends

        self.choice = backends.choose(self.spec.backend)
        self.emit(
            Event.START,
            backend=self.choice.name,
            reason=self.choice.reason,
            device=self.choice.device,
            total_steps=self.total_steps,
            examples=len(self.train),
            validation=len(self.val),
        )
        torch.manual_seed(self.hp.seed)
        folder = Path(self.spec.base_path)
        if self.spec.base_kind == "gguf":
            folder = backends.hf_folder_for_gguf(folder, Path(self.spec.cache_dir), self.emit)
        self.emit(Event.STATUS, message="loading the base model")
        self.model = backends.load(
            self.choice,
            folder,
            rank=self.hp.rank,
            alpha=self.hp.alpha,
            dropout=self.hp.dropout,
            max_length=self.hp.max_length,
            seed=self.hp.seed,
            gradient_checkpointing=self.hp.gradient_checkpointing,
        )
        if self.spec.init_adapter:
            self._start_from(Path(self.spec.init_adapter))
        base = self.model.get_base_model()
        self.decoder = base.get_decoder()
        self.head = base.get_output_embeddings()

    def _start_from(self, folder: Path) -> None:
        """Load an earlier fine-tune's LoRA weights as the starting point (``--from``)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        self.emit(Event.STATUS, message="starting from the earlier fine-tune's adapter")
        weights = load_file(str(folder / "adapter_model.safetensors"), device=self.choice.device)
        loaded = set_peft_model_state_dict(self.model, weights)
        unexpected = list(getattr(loaded, "unexpected_keys", []) or [])
        if unexpected:
            raise InvalidInput(
                f"the earlier adapter does not fit this model ({len(unexpected)} of its "
                f"weights have no place, e.g. {unexpected[0]})"
            )

    def make_loop(self) -> Any:
        """``transformers.Trainer`` set up for this run (``engine.train.hf_trainer``)."""
        from engine.train import hf_trainer

        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        return hf_trainer.StepTrainer(
            self,
            model=self.model,
            args=hf_trainer.training_arguments(self, dtype),
            train_dataset=hf_trainer.StepData(self),
            data_collator=hf_trainer.collate(self),
            callbacks=[hf_trainer.Events(self)],
        )

    def loss_sum(self, batch: Any) -> tuple[Any, int]:
        """Summed cross-entropy over the batch's targets, and their number."""
        import torch.nn.functional as F

        batch = batch.to(self.choice.device)
        hidden = self.decoder(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
        ).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.source)
        logits = self.head(picked).float()
        return F.cross_entropy(logits, batch.targets, reduction="sum"), len(batch.targets)

    def batches(self, examples: list[Encoded]) -> list[Any]:
        from engine.train.packing import make_batches

        # Unsloth's attention kernels are plain causal: they would let packed examples see
        # each other, so there each example keeps a row of its own.
        packed = self.choice.name != "unsloth"
        return make_batches(
            examples, self.row_len, self.hp.tokens_per_batch, self.spec.pad_id, packed
        )

    def evaluate(self) -> float | None:
        import torch

        if not self.val:
            return None
        self.model.eval()
        total = 0.0
        count = 0
        with torch.no_grad():
            for batch in self.batches(self.val):
                loss, n = self.loss_sum(batch)
                total += float(loss)
                count += n
        self.model.train()
        return total / max(count, 1)

    def metric(self, record: dict[str, Any]) -> None:
        with self.spec.path("metrics.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    # -- the run ---------------------------------------------------------------------

    def run(self, resume: bool) -> int:
        # The first events (start, loading) go out before transformers is imported: the
        # parent shows the planned steps as soon as it can.
        checkpoint = latest_checkpoint(self.spec.path("checkpoints")) if resume else None
        if checkpoint is not None and not (checkpoint / "trainer_state.json").is_file():
            raise InvalidInput(
                "this run's last checkpoint was written by an earlier version of Bastion's "
                "trainer and cannot be resumed: start the fine-tune again under another --name"
            )
        self.load_model()
        if checkpoint is None:
            shutil.rmtree(self.spec.path("checkpoints"), ignore_errors=True)
            self.spec.path("metrics.jsonl").unlink(missing_ok=True)
        loop = self.make_loop()
        _limit_memory()  # after the loop's imports and set-up: only training is capped
        if checkpoint is not None:
            self.state = json.loads((checkpoint / "state.json").read_text())
            self.emit(Event.RESUMED, step=int(self.state["step"]))
        else:
            self.emit(Event.STATUS, message="measuring validation loss before training")
            self.state["eval_before"] = self.evaluate()
            self.emit(Event.EVAL, phase="before", loss=self.state["eval_before"])
            self.metric({"step": 0, "eval_loss": self.state["eval_before"]})
        loop.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        step = int(loop.state.global_step)
        if self.stopped_at is not None:
            self.emit(Event.STOPPED, step=self.stopped_at)
            return ExitCode.STOPPED
        self.emit(Event.STATUS, message="measuring validation loss after training")
        eval_after = self.evaluate()
        self.emit(Event.EVAL, phase="after", loss=eval_after)
        self.metric({"step": step, "eval_loss": eval_after})
        outputs = self.export()
        self.emit(
            Event.DONE,
            train_loss=self.state.get("last_loss", self.step_loss),
            eval_loss_before=self.state["eval_before"],
            eval_loss_after=eval_after,
            tokens_per_second=round(self.state["tokens"] / max(self.state["train_s"], 1e-9), 1),
            train_seconds=round(self.state["train_s"], 2),
            steps=step,
            backend=self.choice.name,
            device=self.choice.device,
            **outputs,
        )
        return ExitCode.OK

    def export(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        from engine.train.arch import for_gguf
        from engine.train.export import write_gguf_lora

        self.emit(Event.STATUS, message="saving the adapter")
        adapter_dir = self.spec.path("adapter")
        tmp = self.spec.path(".adapter.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        shutil.rmtree(adapter_dir, ignore_errors=True)
        os.replace(tmp, adapter_dir)
        state = {
            k: v.detach().float().cpu().numpy()
            for k, v in get_peft_model_state_dict(self.model).items()
        }
        gguf_path = self.spec.path(f"{self.spec.name}.lora.gguf")
        write_gguf_lora(
            state,
            for_gguf(self.spec.arch, self.spec.name),
            alpha=self.hp.alpha,
            n_head=self.spec.n_head,
            n_head_kv=self.spec.n_head_kv,
            out=gguf_path,
            name=self.spec.name,
        )
        outputs: dict[str, Any] = {"adapter_dir": str(adapter_dir), "gguf": str(gguf_path)}
        if self.spec.merged:
            self.emit(Event.STATUS, message="writing the merged model")
            merged_dir = self.spec.path("merged")
            tmp = self.spec.path(".merged.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.merge_and_unload().save_pretrained(str(tmp))
            shutil.rmtree(merged_dir, ignore_errors=True)
            os.replace(tmp, merged_dir)
            outputs["merged_dir"] = str(merged_dir)
        return outputs


def _adamw(params: list[Any], lr: float, weight_decay: float) -> Any:
    """AdamW with the fused kernel where torch has one for this device, else for-each."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _limit_memory() -> None:
    """Honour ``BASTION_TRAIN_MEMORY_MB``: cap what training may allocate beyond the loaded
    model (address space, Linux and macOS), so a run that would swap the machine to a halt
    fails with a clear out-of-memory message instead."""
    limit_mb = os.environ.get("BASTION_TRAIN_MEMORY_MB")
    if not limit_mb:
        return
    import resource

    import psutil

    current = psutil.Process().memory_info().vms
    cap = current + int(float(limit_mb) * 1024 * 1024)
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    emit = EventWriter()
    stop = StopFlag()
    if not args:
        emit(Event.ERROR, kind=ErrorKind.INVALID, message="usage: worker RUN_DIR [--resume]")
        return ExitCode.INVALID
    from engine.privacy import guard

    guard.activate()
    spec = RunSpec.load(Path(args[0]) / "spec.json")
    # Unsloth compiles kernels into ./unsloth_compiled_cache unless told otherwise; nothing
    # may land in the user's working directory.
    os.environ.setdefault(
        "UNSLOTH_COMPILE_LOCATION", str(Path(spec.cache_dir) / "unsloth_compiled_cache")
    )
    trainer: Trainer | None = None
    try:
        trainer = Trainer(spec, emit, stop)
        return trainer.run(resume="--resume" in args)
    except InvalidInput as exc:
        emit(Event.ERROR, kind=ErrorKind.INVALID, message=str(exc))
        return ExitCode.INVALID
    except BaseException as exc:  # report it; the parent decides what the user sees
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        if is_oom(exc):
            message = str(exc).splitlines()[0][:300] if str(exc) else ""
            emit(Event.ERROR, kind=ErrorKind.OOM, message=message)
            return ExitCode.OOM
        import traceback

        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        emit(Event.ERROR, kind=ErrorKind.FAILED, message=message)
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
