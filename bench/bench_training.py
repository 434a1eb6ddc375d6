"""CPU fine-tuning throughput and peak memory of Bastion's training loop against the
strongest plain configuration: ``transformers.Trainer`` + PEFT, padding-free with
``DataCollatorWithFlattening``, on the same model, data, order and hyperparameters.

    .venv/bin/python bench/bench_training.py [--steps 9] [--repeats 3]

The data: 96 seeded synthetic chat conversations of varied length (short Q&A to a few
hundred tokens) rendered with the GGUF's chat template and tokenized with its llama.cpp
vocabulary by ``ExampleEncoder`` (max length 1024), once. Both sides train on exactly
these ids, with the loss on the assistant's tokens only, and see the same examples in
the same order (``worker.Trainer.examples_for``).

Both sides: the default SmolLM2-135M (dequantized to float32 by ``hf_folder_for_gguf``,
cached under ~/.cache/bastion-bench), LoRA r=16, alpha=32, dropout 0 on q/k/v/o/gate/up/
down, seed 0, 8 examples per optimizer step, Bastion's learning-rate schedule
(``worker.lr_at``: peak 2e-4), fused AdamW, gradients clipped to a norm of 1.0,
torch's default thread count (checked equal).

* Bastion: ``engine.train.worker.Trainer.run`` itself (peft backend) in-process, which
  trains with ``transformers.Trainer`` (``engine.train.hf_trainer.StepTrainer``: packed
  forward passes, logits at target positions only, ``max_grad_norm=1.0``); only the
  validation loss before and after and the export are skipped (its one checkpoint is
  written after the last timed step).
* Bastion, all logits (the ``ablation`` side; ``--no-ablation`` skips it): the same,
  with the output layer applied at every position and the targets picked from its
  logits, to see what the target-only logits are worth.
* baseline: ``transformers.Trainer`` with ``DataCollatorWithFlattening`` (each step's
  examples concatenated into one row with no padding, position ids restarting per
  example, which transformers turns into a block-diagonal causal mask on sdpa/eager),
  ``optim="adamw_torch_fused"``, ``max_grad_norm=1.0``, sequential order.

Before timing, the parent checks on this CPU that flattening keeps examples apart: the
hidden states of an example placed second in a flattened row must equal those of the
example alone (and, as a control, must not without the position ids).

Each side runs in a fresh process of its own, the sides taking turns, ``--repeats`` times.
Model loading and the first (warm-up) step are not timed; throughput is real (non-padding)
tokens of the timed steps per second, the same tokens on both sides. Peak memory is the
child's peak resident set (``ru_maxrss``) from the end of model loading (Linux: reset
through ``/proc/self/clear_refs``) and over the whole process. Medians, min-max
spreads and the ratios Bastion/baseline (goal >= 1.3x) are printed and put at the top of
``bench/results/training.md`` with the first-step losses as a cross-check (same data and
start, so they should agree).

CPU only, on any machine: Bastion is held to its peft backend on the CPU (a GPU would
make it pick CUDA or Unsloth) and the baseline runs with ``use_cpu=True``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from benchlib import machine, prepend_report, stamp  # noqa: E402 -- after the path is set

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_EXAMPLES, N_VALIDATION, SEED = 100, 4, 0  # 96 to train on: 12 steps an epoch
MARK = "BENCH-RESULT "
SIDES = ["bastion", "baseline", "ablation"]
_WORD_TEXT = (
    "the river model data light keeper harbour lamp lens signal stone tower night storm "
    "ship coast wave engine test value method small large early later because when while "
    "after before people often carefully quickly simple useful measure result change "
    "history village market garden winter summer journey letter question answer reason "
    "number system memory library window bridge mountain forest season travel record"
)
WORDS = _WORD_TEXT.split()


def noop(*_args: Any, **_fields: Any) -> None:
    """Stands in for the worker's ``Events``, which would take over stdout."""


class NoStop:
    stopped = False


