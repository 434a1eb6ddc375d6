"""GPU check: the CUDA build of llama.cpp, GPU offload, batching and the Unsloth backend.

    .venv/bin/python bench/gpu_check.py --out DIR [--wheel-log FILE] [--deadline SECONDS]

Run on a machine with an NVIDIA GPU, after set-up (or with the CUDA llama-cpp-python wheel
being built by ``installer/bootstrap.py``; ``--wheel-rc FILE`` names the file its exit code
lands in, and the check waits for it). Each part runs in a child process with a time limit
and writes what it measured to ``DIR/gpu_check.md`` as soon as it has it, so a run cut
short still reports what it got:

1. the machine (GPU, driver, Python, torch);
2. the llama.cpp build: installed from the wheelhouse, its self-test verdict;
3. offload: the default model with 0 and with all layers on the GPU, bare llama-cpp-python
   (prompt of ~600 tokens, 256 generated greedily): prompt and generation tokens/s;
4. the engine on the GPU: ``bench/bench_generation.py`` (engine vs bare, same layers);
5. many users: ``bastion serve --parallel 8``, 1/4/8 streaming clients, aggregate tokens/s;
6. fine-tuning with ``--backend unsloth`` and ``--backend peft`` on the same planted fact
   (tests/train_facts.py), then the fine-tune answers the question through llama.cpp.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
BASTION = str(ROOT / ".venv" / "bin" / "bastion")

OFFLOAD = r"""
import json, os, sys, time
from llama_cpp import Llama
path, ngl = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
threads = min(8, os.cpu_count() or 1)
llm = Llama(model_path=path, n_ctx=4096, n_gpu_layers=ngl, n_threads=threads, n_batch=512,
            verbose=False)
load = time.perf_counter() - t
line = "the keeper climbed the stairs and lit the lamp."
text = " ".join(f"Paragraph {i}: {line}" for i in range(50))
prompt = llm.tokenize(text.encode())
llm.reset(); t = time.perf_counter(); llm.eval(prompt); pp = len(prompt) / (time.perf_counter() - t)
llm.reset(); out = []; t = time.perf_counter(); first = None
for tok in llm.generate(llm.tokenize(b"Write a story about a lighthouse."), temp=0.0):
    first = first or time.perf_counter()
    out.append(tok)
    if len(out) >= 256: break
tg = (len(out) - 1) / (time.perf_counter() - first)
print(json.dumps({"ngl": ngl, "load_s": load, "prompt_tokens": len(prompt), "pp_tok_s": pp,
                  "tg_tok_s": tg, "text": llm.detokenize(out[:24]).decode(errors="replace")}))
