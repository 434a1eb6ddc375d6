"""The Python, llama.cpp (loaded in a child probe), GPU and self-test checks."""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.doctor.common import SETUP, Check, _Context
from engine.models.hardware import cpu_flags
from engine.units import human_size

PROBE_TIMEOUT_S = 60.0  # a CUDA build initialises the driver on load: seconds, not minutes

# llama.cpp's name of an instruction set -> the Linux /proc/cpuinfo flag.
_BUILD_TO_CPU_FLAG = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c",
    "FMA": "fma", "BMI2": "bmi2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}  # fmt: skip
_CPU_FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class _LlamaProbe:
    """What a child process saw when it loaded llama.cpp (``error`` empty if it could)."""

    version: str = ""
    system_info: str = ""
    hardware: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    crashed: bool = False  # ended by a signal: the build is unsafe on this machine


# llama.cpp is loaded in a child: a build that crashes on this CPU (SIGILL) must not take
# doctor down with it, and CUDA's start-up chatter stays out of the terminal. It runs while
# the other checks do.
_PROBE_SCRIPT = """\
import json
from engine.privacy import guard
guard.activate()  # before llama.cpp: every process Bastion starts runs under the guard
import llama_cpp
from engine.models import hardware
info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
print(json.dumps({"version": llama_cpp.__version__, "system_info": info,
                  "hardware": hardware.detect().to_dict()}))
"""


