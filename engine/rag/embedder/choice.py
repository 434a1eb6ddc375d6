"""The embedding backend of this machine: measured once per machine and model, then reused.

Which backend is fastest depends on the CPU, not on the code: on a 2-core AMD EPYC (Zen 4,
AVX-512 VNNI and BF16) int8 ONNX Runtime ran ~2.5x torch fp32 and torch bf16 ~2x; on an
Intel Xeon with AMX, int8 ONNX ran only 1.25x fp32 (issue 12), where AMX makes bf16
matrix products cheap. So each backend that applies here is measured on chunk-sized
texts, checked for fidelity to torch fp32 (every probe vector within ``MIN_COSINE``, and
every probe question finding the same passage first), and the fastest
faithful one is recorded in ``<cache>/backend-choice.json`` under a key of the CPU
(model name, the flags that matter, core count), the library versions and the model's
content. Later processes read the record; ``bastion doctor`` shows it. A different CPU, a
library upgrade, a replaced model or a new way of measuring measures again.

Candidates: ``onnx-int8`` (where the model can be exported); ``torch-bf16`` where the CPU
has AVX-512 BF16 or AMX; ``torch-fp32`` (the reference, always). With an NVIDIA GPU torch
runs there and only fp32 is taken, without measuring (the GPU wins by far).
OpenVINO is not a candidate: it is not installed with Bastion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.models import hardware
from engine.paths import atomic_write_bytes
from engine.rag.embedder.cache import NoRoom
from engine.rag.embedder.model import TORCH_FP32, Embedder

log = logging.getLogger(__name__)

CHOICE_FILE = "backend-choice.json"
MIN_COSINE = 0.98
# The flags that change which backend is fastest.
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
_LIBRARIES = ("onnxruntime", "torch", "sentence-transformers")
# Part of the record's key: a change to how backends are measured measures them again.
# 2: timed on chunk-long texts (they were half as long).
_METHOD = "2"

# The probe: short passages on unrelated subjects and one question for each (written here).
PASSAGES = (
    "To renew a passport, fill in the application form, attach two recent photographs and "
    "the old passport, and pay the fee at the post office. Processing takes six weeks.",
    "The heat pump moves warmth from outside air into the house; below minus fifteen "
    "degrees its efficiency falls and the electric backup heater switches on.",
    "Sourdough needs a starter fed with flour and water for a week before baking; the dough "
    "then rises slowly overnight in a cool kitchen.",
    "Invoices are due thirty days after delivery. Late payments incur interest of one "
    "percent per month, and accounts overdue by ninety days are suspended.",
    "The function returns None when the key is missing; pass default= to get another value "
    "instead, or call require() to raise KeyError.",
    "Migrating birds navigate by the sun, the stars and the Earth's magnetic field; young "
    "birds learn the route on their first autumn flight.",
    "Back up the database every night to a second disk and keep thirty days of copies; "
    "test a restore once a month so the backups are known to work.",
    "In the first half the striker scored twice from corners, and the goalkeeper saved a "
    "penalty just before the break.",
    "The lease ends on 31 March. The tenant must give two months' notice in writing and "
    "return all keys; the deposit is refunded within four weeks.",
    "Vaccines train the immune system with a harmless piece of a germ, so that the body "
    "recognises the real infection later and fights it quickly.",
)
QUESTIONS = (
    "how long does it take to get a new passport",
    "why does the heat pump use the electric heater when it is very cold",
    "how do I make bread rise overnight",
    "what happens if a customer pays an invoice late",
    "what does the lookup return for a key that does not exist",
    "how do birds find their way when migrating",
    "how often should I check that restoring a backup works",
    "who saved the penalty",
    "how much notice to end the rental contract",
    "how do vaccines protect against disease",
)
# Each question must find the same first passage. Only the first: the others are
# unrelated to it, near-tied, and their order flips on rounding noise alone.
_RANKED = 1
_WORKLOAD = 32  # chunk-sized texts timed per backend
_TIMED_RUNS = 3  # the fastest of three rounds counts


@dataclass
class Trial:
    """One backend measured: its speed and its fidelity to torch fp32."""

    backend: str
    ok: bool
    texts_per_second: float | None = None
    min_cosine: float | None = None
    same_ranking: bool | None = None
    note: str = ""
    # It could not run for a passing reason (no room for its export): measure again later.
    again: bool = False


@dataclass
class BackendChoice:
    """The backend recorded for one machine and model, with what was measured."""

    backend: str
    model_id: str
    cpu: str
    measured_at: str
    trials: list[Trial] = field(default_factory=list)

    def summary(self) -> str:
        """``onnx-int8 (88 texts/s; torch-bf16 36, torch-fp32 17)``-style, for doctor."""
        speeds = {t.backend: t.texts_per_second for t in self.trials if t.texts_per_second}
        others = [
            f"{b} {v:.0f}" + ("" if t.ok else " unfaithful")
            for t in self.trials
            if (b := t.backend) != self.backend and (v := speeds.get(b))
        ]
        own = speeds.get(self.backend)
        head = f"{own:.0f} texts/s" if own else "not timed"
        return f"{self.backend} ({head}" + (f"; {', '.join(others)}" if others else "") + ")"


def cpu_flags() -> set[str]:
    """The CPU's feature flags; empty where they cannot be read."""
    return hardware.cpu_flags() or set()


