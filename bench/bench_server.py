"""Many users at once: `bastion serve` against `llama-server --parallel 8`, same model, same run.

    .venv/bin/python bench/bench_server.py [--clients 1,4,8] [--max-tokens 128] [--repeats 2]

Both servers load the default model (SmolLM2-135M Q4_1) with the same threads, the same
window per sequence and 8 parallel sequences, and get the same streaming chat requests
("write a long story about ...", temperature 0.7, top-k 40, top-p 0.95, min-p 0.05, repeat
penalty 1.1 -- Bastion's defaults, sent explicitly to llama-server) from N clients at once,
each client asking twice in a row. Measured per configuration: aggregate completion tokens
per second (all tokens / wall time), and the p50 / p95 time to first token. Each
configuration is run ``--repeats`` times, the two servers alternating; the best run counts.

The baseline is llama.cpp's own server, built from the same vendored llama.cpp source as
the installed llama-cpp-python wheel (its sdist, hash-checked against the lock) with the same
native CPU flags -- and CUDA, offloading the layers the engine offloads, when the wheel is a
CUDA build -- once per machine into ``~/.cache/bastion/llama-server/``. Goals: Bastion
with 8 clients >= 3x its one-client tokens/s, and >= 0.9x llama-server with 8 clients.
Results are printed and appended to ``bench/results/server.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.benchlib import append_report, machine, stamp

ROOT = Path(__file__).resolve().parent.parent
TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "a mountain village",
    "two rival bakers",
    "a ship in a storm",
    "a clockmaker",
    "a desert caravan",
    "a library at night",
]
SAMPLING = {"temperature": 0.7, "top_p": 0.95}
LLAMA_ONLY = {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1}  # Bastion's defaults


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} ended with code {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{what} did not come up in 300 s")


# -- llama-server from the wheel's own source ----------------------------------------------


def llama_server() -> Path:
    """llama-server built from the installed llama-cpp-python's sdist (cached)."""
    import importlib.metadata

    sys.path.insert(0, str(ROOT / "installer"))
    import bootstrap  # the same CPU key as the wheelhouse
    import llama_cpp

    version = importlib.metadata.version("llama-cpp-python")
    # The same backend as the installed wheel: a CUDA wheel gets a CUDA llama-server.
    gpu = bool(llama_cpp.llama_supports_gpu_offload()) and sys.platform != "darwin"
    key = f"{version}-{bootstrap.cpu_key()}" + ("-cuda" if gpu else "")
    home = Path.home() / ".cache" / "bastion" / "llama-server" / key
    binary = home / "llama-server"
    if binary.is_file():
        return binary
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bastion-llama-server-") as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--require-hashes",  # the archive set-up builds the wheel from, hash-checked
                "-r",
                str(ROOT / "installer" / "lock" / "llama-cpp-python.txt"),
                "--no-binary",
                ":all:",
                "--no-deps",
                "-d",
                tmp,
            ],
            check=True,
        )
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        print(f"building llama-server from {source} (once per machine; minutes)", file=sys.stderr)
        subprocess.run(
            [
                "cmake",
                "-S",
                str(source),
                "-B",
                str(build),
                "-DGGML_NATIVE=ON",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=ON",
                "-DCMAKE_BUILD_TYPE=Release",
                *(["-DGGML_CUDA=ON"] if gpu else []),
            ],
            check=True,
        )
        subprocess.run(
            [
                "cmake",
                "--build",
                str(build),
                "--target",
                "llama-server",
                "-j",
                str(os.cpu_count() or 2),
            ],
            check=True,
        )
        for made in (build / "bin").iterdir():  # the program and its shared libraries
            if made.name == "llama-server" or ".so" in made.name or made.suffix == ".dylib":
                shutil.copy2(made, home / made.name, follow_symlinks=True)
    return binary


# -- the load ------------------------------------------------------------------------------


def one_client(
    url: str,
    model: str,
    headers: dict[str, str],
    extra: dict[str, object],
    index: int,
    rounds: int,
    max_tokens: int,
    out: list[tuple[float, int]],
) -> None:
    for r in range(rounds):
        body = {
            "model": model,
            "stream": True,
            "max_tokens": max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": f"Write a long story about {TOPICS[(index + r) % len(TOPICS)]}.",
                }
            ],
            "stream_options": {"include_usage": True},
            **SAMPLING,
            **extra,
        }
        started, first, tokens = time.perf_counter(), None, 0
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=600
        ) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                choices = data.get("choices") or []
                if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                    first = time.perf_counter() - started
                if data.get("usage"):
                    tokens = int(data["usage"]["completion_tokens"])
        out.append((first if first is not None else float("nan"), tokens))