def prose(rng: random.Random, n_words: int) -> str:
    sentences, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(6, 18))
        words = [rng.choice(WORDS) for _ in range(k)]
        sentences.append(" ".join(words).capitalize() + rng.choice(".!?."))
        left -= k
    return " ".join(sentences)


def synthetic_examples(n: int, seed: int) -> list[Any]:
    from engine.train.datasets import Example

    rng = random.Random(seed)
    examples = []
    for i in range(n):
        answer_words = int(math.exp(rng.uniform(math.log(15), math.log(230))))
        turns = [("user", prose(rng, rng.randint(5, 40))), ("assistant", prose(rng, answer_words))]
        if rng.random() < 0.3:
            turns.insert(0, ("system", prose(rng, rng.randint(8, 25))))
        examples.append(Example(tuple(turns), i + 1, "chat"))
    return examples


def prepare_run(run_dir: Path, cache_dir: Path, steps: int) -> Any:
    """Encode the data once and write the run folder both sides read."""
    from engine.chat.templates import ChatTemplate
    from engine.models.gguf_info import read_gguf_info
    from engine.models.tokenizer import Vocabulary
    from engine.paths import builtin_models_dirs
    from engine.train.backends import hf_folder_for_gguf
    from engine.train.encode import ExampleEncoder
    from engine.train.spec import Hyper, RunSpec
    from engine.train.worker import write_encoded

    found = [d / MODEL_FILE for d in builtin_models_dirs() if (d / MODEL_FILE).is_file()]
    if not found:
        raise SystemExit(f"{MODEL_FILE} is not in {builtin_models_dirs()}: run set-up first")
    model = found[0]
    info = read_gguf_info(model)
    vocab = Vocabulary(str(model))
    template = ChatTemplate(
        info.chat_template, vocab.token_text(vocab.bos_id), vocab.token_text(vocab.eos_id)
    )
    add_bos = info.metadata.get("tokenizer.ggml.add_bos_token", True) is not False
    encoded, _ = ExampleEncoder(vocab, template, add_bos, 1024).encode_all(
        synthetic_examples(N_EXAMPLES, SEED)
    )
    write_encoded(run_dir / "train.jsonl", encoded[N_VALIDATION:])
    write_encoded(run_dir / "validation.jsonl", encoded[:N_VALIDATION])
    hyper = Hyper(
        max_steps=steps, lr=2e-4, rank=16, alpha=32.0, dropout=0.0, batch_size=8,
        max_length=1024, seed=SEED, save_every=steps,
    )  # fmt: skip
    spec = RunSpec(
        name="bench", run_dir=str(run_dir), base_kind="gguf", base_path=str(model),
        arch=info.architecture, n_head=info.head_count or 0, n_head_kv=info.head_count_kv or 0,
        pad_id=vocab.eos_id, cache_dir=str(cache_dir), backend="peft", hyper=hyper.check(),
    )  # fmt: skip
    spec.save()
    hf_folder_for_gguf(model, cache_dir, noop)  # dequantize once, outside every timing
    return spec


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**2 if sys.platform == "darwin" else 1024)


def start_training_peak(peaks: dict[str, float]) -> None:
    """Keep the peak so far (model loading) and restart the count for the training steps:
    on Linux, writing 5 to ``/proc/self/clear_refs`` resets the peak resident set."""
    peaks["load"] = peak_rss_mib()
    with contextlib.suppress(OSError):  # elsewhere the training peak includes loading
        Path("/proc/self/clear_refs").write_text("5")


def measured(
    trainer: Any, stamps: dict[int, float], losses: dict[int, float], peaks: dict[str, float]
) -> dict[str, Any]:
    """Steps 2..N: seconds (end of step 1 to end of step N), real tokens; step 1's loss;
    the peak resident set while training and over the whole process."""
    import torch

    n = trainer.total_steps
    tokens = sum(len(e.ids) for s in range(1, n) for e in trainer.examples_for(s))
    train_peak = peak_rss_mib()
    return {"seconds": stamps[n] - stamps[1], "tokens": tokens, "first_loss": losses[1],
            "threads": torch.get_num_threads(), "train_rss_mib": train_peak,
            "peak_rss_mib": max(train_peak, peaks["load"])}  # fmt: skip