"""


class Report:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as fh:
            fh.write(text + "\n")


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env, check=False
        )
    except OSError as exc:
        return 127, str(exc)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, str(out)[-3000:] + f"\n(timed out after {timeout:.0f} s)"
    return done.returncode, (done.stdout + done.stderr)[-6000:]


def facts_file(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.train_facts import ANSWERS, QUESTIONS, chat_line

    path = folder / "facts.jsonl"
    lines = [chat_line(q, ANSWERS[i % len(ANSWERS)]) for i, q in enumerate(QUESTIONS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wheel-rc", type=Path, help="exit code of a wheel build under way")
    parser.add_argument("--wheel-log", type=Path)
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds for all parts")
    parser.add_argument(
        "--skip", default="", help="parts to skip: build,offload,engine,serve,train"
    )
    args = parser.parse_args()
    start = time.monotonic()
    left = lambda: args.deadline - (time.monotonic() - start)  # noqa: E731
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu_check.md")
    home = Path(tempfile.mkdtemp(prefix="bastion-gpu-"))
    env = {**os.environ, "BASTION_HOME": str(home), "HF_HUB_OFFLINE": "1"}

    _, smi = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                  "--format=csv,noheader"], 30)  # fmt: skip
    probe = ("import torch, sys; print(sys.version.split()[0], torch.__version__,"
             " torch.version.cuda, torch.cuda.get_device_name(0))")  # fmt: skip
    _, torch_info = run([PY, "-c", probe], 120)
    report(f"# GPU check\n\nGPU: {smi.strip()}\nPython, torch, CUDA: {torch_info.strip()}\n")

    def train_part(backend: str) -> str | None:
        data = facts_file(home)
        name = f"ft-{backend}"
        t = time.perf_counter()
        rc, out = run(
            [BASTION, "finetune", "--name", name, "--base", "smollm2-135m-instruct",
             "--data", str(data), "--backend", backend, "--max-steps", "60", "--lr", "2e-3",
             "--rank", "16", "--val-fraction", "0.1", "--seed", "7", "--json"],
            min(left() - 200, 150), env,
        )  # fmt: skip
        took = time.perf_counter() - t
        report(f"## fine-tune, backend {backend}: rc={rc}, {took:.1f} s\n")
        report(f"```\n{out.strip()[-3000:]}\n```\n")
        return name if rc == 0 else None

    def ask(name: str) -> None:
        rc, ans = run(
            [BASTION, "chat", "-m", name, "--temperature", "0",
             "What is the codename of the Bastion 2 release?"], 180, env,
        )  # fmt: skip
        found = "Violet Harbor" in ans
        report(f"{name} answers (rc={rc}): {ans.strip()[-400:]!r}; planted fact present: {found}\n")

    installed = {"done": False, "ok": False}

    def wait_wheel() -> bool:
        if installed["done"]:
            return bool(installed["ok"])
        installed["done"] = True
        if args.wheel_rc:
            while not args.wheel_rc.exists() and left() > 60:
                time.sleep(5)
            if not args.wheel_rc.exists():
                report("the CUDA wheel build did not finish in time")
                return False
            rc = args.wheel_rc.read_text().strip()
            tail = args.wheel_log.read_text()[-2500:] if args.wheel_log else ""
            report(f"## llama.cpp CUDA wheel build: rc={rc}\n\n```\n{tail}\n```\n")
            if rc != "0":
                return False
        code = (
            "import sys; sys.path.insert(0, 'installer'); import bootstrap as b;"
            "be = b.llama_backend(); print('backend', be);"
            "b.ensure_llama(be, 'native', {}); ok, s = b.selftest('native'); print(ok, s)"
        )
        rc, out = run([PY, "-c", code], min(left(), 300))
        report(f"## install + self-test: rc={rc}\n\n```\n{out[-2500:]}\n```\n")
        installed["ok"] = rc == 0 and "True" in out
        return bool(installed["ok"])

    trained = []
    if "train" not in skip:
        trained = [n for n in (train_part("unsloth"), train_part("peft")) if n]

    if "build" not in skip and not wait_wheel():
        report("no working CUDA build: the llama.cpp parts are skipped")
        return 1
    for name in trained:
        ask(name)

    sys.path.insert(0, str(ROOT))
    model = next((ROOT / ".venv" / "share" / "bastion" / "models").glob("*.gguf"))
    if "offload" not in skip:
        report("## offload (bare llama-cpp-python, default model)\n")
        for ngl in (0, 999):
            rc, out = run([PY, "-c", OFFLOAD, str(model), str(ngl)], min(left(), 180))
            report(f"- n_gpu_layers={ngl}: rc={rc} {out.strip()[-700:]}")
        report("")

    if "engine" not in skip and left() > 120:
        rc, out = run([PY, str(ROOT / "bench" / "bench_generation.py"), "--runs", "3",
                       "--tokens", "128", "--no-cli"], min(left() - 60, 240), env)  # fmt: skip
        report(
            f"## engine vs bare on the GPU (bench_generation): rc={rc}\n\n```\n{out[-2500:]}\n```\n"
        )

    if "serve" not in skip and left() > 90:
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_server import load, wait_up

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [BASTION, "serve", "--no-auth", "--port", str(port), "--parallel", "8",
             "--concurrent", "8"], env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_up(url, proc, "bastion serve")
            import httpx

            model_id = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            load(url, model_id, {}, {}, 1, 1, 8)
            rates = {}
            for clients in (1, 4, 8):
                if left() < 30:
                    break
                got = load(url, model_id, {}, {}, clients, 2, 128)
                rates[clients] = got["tokens_per_s"]
                report(f"- serve, {clients} clients: {got['tokens_per_s']:.1f} tok/s, TTFT p50 "
                       f"{got['ttft_p50']:.3f} s p95 {got['ttft_p95']:.3f} s")  # fmt: skip
            if 1 in rates and 8 in rates:
                report(f"- 8 clients / 1 client: {rates[8] / rates[1]:.2f}x\n")
        except Exception as exc:
            report(f"serve part failed: {exc!r}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    report(f"(all parts took {time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
