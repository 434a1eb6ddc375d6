"""One self-test probe: what runs in the child process ``engine.models.selftest`` starts.

It loads the default model with the thread count and GPU layers the engine would use,
evaluates a prompt of a few hundred tokens in one batch, scores 32 more tokens one at a
time (their mean negative log-likelihood tells a working build from one that computes
garbage), then generates 32 tokens greedily through the engine's own generation loop.
Before each step it writes ``{"stage": ...}`` on stdout, and it runs with faulthandler on,
so the parent can say where a native crash happened; its last line is
``{"ok": ..., "detail": ...}``.

    python -m engine.models.selftest probe MODEL CONFIG
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

SCORED_TOKENS = 32
GENERATED_TOKENS = 32
MAX_MEAN_NLL = 7.0  # nats per token; noise over a 49k vocabulary is about 10.8
CRASH_SWITCH = "BASTION_SELFTEST_CRASH"
GARBAGE_SWITCH = "BASTION_SELFTEST_GARBAGE"
HANG_SWITCH = "BASTION_SELFTEST_HANG"

# Plain English, written for this test: the probe needs text any model reads easily.
PROMPT = (
    "The lighthouse stood on a rock at the end of the harbour wall. Every evening the "
    "keeper climbed the narrow stairs, trimmed the wick, wound the clockwork that turned "
    "the lens, and wrote the weather in the log book. Ships coming home in the dark saw "
    "the light long before they saw the land, and they knew from its pattern which "
    "harbour it was: two short flashes and one long, every fifteen seconds. In winter the "
    "storms were so strong that spray reached the lantern room, and the keeper had to "
    "clean the salt from the glass twice a night. In summer the work was easier, and "
    "children from the town came out along the wall to look at the great lens, which "
    "was made of hundreds of pieces of glass arranged in rings. The keeper told them how "
    "the rings bent the light into a single beam, how the beam could be seen twenty miles "
    "away, and how, before there were lighthouses, people lit fires on the hills to "
    "guide the boats. When the light was made electric, the keeper stayed on for a few "
    "years to look after the machines, and then the lighthouse was run from the town. "
    "Today the keeper's house is a small museum. Visitors can climb the stairs, stand in "
    "the lantern room and read the old log books, which tell of fog, of wrecks and "
    "rescues, and of quiet nights when nothing happened at all. The museum is open every "
    "day from April to October, and on winter weekends when the weather allows. A path "
    "runs from the harbour to the rock, and at low tide you can walk around its base and "
    "see the marks that the waves have cut into the stone over two hundred years."
)


def stage(text: str) -> None:
    """Tell the parent what the probe does next (it reports this if the probe dies)."""
    sys.stdout.write(json.dumps({"stage": text}) + "\n")
    sys.stdout.flush()


def probe(model_path: Path, config: str) -> tuple[bool, str]:
    """Load, score and generate with ``config``; (passed, what was seen)."""
    import numpy as np

    from engine.jobs import JobContext
    from engine.models import hardware
    from engine.models.runtime import LoadedModel, LoadSpec, SamplingParams, StreamEvent
    from engine.models.runtime import TokenChunk as Chunk

    gpu_layers = 999 if hardware.gpu_offload_supported() else 0
    spec = LoadSpec(
        model_id="self-test",
        path=str(model_path),
        n_ctx=1024,
        n_threads=hardware.physical_cores(),
        n_gpu_layers=gpu_layers,
    )
    stage(f"loading the model ({gpu_layers} GPU layers, {spec.n_threads} threads)")
    model = LoadedModel(spec, config)
    llm = model.llm
    tokens = model.tokenize(PROMPT, add_bos=True)
    head, tail = tokens[:-SCORED_TOKENS], tokens[-SCORED_TOKENS:]
    stage(f"evaluating a {len(head)}-token prompt in one batch")
    if os.environ.get(CRASH_SWITCH) == config:
        os.kill(os.getpid(), signal.SIGSEGV)  # test-only: where a native crash would happen
    if os.environ.get(HANG_SWITCH) == config:
        time.sleep(24 * 3600)  # test-only: a probe that never answers
    llm.eval(head)  # one batch of a few hundred tokens: the path that crashes on AMX hosts

    import llama_cpp

    n_vocab = llm.n_vocab()
    nll = 0.0
    stage(f"scoring {len(tail)} tokens one at a time")
    for token in tail:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))
        logits = logits.astype(np.float64)
        if os.environ.get(GARBAGE_SWITCH) == config:
            logits = np.random.default_rng(token).normal(size=n_vocab)
        top = float(logits.max())
        log_z = top + math.log(float(np.exp(logits - top).sum()))
        nll += log_z - float(logits[token])
        llm.eval([token])
    mean_nll = nll / len(tail)
    if not math.isfinite(mean_nll) or mean_nll > MAX_MEAN_NLL:
        return False, f"garbage logits (mean NLL {mean_nll:.1f} nats/token on plain English)"

    pieces: list[str] = []
    done: list[StreamEvent] = []

    def emit(event: StreamEvent) -> None:
        (pieces.append(event.text) if isinstance(event, Chunk) else done.append(event))

    greedy = SamplingParams(max_tokens=GENERATED_TOKENS, temperature=0.0, seed=0)
    stage(f"generating {GENERATED_TOKENS} tokens through the engine's loop")
    model.generate(tokens, greedy, JobContext(), time.perf_counter(), emit)
    finished = done[-1] if done else None
    produced = getattr(finished, "completion_tokens", 0)
    if not "".join(pieces).strip() and produced == 0:
        return False, "generated nothing"
    rate = getattr(finished, "tokens_per_second", None)
    speed = f" at {rate:.0f} tokens/s" if rate else ""
    return True, (
        f"mean NLL {mean_nll:.2f} over {len(tail)} tokens after a {len(head)}-token prompt, "
        f"{produced} tokens generated{speed}, {spec.n_threads} threads, "
        f"{gpu_layers} GPU layers"
    )


def main(model_path: Path, config: str) -> int:
    """Run one probe in this process and write its result line; the exit code says it."""
    import faulthandler

    from engine.protocol import ExitCode

    faulthandler.enable()  # a native crash prints the Python stack for the parent
    try:
        ok, detail = probe(model_path, config)
    except Exception as exc:  # llama.cpp refused to load, or similar: a failed probe
        ok, detail = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    sys.stdout.write(json.dumps({"ok": ok, "detail": detail}) + "\n")
    return ExitCode.OK if ok else ExitCode.FAILED