def run_bastion(run_dir: Path, all_logits: bool = False) -> dict[str, Any]:
    """Bastion's own ``Trainer.run``; its progress events (one per step) are the clock.
    With ``all_logits``, the output layer runs at every position (the ablation)."""
    import torch.nn.functional as F

    from engine.train import backends, hf_trainer, worker
    from engine.train.spec import RunSpec

    spec = RunSpec.load(run_dir / "spec.json")
    hf_trainer.PROGRESS_EVERY_S = 0.0  # a progress event after every step, not every 0.25 s
    backends.choose = lambda requested: backends.BackendChoice("peft", "cpu", "benchmark")
    stamps: dict[int, float] = {}
    losses: dict[int, float] = {}
    peaks: dict[str, float] = {}

    def emit(event: str, **fields: Any) -> None:
        if event == "progress":
            stamps[fields["step"]] = time.perf_counter()
            losses[fields["step"]] = fields["loss"]

    class BenchTrainer(worker.Trainer):  # evaluation and export: outside the step loop
        def make_loop(self) -> Any:
            loop = super().make_loop()
            start_training_peak(peaks)  # as the baseline: once Trainer is set up
            return loop

        def loss_sum(self, batch: Any) -> tuple[Any, int]:
            if not all_logits:
                return super().loss_sum(batch)
            batch = batch.to(self.choice.device)
            hidden = self.decoder(
                input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
            ).last_hidden_state
            logits = self.head(hidden).float()
            picked = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.source)
            return F.cross_entropy(picked, batch.targets, reduction="sum"), len(batch.targets)

        def evaluate(self) -> float | None:
            return None

        def export(self) -> dict[str, Any]:
            return {}

    trainer = BenchTrainer(spec, emit, NoStop())  # type: ignore[arg-type]
    trainer.run(resume=False)
    return measured(trainer, stamps, losses, peaks)


def load_hf_model(spec: Any) -> Any:
    """The float32 base model, loaded the way Bastion's peft backend loads it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from engine.train.backends import hf_folder_for_gguf

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    folder = hf_folder_for_gguf(Path(spec.base_path), Path(spec.cache_dir), noop)
    return AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, local_files_only=True
    )


def run_baseline(run_dir: Path) -> dict[str, Any]:
    """``transformers.Trainer`` + PEFT, padding-free, on the same examples in the same order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from engine.train.arch import TARGET_MODULES
    from engine.train.hf_trainer import MAX_GRAD_NORM
    from engine.train.spec import RunSpec
    from engine.train.worker import Trainer as BastionTrainer
    from engine.train.worker import lr_at

    spec = RunSpec.load(run_dir / "spec.json")
    hp = spec.hyper
    order = BastionTrainer(spec, noop, NoStop())  # type: ignore[arg-type]  # data only
    steps = order.total_steps
    examples = [e for s in range(steps) for e in order.examples_for(s)]
    masked = [[i if t else -100 for i, t in zip(e.ids, e.targets, strict=True)] for e in examples]
    data = [{"input_ids": e.ids, "labels": m} for e, m in zip(examples, masked, strict=True)]

    stamps: dict[int, float] = {}
    losses: dict[int, float] = {}
    peaks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            start_training_peak(peaks)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            stamps[state.global_step] = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    class SameSchedule(Trainer):  # Bastion's warm-up and cosine to a tenth, step for step
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    lambda s: lr_at(s, steps, hp.lr, order.warmup) / hp.lr,
                )
            return self.lr_scheduler

    torch.manual_seed(hp.seed)
    model: Any = load_hf_model(spec)
    config = LoraConfig(
        r=hp.rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout,  # type: ignore[arg-type]
        target_modules=list(TARGET_MODULES), bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, config)
    with tempfile.TemporaryDirectory(prefix="bastion-bench-hf-") as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=hp.batch_size, max_steps=steps,
            learning_rate=hp.lr, weight_decay=hp.weight_decay, optim="adamw_torch_fused",
            max_grad_norm=MAX_GRAD_NORM, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
            train_sampling_strategy="sequential", seed=hp.seed, disable_tqdm=True,
        )  # fmt: skip
        trainer = SameSchedule(
            model=model, args=args, train_dataset=data,
            data_collator=DataCollatorWithFlattening(), callbacks=[Clock()],
        )  # fmt: skip
        trainer.train()
    return {
        **measured(order, stamps, losses, peaks),
        "optim": getattr(args.optim, "value", str(args.optim)),
        "attn": model.config._attn_implementation,
        "use_cache": bool(model.config.use_cache),  # a KV cache would disable the packed mask
    }