def load(
    url: str,
    model: str,
    headers: dict[str, str],
    extra: dict[str, object],
    clients: int,
    rounds: int,
    max_tokens: int,
) -> dict[str, float]:
    results: list[tuple[float, int]] = []
    threads = [
        threading.Thread(
            target=one_client, args=(url, model, headers, extra, i, rounds, max_tokens, results)
        )
        for i in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, in a row")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    parallel = max(counts)

    from engine import Engine
    from engine.chat.loading import load_spec_for

    binary = llama_server()
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-server-"))
    engine = Engine(home)
    entry = engine.list_models()[0]
    spec = load_spec_for(entry)
    engine.close()
    bastion_port, llama_port = free_port(), free_port()
    env = {**os.environ, "BASTION_HOME": str(home)}
    servers = {
        "Bastion": (
            subprocess.Popen(
                [
                    str(ROOT / ".venv" / "bin" / "bastion"),
                    "serve",
                    "--no-auth",
                    "--port",
                    str(bastion_port),
                    "--parallel",
                    str(parallel),
                    "--concurrent",
                    str(parallel),
                ],
                env=env,
                stderr=subprocess.DEVNULL,
            ),
            f"http://127.0.0.1:{bastion_port}",
            entry.id,
            {},
        ),
        "llama-server": (
            subprocess.Popen(
                [
                    str(binary),
                    "-m",
                    entry.path,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(llama_port),
                    "-np",
                    str(parallel),
                    "-c",
                    str(spec.n_ctx * parallel),
                    "-t",
                    str(spec.n_threads),
                    "-tb",
                    str(spec.n_threads),
                    "-ngl",  # the layers the engine offloads (0 without a GPU)
                    str(spec.n_gpu_layers),
                    "--jinja",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)},
            ),
            f"http://127.0.0.1:{llama_port}",
            entry.id,
            LLAMA_ONLY,
        ),
    }
    try:
        for name, (process, url, model, extra) in servers.items():
            wait_up(url, process, name)
            load(url, model, {}, extra, 1, 1, 8)  # warm: the model loaded, caches touched
        best: dict[tuple[str, int], dict[str, float]] = {}
        for _ in range(args.repeats):
            for clients in counts:
                for name, (_process, url, model, extra) in servers.items():
                    got = load(url, model, {}, extra, clients, args.rounds, args.max_tokens)
                    print(
                        f"{name:12} {clients} clients: {got['tokens_per_s']:.1f} tok/s, "
                        f"TTFT p50 {got['ttft_p50']:.2f} s p95 {got['ttft_p95']:.2f} s "
                        f"({got['tokens']} tokens)",
                        file=sys.stderr,
                    )
                    key = (name, clients)
                    if key not in best or got["tokens_per_s"] > best[key]["tokens_per_s"]:
                        best[key] = got
    finally:
        for process, *_ in servers.values():
            process.terminate()
            process.wait(timeout=60)
        shutil.rmtree(home, ignore_errors=True)

    lines = [
        f"## {stamp()} — {machine()}",
        "",
        f"Model {entry.id}, {spec.n_threads} threads, {parallel} parallel sequences of "
        f"{spec.n_ctx} tokens, {args.max_tokens} tokens per answer, {args.rounds} requests "
        f"per client, best of {args.repeats}.",
        "",
        "| clients | Bastion tok/s | TTFT p50 / p95 (s) | llama-server tok/s | "
        "TTFT p50 / p95 (s) | Bastion / llama-server |",
        "|---|---|---|---|---|---|",
    ]
    for clients in counts:
        ours, theirs = best[("Bastion", clients)], best[("llama-server", clients)]
        lines.append(
            f"| {clients} | {ours['tokens_per_s']:.1f} | {ours['ttft_p50']:.2f} / "
            f"{ours['ttft_p95']:.2f} | {theirs['tokens_per_s']:.1f} | "
            f"{theirs['ttft_p50']:.2f} / {theirs['ttft_p95']:.2f} | "
            f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x |"
        )
    scale = best[("Bastion", parallel)]["tokens_per_s"] / best[("Bastion", 1)]["tokens_per_s"]
    base = (
        best[("llama-server", parallel)]["tokens_per_s"] / best[("llama-server", 1)]["tokens_per_s"]
    )
    versus = (
        best[("Bastion", parallel)]["tokens_per_s"]
        / best[("llama-server", parallel)]["tokens_per_s"]
    )
    lines += [
        "",
        f"Bastion {parallel} clients / 1 client: **{scale:.2f}x** (goal >= 3x; "
        f"llama-server's own: {base:.2f}x). Bastion / llama-server at {parallel} "
        f"clients: **{versus:.2f}x** (goal >= 0.9x).",
    ]
    report = "\n".join(lines)
    print(report)
    print(f"appended to {append_report('server', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