def cpu_name() -> str:
    return hardware.cpu_name()


def has_fast_bf16(flags: set[str]) -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix products in hardware."""
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def machine_key(model_key: str) -> str:
    """The record's key: how it is measured, the CPU, the flags that matter, cores, library
    versions, model."""
    flags = cpu_flags()
    versions = []
    for name in _LIBRARIES:
        try:
            versions.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=none")
    parts = [
        f"method {_METHOD}",
        cpu_name(),
        platform.machine(),
        str(os.cpu_count()),
        ",".join(f for f in _FLAGS if f in flags),
        *versions,
        model_key,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def read_choice(cache_dir: Path, key: str) -> BackendChoice | None:
    """The recorded choice for ``key``, or None (never measured, or an unreadable file)."""
    try:
        entry = json.loads((cache_dir / CHOICE_FILE).read_text(encoding="utf-8"))[key]
        trials = [Trial(**t) for t in entry.pop("trials")]
        return BackendChoice(**entry, trials=trials)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_choice(cache_dir: Path, key: str, choice: BackendChoice) -> None:
    path = cache_dir / CHOICE_FILE
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, dict):
            records = {}
    except (OSError, ValueError):
        records = {}
    records[key] = asdict(choice)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(records, indent=2) + "\n").encode())
    except OSError as exc:  # a read-only cache: measured again next time, nothing lost
        log.warning("could not record the embedder backend choice: %s", exc)


def workload() -> list[str]:
    """Chunk-sized texts: six passages each (165-185 word pieces, as the chunker's are near
    its 200), in varied order. The length matters: attention grows with its square, and a
    backend fastest on short texts need not be on chunks (on a Xeon with AMX, int8 ONNX
    matched torch bf16 on 90-piece texts and ran at half its speed on the gnuplot chunks).
    """
    n = len(PASSAGES)
    return [" ".join(PASSAGES[(i + j * 3) % n] for j in range(6)) for i in range(_WORKLOAD)]


def _speeds(embedders: list[Embedder], texts: list[str]) -> list[float]:
    """Texts per second of each embedder: the best of ``_TIMED_RUNS`` rounds, each round
    timing them all in turn, so that a pause of the machine (another process, threads of
    the backend timed before still spinning) costs one run of one backend, not its result.
    """
    for embedder in embedders:
        embedder.encode(texts[:4])  # warm: first-call allocations and lazy sessions
    best = [float("inf")] * len(embedders)
    for _ in range(_TIMED_RUNS):
        for i, embedder in enumerate(embedders):
            started = time.perf_counter()
            embedder.encode(texts)
            best[i] = min(best[i], time.perf_counter() - started)
    return [len(texts) / max(b, 1e-9) for b in best]


def _ranking(passages: Any, questions: Any) -> list[list[int]]:
    scores = questions @ passages.T
    return [list(row.argsort()[::-1][:_RANKED]) for row in scores]


def measure(model_id: str, candidates: list[str], load: Callable[[str], Embedder]) -> BackendChoice:
    """Time and check each candidate against torch fp32; choose the fastest faithful one.

    Args:
        model_id: for the record.
        candidates: backends other than ``torch-fp32`` that apply on this machine.
        load: loads a backend; raises when it cannot run here (the trial says why).
    """
    import numpy as np

    texts = workload()
    reference = load(TORCH_FP32)
    probe = [*PASSAGES, *QUESTIONS, *texts[:4]]
    expected = reference.encode(probe)
    expected_ranking = _ranking(expected[: len(PASSAGES)], expected[len(PASSAGES) : -4])
    trials = [Trial(TORCH_FP32, True, min_cosine=1.0, same_ranking=True, note="the reference")]
    timed = [(trials[0], reference)]
    for backend in candidates:
        try:
            embedder = load(backend)
            vectors = embedder.encode(probe)
        except Exception as exc:  # a backend that cannot run here is simply not chosen
            log.warning("embedder %s cannot run as %s here: %s", model_id, backend, exc)
            again = isinstance(exc, NoRoom)
            trials.append(Trial(backend, False, note=f"cannot run: {exc}"[:200], again=again))
            continue
        cosine = float(np.min(np.sum(vectors * expected, axis=1)))
        ranking = _ranking(vectors[: len(PASSAGES)], vectors[len(PASSAGES) : -4])
        same = ranking == expected_ranking
        faithful = cosine >= MIN_COSINE and same
        note = "" if faithful else ("ranks the probe differently" if not same else "drifts")
        trials.append(Trial(backend, faithful, None, round(cosine, 4), same, note))
        timed.append((trials[-1], embedder))
    for (trial, _), speed in zip(timed, _speeds([e for _, e in timed], texts), strict=True):
        trial.texts_per_second = speed
    best = max(
        (t for t in trials if t.ok), key=lambda t: t.texts_per_second or 0.0, default=trials[0]
    )
    for t in trials:
        t.texts_per_second = round(t.texts_per_second, 1) if t.texts_per_second else None
    log.info("embedder %s on this machine: %s", model_id, [asdict(t) for t in trials])
    return BackendChoice(
        best.backend, model_id, cpu_name(), time.strftime("%Y-%m-%d %H:%M:%S"), trials
    )