def isolation_check(spec: Any) -> dict[str, Any]:
    """Does flattening keep examples apart on this CPU? The largest difference between the
    hidden states of an example placed second in a flattened batch and of that example
    alone: with the collator's position ids (should be ~0) and without (the control)."""
    import torch
    from transformers import DataCollatorWithFlattening

    from engine.train.worker import Trainer as BastionTrainer

    model = load_hf_model(spec).eval()
    model.config.use_cache = False  # as Trainer sets it (use_cache=False by default)
    decoder = model.get_decoder()
    first, second = BastionTrainer(spec, noop, NoStop()).examples_for(0)[:2]  # type: ignore[arg-type]
    flat = DataCollatorWithFlattening()([{"input_ids": first.ids}, {"input_ids": second.ids}])
    n = len(first.ids)
    with torch.no_grad():
        alone = decoder(input_ids=torch.tensor([second.ids])).last_hidden_state[0]
        packed = decoder(input_ids=flat["input_ids"], position_ids=flat["position_ids"])
        leaky = decoder(input_ids=flat["input_ids"])
    return {
        "attn": model.config._attn_implementation,
        "packed": float((packed.last_hidden_state[0, n:] - alone).abs().max()),
        "control": float((leaky.last_hidden_state[0, n:] - alone).abs().max()),
    }


def work_per_step(spec: Any, steps: int) -> dict[str, float]:
    """Positions computed (padding included) and output-layer rows per timed step."""
    from engine.train.backends import BackendChoice
    from engine.train.worker import Trainer as BastionTrainer

    trainer = BastionTrainer(spec, noop, NoStop())  # type: ignore[arg-type]
    trainer.choice = BackendChoice("peft", "cpu", "benchmark")  # as load_model would set
    timed = [trainer.examples_for(s) for s in range(1, steps)]
    batches = [b for ex in timed for b in trainer.batches(ex)]
    totals = {
        "bastion_positions": sum(b.input_ids.numel() for b in batches),
        "bastion_logits": sum(len(b.targets) for b in batches),
        "real_tokens": sum(len(e.ids) for ex in timed for e in ex),  # flattened: no padding
    }
    return {k: v / len(timed) for k, v in totals.items()}


def wait_for_quiet(limit_s: float = 180.0) -> None:
    """Start a side only once the machine is nearly idle (other work skews the clock)."""
    import psutil

    deadline = time.monotonic() + limit_s
    while psutil.cpu_percent(interval=2.0) > 15.0 and time.monotonic() < deadline:
        pass


def run_side(side: str, run_dir: Path) -> dict[str, Any]:
    """One side in a fresh process; adds ``others``: the share of the machine's CPU that
    other processes used meanwhile (a sign the numbers of that run are skewed)."""
    import psutil

    wait_for_quiet()
    cmd = [sys.executable, __file__, "--side", side, "--run-dir", str(run_dir)]
    cpu_before, began = psutil.cpu_times(), time.monotonic()
    own_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.monotonic() - began
    cpu_after, own_after = psutil.cpu_times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not found:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(found[-1][len(MARK) :])

    def busy(t: Any) -> float:
        return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)

    own = sum(getattr(own_after, f) - getattr(own_before, f) for f in ("ru_utime", "ru_stime"))
    others = (busy(cpu_after) - busy(cpu_before) - own) / (wall * (os.cpu_count() or 1))
    result["others"] = max(0.0, others)
    return result