class _LlamaProbeRun:
    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE_SCRIPT],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._result: _LlamaProbe | None = None

    def result(self) -> _LlamaProbe:
        if self._result is None:
            self._result = self._collect()
        return self._result

    def _collect(self) -> _LlamaProbe:
        try:
            out, err = self._proc.communicate(timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            return _LlamaProbe(error=f"loading llama.cpp took more than {PROBE_TIMEOUT_S:.0f} s")
        code = self._proc.returncode
        if code < 0:
            from engine.protocol import describe_exit

            return _LlamaProbe(error=describe_exit(code, "loading llama.cpp"), crashed=True)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if code != 0 or not lines:
            tail = (err.strip().splitlines() or ["no output"])[-1][:300]
            return _LlamaProbe(error=f"llama.cpp cannot be loaded: {tail}")
        data = json.loads(lines[-1])
        return _LlamaProbe(str(data["version"]), str(data["system_info"]), data["hardware"])


# -- Python, llama.cpp, GPU -------------------------------------------------------------


def _check_python(ctx: _Context) -> Check:
    from importlib.metadata import PackageNotFoundError, version

    try:
        bastion = version("bastion")
    except PackageNotFoundError:
        bastion = "not installed"
    py = platform.python_version()
    detail = (
        f"Python {py} ({platform.python_implementation()}, {sys.executable}); "
        f"{platform.platform(terse=True)} on {platform.machine()}; bastion {bastion}"
    )
    if sys.version_info < (3, 11):  # noqa: UP036 -- says so where pip's check was skipped
        return Check("python", False, detail, "install Python 3.11 or newer, then run " + SETUP)
    return Check("python", True, detail)


def _parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """``"CUDA : ARCHS = 890 | CPU : AVX2 = 1 | ..."`` -> {"CUDA": {...}, "CPU": {...}}."""
    sections: dict[str, dict[str, str]] = {}
    current = "CPU"  # older builds print the CPU's features without a section name
    for raw in text.split("|"):
        token = raw.strip()
        if " : " in token:
            current, token = (part.strip() for part in token.split(" : ", 1))
        key, sep, value = token.partition("=")
        if sep:
            sections.setdefault(current, {})[key.strip()] = value.strip()
    return sections


def _rebuild_fix() -> str:
    """How to throw away the installed llama.cpp build and its cached wheel, then rebuild."""
    cache = os.environ.get("BASTION_WHEEL_CACHE") or (
        "~/Library/Caches/bastion/wheels"
        if sys.platform == "darwin"
        else f"{os.environ.get('XDG_CACHE_HOME') or '~/.cache'}/bastion/wheels"
    )
    stamp = Path(sys.prefix) / "bastion-setup.json"
    return f"rebuild llama.cpp: rm -rf {cache}/llama-cpp-python-* {stamp}; then run {SETUP}"


def _check_llama(ctx: _Context) -> Check:
    assert ctx.llama is not None
    probe = ctx.llama.result()
    if probe.error:
        fix = _rebuild_fix() if probe.crashed else f"run {SETUP}"
        return Check("llama.cpp", False, probe.error, fix)
    sections = _parse_system_info(probe.system_info)
    isa = {"LLAMAFILE", "OPENMP", "REPACK", "ACCELERATE", "KLEIDIAI"}  # not instruction sets
    built = [k for k, v in sections.get("CPU", {}).items() if v == "1" and k not in isa]
    gpu_backends = [s for s in sections if s != "CPU"]
    offload = bool(probe.hardware.get("gpu_offload_supported"))
    backend = ", ".join(gpu_backends) if gpu_backends else ("GPU" if offload else "CPU")
    detail = f"llama-cpp-python {probe.version}, {backend} build; built for {' '.join(built)}"
    flags = cpu_flags()
    if flags is not None and platform.machine() in ("x86_64", "AMD64", "i686"):
        shown = [f for f in _CPU_FLAGS_SHOWN if f in flags]
        detail += f"; this CPU has {' '.join(shown) or 'none of avx2/avx512/amx'}"
        lacking = [
            b for b in built if b in _BUILD_TO_CPU_FLAG and _BUILD_TO_CPU_FLAG[b] not in flags
        ]
        if lacking:
            return Check(
                "llama.cpp",
                False,
                f"{detail}; the build uses {', '.join(lacking)}, which this CPU lacks: "
                "it can crash with 'illegal instruction'",
                _rebuild_fix(),
            )
    else:
        detail += f"; this CPU: {platform.machine()}"
    return Check("llama.cpp", True, detail)


@functools.cache
def _nvidia_driver() -> str | None:
    """The NVIDIA driver's version, or None where there is no NVIDIA driver."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text(errors="replace")
    except OSError:
        text = ""
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    if found:
        return found.group(1)
    from engine.models.hardware import nvidia_smi_query

    lines = nvidia_smi_query("driver_version")
    if lines is None:
        return "of unknown version" if text else None
    return lines[0].strip() if lines else None


def gpu_finding(gpus: list[dict[str, Any]], offload: bool, driver: str | None) -> Check:
    """The GPU check for a described machine (``Hardware.gpus`` as dicts)."""
    listed = "; ".join(
        f"{g['name']}: {human_size(g['free_bytes'])} free of {human_size(g['total_bytes'])}"
        for g in gpus
    )
    if driver is not None and not gpus:
        return Check(
            "gpu",
            False,
            f"NVIDIA driver {driver}, but nvidia-smi lists no GPU",
            "run `nvidia-smi` to see why (after a driver update, restart the machine)",
        )
    if driver is not None:
        listed = f"NVIDIA driver {driver}; {listed}"
    if not listed:
        return Check("gpu", True, "CPU only: no GPU found")
    if offload:
        return Check("gpu", True, f"{listed}; llama.cpp offloads layers to it")
    metal = any(g.get("backend") == "metal" for g in gpus)
    backend = "metal" if metal else "cuda"
    fix = f"rebuild llama.cpp for the GPU: BASTION_LLAMA_BACKEND={backend} {SETUP}"
    has_nvcc = shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()
    if backend == "cuda" and not has_nvcc:
        fix = "install the CUDA toolkit (nvcc), then " + fix
    return Check("gpu", False, f"{listed}; but the llama.cpp build cannot use it (CPU only)", fix)


def _check_gpu(ctx: _Context) -> Check:
    assert ctx.llama is not None
    probe = ctx.llama.result()
    driver = _nvidia_driver()
    if probe.error:  # the GPUs are listed by the child that could not load llama.cpp
        where = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver"
        return Check(
            "gpu",
            True,
            f"{where}; GPUs not listed: llama.cpp cannot be loaded (see the llama.cpp check)",
        )
    hw = probe.hardware
    return gpu_finding(list(hw.get("gpus", [])), bool(hw.get("gpu_offload_supported")), driver)


def _check_selftest(ctx: _Context) -> Check:
    try:
        from engine.models.selftest import (  # type: ignore[import-not-found,unused-ignore]
            read_verdict,
        )
    except ImportError:
        return Check("self-test", True, "self-test module not available")
    verdict = read_verdict()
    if verdict is None:
        return Check(
            "self-test",
            False,
            "llama.cpp has not been self-tested on this machine (or was rebuilt since)",
            f"run `{SETUP}` (it self-tests llama.cpp)",
        )
    if verdict.config is None or not verdict.ok:
        fix = f"{_rebuild_fix()}; if it fails again, report it with this output"
        if not verdict.settled:  # a probe hung: the build may be fine
            fix = f"run `{SETUP}` again while the machine is not busy (it self-tests llama.cpp)"
        return Check("self-test", False, verdict.summary(), fix)
    detail = verdict.summary()
    if verdict.disabled and not all(d in detail for d in verdict.disabled):
        detail += f"; turned off: {', '.join(verdict.disabled)}"
    return Check("self-test", True, detail)
