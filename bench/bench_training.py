"""CPU fine-tuning throughput of Bastion's training loop against a plain transformers
``Trainer`` + PEFT baseline, on the same model, data and hyperparameters, in the same run.

    .venv/bin/python bench/bench_training.py [--steps 6] [--repeats 3]

The data: 96 seeded synthetic chat conversations of varied length (short Q&A to a few
hundred tokens) rendered with the GGUF's chat template and tokenized with its llama.cpp
vocabulary by ``ExampleEncoder`` (max length 1024), once. Both sides train on exactly
these ids, with the loss on the assistant's tokens only, and see the same examples in
the same order (``worker.Trainer.examples_for``).

Both sides: the default SmolLM2-135M (dequantized to float32 by ``hf_folder_for_gguf``,
cached under ~/.cache/bastion-bench), LoRA r=16, alpha=32, dropout 0 on q/k/v/o/gate/up/
down, lr 2e-4, 8 examples per optimizer step, seed 0, torch's default thread count.

* Bastion: ``engine.train.worker.Trainer.run`` itself (peft backend) in-process; only the
  work after the step loop (evaluation, checkpoint, export) is skipped.
* baseline: ``transformers.Trainer`` with each batch padded to its longest example,
  labels -100 off the targets, no gradient clipping (Bastion has none), sequential order.

Each side runs in a fresh process of its own, the two alternating, ``--repeats`` times.
Model loading and the first (warm-up) step are not timed; throughput is real (non-padding)
tokens of the timed steps per second, the same tokens on both sides. Medians and the ratio
Bastion/baseline (goal >= 1.3x) are printed and appended to ``bench/results/training.md``
with the first-step losses as a cross-check (same data and start, so they should agree).

CPU only, on any machine: Bastion is held to its peft backend on the CPU (a GPU would
make it pick CUDA or Unsloth) and the baseline runs with ``use_cpu=True``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
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

from benchlib import append_report, machine, stamp  # noqa: E402 -- after the path is set

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_EXAMPLES, N_VALIDATION, SEED = 100, 4, 0  # 96 to train on: 12 steps an epoch
MARK = "BENCH-RESULT "
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


def measured(trainer: Any, stamps: dict[int, float], losses: dict[int, float]) -> dict[str, Any]:
    """Steps 2..N: seconds (end of step 1 to end of step N), real tokens; step 1's loss."""
    import torch

    n = trainer.total_steps
    tokens = sum(len(e.ids) for s in range(1, n) for e in trainer.examples_for(s))
    return {"seconds": stamps[n] - stamps[1], "tokens": tokens, "first_loss": losses[1],
            "threads": torch.get_num_threads()}  # fmt: skip


def run_bastion(run_dir: Path) -> dict[str, Any]:
    """Bastion's own ``Trainer.run``; its progress events (one per step) are the clock."""
    from engine.train import backends, worker
    from engine.train.spec import RunSpec

    spec = RunSpec.load(run_dir / "spec.json")
    worker._PROGRESS_EVERY_S = 0.0  # a progress event after every step, not every 0.25 s
    backends.choose = lambda requested: backends.BackendChoice("peft", "cpu", "benchmark")
    stamps: dict[int, float] = {}
    losses: dict[int, float] = {}

    def emit(event: str, **fields: Any) -> None:
        if event == "progress":
            stamps[fields["step"]] = time.perf_counter()
            losses[fields["step"]] = fields["loss"]

    class BenchTrainer(worker.Trainer):  # evaluation and saving: outside the step loop
        def evaluate(self) -> float | None:
            return None

        def save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
            pass

        def export(self) -> dict[str, Any]:
            return {}

    trainer = BenchTrainer(spec, emit, NoStop())  # type: ignore[arg-type]
    trainer.run(resume=False)
    return measured(trainer, stamps, losses)