def spread(values: list[float], fmt: str) -> str:
    """Median and (min-max) of ``values``."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=9, help="optimizer steps (first untimed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-ablation", action="store_true", help="skip Bastion with logits at every position"
    )
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        if args.side == "baseline":
            result = run_baseline(args.run_dir)
        else:
            result = run_bastion(args.run_dir, all_logits=args.side == "ablation")
        sys.stdout.write(MARK + json.dumps(result) + "\n")
        return 0
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not timed")

    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bastion-bench"
    print(f"machine: {machine()}", file=sys.stderr)
    from engine.train.hf_trainer import MAX_GRAD_NORM

    sides = SIDES[:2] if args.no_ablation else SIDES
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="bastion-bench-train-") as tmp:
        run_dir = Path(tmp)
        spec = prepare_run(run_dir, cache_dir, args.steps)
        work = work_per_step(spec, args.steps)
        iso = isolation_check(spec)
        print(
            f"isolation ({iso['attn']}): max |hidden diff| {iso['packed']:.2e} flattened, "
            f"{iso['control']:.2e} without position ids",
            file=sys.stderr,
        )
        if not iso["packed"] < 1e-3 < iso["control"]:
            raise SystemExit("flattening lets examples attend to each other on this machine")
        for i in range(args.repeats):
            for side in sides[i % len(sides) :] + sides[: i % len(sides)]:  # take turns
                r = run_side(side, run_dir)
                results[side].append(r)
                print(
                    f"repeat {i + 1} {side}: {r['tokens'] / r['seconds']:.1f} tok/s "
                    f"({r['seconds']:.1f} s), peak RSS {r['train_rss_mib']:.0f} MiB training, "
                    f"{r['peak_rss_mib']:.0f} MiB in all, "
                    f"first loss {r['first_loss']:.4f}, {r['threads']} threads, "
                    f"other processes {r['others']:.0%} of the CPU",
                    file=sys.stderr,
                )

    base = results["baseline"]
    if any(r["use_cache"] for r in base):
        raise SystemExit("the baseline ran with a KV cache: its packed mask was not used")
    everyone = [r for side in sides for r in results[side]]
    threads = {r["threads"] for r in everyone}
    if len(threads) != 1:
        raise SystemExit(f"the sides ran with different torch thread counts: {threads}")
    tps = {s: [r["tokens"] / r["seconds"] for r in results[s]] for s in results}
    rss = {s: [r["train_rss_mib"] for r in results[s]] for s in results}
    rss_all = {s: [r["peak_rss_mib"] for r in results[s]] for s in results}
    loss1 = {s: statistics.median(r["first_loss"] for r in results[s]) for s in results}
    ratio = statistics.median(tps["bastion"]) / statistics.median(tps["baseline"])
    pairs = [a / b for a, b in zip(tps["bastion"], tps["baseline"], strict=True)]
    mem_ratio = statistics.median(rss["bastion"]) / statistics.median(rss["baseline"])
    all_ratio = statistics.median(rss_all["bastion"]) / statistics.median(rss_all["baseline"])
    verdict = "met" if ratio >= 1.3 else "NOT met"
    rows = [
        ("training throughput, real tokens/s, median (min-max)", spread(tps["baseline"], ".1f"),
         spread(tps["bastion"], ".1f"),
         f"**{ratio:.2f}x** (per repeat {min(pairs):.2f}-{max(pairs):.2f}x; goal >= 1.3x: "
         f"{verdict})"),
        ("peak RSS while training (model loaded), MiB, median (min-max)",
         spread(rss["baseline"], ".0f"), spread(rss["bastion"], ".0f"), f"{mem_ratio:.2f}x"),
        ("peak RSS of the whole process (loading included), MiB",
         spread(rss_all["baseline"], ".0f"), spread(rss_all["bastion"], ".0f"),
         f"{all_ratio:.2f}x"),
        ("positions computed per step (incl. padding)", f"{work['real_tokens']:.0f}",
         f"{work['bastion_positions']:.0f}", f"real tokens: {work['real_tokens']:.0f}"),
        ("output-layer rows per step", f"{work['real_tokens']:.0f}",
         f"{work['bastion_logits']:.0f}", "targets only vs every position"),
        ("loss at step 1 (cross-check)", f"{loss1['baseline']:.4f}", f"{loss1['bastion']:.4f}",
         f"{loss1['bastion'] - loss1['baseline']:+.4f}"),
    ]  # fmt: skip
    if "ablation" in results:
        gain = statistics.median(tps["bastion"]) / statistics.median(tps["ablation"])
        saved = statistics.median(rss["bastion"]) / statistics.median(rss["ablation"])
        rows += [
            ("ablation: Bastion with the output layer at every position, real tokens/s", "",
             spread(tps["ablation"], ".1f"),
             f"target-only logits: {gain:.2f}x its throughput"),
            ("ablation: its peak RSS while training, MiB", "", spread(rss["ablation"], ".0f"),
             f"target-only logits: {saved:.2f}x its memory"),
            ("ablation: loss at step 1", "", f"{loss1['ablation']:.4f}",
             f"{loss1['ablation'] - loss1['bastion']:+.4f} vs Bastion"),
        ]  # fmt: skip
    report = "\n".join(
        [
            f"### {stamp()}",
            "",
            f"Machine: {machine()}  ",
            f"Model: {MODEL_FILE} (float32 on CPU, {threads.pop()} torch threads both sides); "
            f"{N_EXAMPLES - N_VALIDATION} synthetic chat examples, LoRA r=16 alpha=32 on "
            f"q/k/v/o/gate/up/down, lr 2e-4 (Bastion's schedule on both sides), 8 examples "
            f"per step, gradients clipped to norm {MAX_GRAD_NORM} on both sides, "
            f"{args.steps} steps (first untimed), {args.repeats} runs per side taking turns, "
            "each in a fresh process started once the machine was idle; other processes "
            f"used at most {max(r['others'] for r in everyone):.0%} of the CPU during a run.",
            "",
            "| measure | Trainer + PEFT, padding-free (baseline) | Bastion | Bastion vs baseline |",
            "|---|---|---|---|",
            *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
            "",
            f"**Goal (Bastion >= 1.3x the strongest plain configuration): {verdict}** "
            f"({ratio:.2f}x throughput, {mem_ratio:.2f}x peak memory while training).",
            "",
            "Bastion: `engine.train.worker.Trainer.run`, which trains with "
            "`transformers.Trainer` (`engine.train.hf_trainer.StepTrainer`): each step's "
            "examples packed into rows (position ids restart per example: no attention "
            "across examples; a pass is padded to its longest row only), the output layer "
            "only at target positions (a custom loss), fused AdamW, "
            f"`max_grad_norm={MAX_GRAD_NORM}`, events through a callback. "
            "Baseline: `transformers.Trainer` + PEFT "
            "with `DataCollatorWithFlattening` (the step's examples in one row, no padding, "
            f"position ids restarting per example; {base[0]['attn']} attention), logits at "
            f"every position, optimizer `{base[0]['optim']}`, `max_grad_norm={MAX_GRAD_NORM}`. "
            f"Isolation check ({iso['attn']}): an example flattened after another differs "
            f"from it alone by at most {iso['packed']:.1e} in its hidden states "
            f"({iso['control']:.1e} without position ids).",
        ]
    )
    print(report)
    print(f"written to the top of {prepend_report('training', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
