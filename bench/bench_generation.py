"""Generation speed of the engine against a bare llama-cpp-python loop, in the same run.

    .venv/bin/python bench/bench_generation.py [--runs 7] [--tokens 128]

Each in-process measurement runs in a fresh process of its own, the two sides
alternating: llama.cpp's OpenMP thread team belongs to the thread that first computes, so
running both sides in one process would leave two teams competing for the cores.

Both sides use the same model (the default SmolLM2-135M Q4_1), the same prompt text
rendered with the model's chat template, the same thread count (physical cores), greedy
sampling and the same token budget. The KV cache is cleared before every run on both
sides, so each run evaluates the whole prompt. Measured:

* in-process: model load (``Llama(...)`` vs. ``Engine.load_model`` with the model host
  process already started, as the desktop app and a server have it), time to first token
  (from the call to the first text) and generation rate (tokens after the first / time
  from first to last) -- ``Engine.chat`` vs. ``Llama.generate``. The engine's model runs
  in the model host process, so its numbers include the trip across the pipe; starting
  that process (before any load) is printed on its own line;
* command line: time from process start to the first byte on stdout and total wall time --
  ``bastion chat PROMPT`` vs. a bare script that loads the model and streams the answer.

Medians over the runs, the ratio engine/bare, and the date and machine are printed and
appended to ``bench/results/generation.md``. Goals: engine >= 0.97x bare tokens/s; time
to first token within 20 ms of bare; model load within +10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from benchlib import append_report, machine  # noqa: E402 -- after the path is set

from engine.models.lane import selftest_config  # noqa: E402

PROMPT = (
    "Write a long, detailed essay about the history of lighthouses, their keepers, "
    "and how the lamps and lenses changed over the centuries."
)

BARE_SCRIPT = r"""
import sys, time
import llama_cpp
path, threads, n, prompt_text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if sys.argv[6] == "no-repack":  # what the self-test passed here (see plain_llama)
    default_params = llama_cpp.llama_cpp.llama_model_default_params
    def no_repack():
        params = default_params()
        params.use_extra_bufts = False
        return params
    llama_cpp.llama_cpp.llama_model_default_params = no_repack
llm = llama_cpp.Llama(model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                      n_gpu_layers=int(sys.argv[5]), verbose=False)
tokens = llm.tokenize(prompt_text.encode(), add_bos=False, special=True)
eos = llm.token_eos()
count = 0
for tok in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1):
    if tok == eos:
        break
    sys.stdout.write(llm.detokenize([tok]).decode("utf-8", "replace"))
    sys.stdout.flush()
    count += 1
    if count >= n:
        break