def run_baseline(run_dir: Path) -> dict[str, Any]:
    """A plain ``transformers.Trainer`` + PEFT run on the same examples in the same order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from engine.train.arch import TARGET_MODULES
    from engine.train.backends import hf_folder_for_gguf
    from engine.train.spec import RunSpec
    from engine.train.worker import Trainer as BastionTrainer

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    spec = RunSpec.load(run_dir / "spec.json")
    hp = spec.hyper
    order = BastionTrainer(spec, noop, NoStop())  # type: ignore[arg-type]  # data only
    steps = order.total_steps
    examples = [e for s in range(steps) for e in order.examples_for(s)]
    masked = [[i if t else -100 for i, t in zip(e.ids, e.targets, strict=True)] for e in examples]
    data = [{"input_ids": e.ids, "labels": m} for e, m in zip(examples, masked, strict=True)]

    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        out = {k: torch.full((len(features), longest), v) for k, v in
               (("input_ids", spec.pad_id), ("attention_mask", 0), ("labels", -100))}  # fmt: skip
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            out["input_ids"][row, :n] = torch.tensor(f["input_ids"])
            out["attention_mask"][row, :n] = 1
            out["labels"][row, :n] = torch.tensor(f["labels"])
        return out

    stamps: dict[int, float] = {}
    losses: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            stamps[state.global_step] = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    folder = hf_folder_for_gguf(Path(spec.base_path), Path(spec.cache_dir), noop)
    torch.manual_seed(hp.seed)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, local_files_only=True
    )
    config = LoraConfig(
        r=hp.rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout,  # type: ignore[arg-type]
        target_modules=list(TARGET_MODULES), bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, config)
    with tempfile.TemporaryDirectory(prefix="bastion-bench-hf-") as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=hp.batch_size, max_steps=steps,
            learning_rate=hp.lr, weight_decay=hp.weight_decay, lr_scheduler_type="cosine",
            max_grad_norm=0.0, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
            train_sampling_strategy="sequential", seed=hp.seed, disable_tqdm=True,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Clock()]
        )
        trainer.train()
    return {**measured(order, stamps, losses), "optim": getattr(args.optim, "value", "?")}


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
        "baseline_positions": sum(len(ex) * max(len(e.ids) for e in ex) for ex in timed),
        "real_tokens": sum(len(e.ids) for ex in timed for e in ex),
    }
    return {k: v / len(timed) for k, v in totals.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps (first untimed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=["bastion", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = (run_bastion if args.side == "bastion" else run_baseline)(args.run_dir)
        sys.stdout.write(MARK + json.dumps(result) + "\n")
        return 0
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not timed")

    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bastion-bench"
    print(f"machine: {machine()}", file=sys.stderr)
    results: dict[str, list[dict[str, Any]]] = {"bastion": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="bastion-bench-train-") as tmp:
        run_dir = Path(tmp)
        spec = prepare_run(run_dir, cache_dir, args.steps)
        work = work_per_step(spec, args.steps)
        for i in range(args.repeats):
            sides = ["bastion", "baseline"] if i % 2 == 0 else ["baseline", "bastion"]
            for side in sides:
                cmd = [sys.executable, __file__, "--side", side, "--run-dir", str(run_dir)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                found = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
                if proc.returncode != 0 or not found:
                    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                    raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
                r = json.loads(found[-1][len(MARK) :])
                results[side].append(r)
                print(
                    f"repeat {i + 1} {side}: {r['tokens'] / r['seconds']:.1f} tok/s "
                    f"({r['seconds']:.1f} s), first loss {r['first_loss']:.4f}",
                    file=sys.stderr,
                )

    def median(side: str, f: Any) -> float:
        return float(statistics.median(f(r) for r in results[side]))

    tps = {s: median(s, lambda r: r["tokens"] / r["seconds"]) for s in results}
    loss1 = {s: median(s, lambda r: r["first_loss"]) for s in results}
    ratio = tps["bastion"] / tps["baseline"]
    base, ours = results["baseline"][0], results["bastion"][0]
    rows = [
        ("training throughput, real tokens/s", f"{tps['baseline']:.1f}", f"{tps['bastion']:.1f}",
         f"**{ratio:.2f}x** (goal >= 1.3x)"),
        ("positions computed per step (incl. padding)", f"{work['baseline_positions']:.0f}",
         f"{work['bastion_positions']:.0f}", f"real tokens: {work['real_tokens']:.0f}"),
        ("output-layer rows per step", f"{work['baseline_positions']:.0f}",
         f"{work['bastion_logits']:.0f}", "targets only vs every position"),
        ("loss at step 1 (cross-check)", f"{loss1['baseline']:.4f}", f"{loss1['bastion']:.4f}",
         f"{loss1['bastion'] - loss1['baseline']:+.4f}"),
    ]  # fmt: skip
    report = "\n".join(
        [
            f"### {stamp()}",
            "",
            f"Machine: {machine()}  ",
            f"Model: {MODEL_FILE} (float32 on CPU, {ours['threads']} torch threads both sides); "
            f"{N_EXAMPLES - N_VALIDATION} synthetic chat examples, LoRA r=16 alpha=32 on "
            f"q/k/v/o/gate/up/down, lr 2e-4, 8 examples per step, {args.steps} steps "
            f"(first untimed), medians of {args.repeats} alternating runs.",
            "",
            "| measure | Trainer + PEFT (baseline) | Bastion | Bastion vs baseline |",
            "|---|---|---|---|",
            *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
            "",
            "Bastion: `engine.train.worker.Trainer.run`, packing each step's examples into rows "
            "(position ids restart per example: no attention across examples; a pass is "
            "padded to its longest row only), the output layer only at target positions, "
            "fused AdamW. Baseline: `transformers.Trainer` + PEFT, each batch padded to its "
            "longest example with an attention mask, logits at every position, optimizer "
            f"`{base['optim']}`, no gradient clipping.",
        ]
    )
    print(report)
    print(f"appended to {append_report('training', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