"""


Sample = tuple[float, float, int, float, float]  # ttft, tok/s, tokens, load s, host start s


def bare_in_process(
    model_path: str, threads: int, prompt_text: str, n: int, runs: int, gpu_layers: int
) -> list[Sample]:
    from engine.models.runtime import plain_llama

    selftest_config(Path(model_path))  # read before the clock starts, as the engine has it
    load_started = time.perf_counter()
    llm = plain_llama(
        model_path,
        n_ctx=4096,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=gpu_layers,
        verbose=False,
    )
    load_s = time.perf_counter() - load_started
    eos = llm.token_eos()
    results: list[Sample] = []
    for _ in range(runs):
        llm.reset()
        start = time.perf_counter()
        tokens = llm.tokenize(prompt_text.encode(), add_bos=False, special=True)
        first = last = None
        count = 0
        for tok in llm.generate(
            tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1
        ):
            if tok == eos:
                break
            llm.detokenize([tok]).decode("utf-8", "replace")
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
            if count >= n:
                break
        assert first is not None and last is not None
        results.append((first - start, (count - 1) / (last - first), count, load_s, 0.0))
    del llm
    return results


def engine_in_process(home: Path, n: int, runs: int) -> list[Sample]:
    from engine import Engine
    from engine.chat.session import ChatRequest
    from engine.models.runtime import SamplingParams

    results: list[Sample] = []
    with Engine(home) as engine:
        host_started = time.perf_counter()
        engine.start_model_host(wait=60)
        host_s = time.perf_counter() - host_started
        _, load_s = engine.load_model(None)
        for _ in range(runs):  # one run per fresh process: the prompt is never cached
            stamps: list[float] = []
            request = ChatRequest(
                PROMPT, sampling=SamplingParams(max_tokens=n, temperature=0.0, repeat_penalty=1.1)
            )
            start = time.perf_counter()
            on_text = lambda _t, s=stamps: s.append(time.perf_counter())  # noqa: E731
            result = engine.chat(request, on_text=on_text)
            first, last = stamps[0], stamps[-1]
            count = result.completion_tokens
            results.append((first - start, (count - 1) / (last - first), count, load_s, host_s))
    return results


def engine_gpu_layers(home: Path) -> int:
    """The GPU layers the engine chooses here for the default model (0 without a GPU)."""
    from engine import Engine
    from engine.chat.loading import load_spec_for

    with Engine(home) as engine:
        return load_spec_for(engine.list_models()[0]).n_gpu_layers


def first_byte(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds to the first byte on stdout, total seconds) of a command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.perf_counter() - start
    proc.stdout.read()
    proc.wait()
    return first, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line part")
    parser.add_argument("--worker", choices=["bare", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--gpu-layers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from engine.chat.templates import ChatMessage, ChatTemplate
    from engine.models.gguf_info import read_gguf_info
    from engine.models.hardware import physical_cores
    from engine.paths import builtin_models_dirs

    model = next(
        d / "SmolLM2-135M-Instruct.Q4_1.gguf"
        for d in builtin_models_dirs()
        if (d / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    )
    threads = physical_cores()
    info = read_gguf_info(model)
    prompt_text = ChatTemplate(info.chat_template).render([ChatMessage("user", PROMPT)])
    if args.worker == "bare":
        print(
            json.dumps(
                bare_in_process(str(model), threads, prompt_text, args.tokens, 1, args.gpu_layers)[
                    0
                ]
            )
        )
        return 0
    if args.worker == "engine":
        print(json.dumps(engine_in_process(args.home, args.tokens, 1)[0]))
        return 0
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    env = {**os.environ, "BASTION_HOME": str(home)}
    gpu_layers = engine_gpu_layers(home)  # the bare side offloads as the engine does

    print(f"machine: {machine()}", file=sys.stderr)
    print(
        f"model {model.name}, {threads} threads, {gpu_layers} layers on the GPU, "
        f"{args.tokens} tokens, {args.runs} runs",
        file=sys.stderr,
    )
    bare: list[Sample] = []
    eng: list[Sample] = []
    for i in range(args.runs):
        for side, into in (("bare", bare), ("engine", eng)):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    side,
                    "--tokens",
                    str(args.tokens),
                    "--home",
                    str(home),
                    "--gpu-layers",
                    str(gpu_layers),
                ],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            ).stdout
            into.append(tuple(json.loads(out.strip().splitlines()[-1])))  # type: ignore[arg-type]
        print(
            f"run {i + 1}: bare {bare[-1][1]:.1f} tok/s, engine {eng[-1][1]:.1f} tok/s",
            file=sys.stderr,
        )
    rows = []

    def add(name: str, b: float, e: float, unit: str, ratio: str) -> None:
        rows.append(f"| {name} | {b:.2f} {unit} | {e:.2f} {unit} | {ratio} |")

    b_tps = statistics.median(r[1] for r in bare)
    e_tps = statistics.median(r[1] for r in eng)
    b_ttft = statistics.median(r[0] for r in bare) * 1000
    e_ttft = statistics.median(r[0] for r in eng) * 1000
    add("generation, tokens/s (in process)", b_tps, e_tps, "tok/s", f"{e_tps / b_tps:.3f}x")
    add("time to first token (in process)", b_ttft, e_ttft, "ms", f"{e_ttft - b_ttft:+.1f} ms")
    b_load = statistics.median(r[3] for r in bare) * 1000
    e_load = statistics.median(r[3] for r in eng) * 1000
    add("model load (in process)", b_load, e_load, "ms", f"{e_load / b_load - 1:+.1%}")
    host = statistics.median(r[4] for r in eng) * 1000
    rows.append(f"| model host process start (engine only, before a load) | | {host:.2f} ms | |")
    tokens = {r[2] for r in bare + eng}

    if not args.no_cli:
        bastion = str(Path(sys.executable).parent / "bastion")
        cli_bare, cli_eng = [], []
        for _ in range(max(3, args.runs // 2)):
            cli_bare.append(
                first_byte(
                    [
                        sys.executable,
                        "-c",
                        BARE_SCRIPT,
                        str(model),
                        str(threads),
                        str(args.tokens),
                        prompt_text,
                        str(gpu_layers),
                        selftest_config(model),
                    ],
                    env,
                )
            )
            cli_eng.append(
                first_byte(
                    [
                        bastion,
                        "chat",
                        PROMPT,
                        "--max-tokens",
                        str(args.tokens),
                        "--temperature",
                        "0",
                    ],
                    env,
                )
            )
        bf = statistics.median(r[0] for r in cli_bare) * 1000
        ef = statistics.median(r[0] for r in cli_eng) * 1000
        bt = statistics.median(r[1] for r in cli_bare)
        et = statistics.median(r[1] for r in cli_eng)
        add("command: start to first token", bf, ef, "ms", f"{ef - bf:+.0f} ms")
        add("command: total wall time", bt, et, "s", f"{bt / et:.3f}x speed")

    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join(
        [
            f"### {stamp}",
            "",
            f"Machine: {machine()}  ",
            f"Model: {model.name}, {threads} threads, greedy, {sorted(tokens)} tokens generated, "
            f"medians of {args.runs} runs (command line: {max(3, args.runs // 2)}).",
            "",
            "| measure | bare llama-cpp-python | Bastion engine | engine vs bare |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(report)
    append_report("generation", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
