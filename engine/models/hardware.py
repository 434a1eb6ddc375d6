"""The machine: cores, memory, GPU, and whether a model fits in them."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from engine.models.gguf_info import GGUFInfo

# Working memory llama.cpp needs beyond weights and KV cache (compute buffers, scratch).
_OVERHEAD_BYTES = 300 * 1024**2


@dataclass(frozen=True)
class GPU:
    """One accelerator as llama.cpp would use it."""

    name: str
    backend: str  # "cuda" or "metal"
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Hardware:
    """What this machine offers a model."""

    cpu: str
    physical_cores: int
    logical_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GPU, ...]
    gpu_offload_supported: bool  # the installed llama.cpp build can offload

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def physical_cores() -> int:
    """Physical cores: llama.cpp runs fastest with one thread per core.

    llama-cpp-python's own default is half the logical count, which on a machine without
    SMT leaves half the cores idle.
    """
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform says."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        return " ".join(line.split(":", 1)[1].split())
        except OSError:
            pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux /proc/cpuinfo); None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@functools.cache
def gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp was built with a GPU backend.

    The self-test's verdict says so without loading llama.cpp into this process (the
    model lives in the model host); without a verdict, llama.cpp is asked.
    """
    from engine.models.selftest import read_verdict

    verdict = read_verdict()
    if verdict is not None:
        return verdict.backend != "cpu"
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return False


def nvidia_smi_query(fields: str) -> list[str] | None:
    """``nvidia-smi --query-gpu=FIELDS`` as CSV lines (one a GPU); None when it cannot answer."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()


def _nvidia_gpus() -> list[GPU]:
    gpus = []
    for line in nvidia_smi_query("name,memory.total,memory.free") or []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            mib = 1024**2
            gpus.append(GPU(parts[0], "cuda", int(parts[1]) * mib, int(parts[2]) * mib))
    return gpus


def detect() -> Hardware:
    """Look at the machine now (memory figures are current, not cached)."""
    import psutil

    vm = psutil.virtual_memory()
    gpus: list[GPU] = []
    if sys.platform == "darwin" and platform.machine() == "arm64":
        # Unified memory: Metal may use about two thirds of it for a model's buffers.
        gpus.append(GPU("Apple GPU", "metal", vm.total * 2 // 3, vm.available * 2 // 3))
    else:
        gpus.extend(_nvidia_gpus())
    return Hardware(
        cpu=cpu_name(),
        physical_cores=physical_cores(),
        logical_cores=os.cpu_count() or 1,
        ram_total_bytes=vm.total,
        ram_available_bytes=vm.available,
        gpus=tuple(gpus),
        gpu_offload_supported=gpu_offload_supported(),
    )


def kv_cache_bytes(info: GGUFInfo, n_ctx: int) -> int:
    """Bytes of an f16 KV cache for ``n_ctx`` tokens."""
    layers = info.block_count or 0
    embd = info.embedding_length or 0
    heads = info.head_count or 1
    kv_heads = info.head_count_kv or heads
    per_token = 2 * layers * (embd // max(heads, 1)) * kv_heads * 2  # K and V, 2 bytes each
    return per_token * n_ctx


def auto_gpu_layers(info: GGUFInfo, n_ctx: int, hw: Hardware) -> int:
    """Layers to offload: all when they fit in free GPU memory, otherwise as many as do.

    Returns 0 on a build or machine without a usable GPU. A value of ``-1`` is never
    returned: callers get an explicit count they can show and override.
    """
    if not hw.gpu_offload_supported or not hw.gpus:
        return 0
    layers = info.block_count or 0
    if layers <= 0:
        return 0
    free = max(g.free_bytes for g in hw.gpus) - _OVERHEAD_BYTES
    needed = info.size_bytes + kv_cache_bytes(info, n_ctx)
    if needed <= free:
        return layers + 1  # the output layer too
    per_layer = needed / layers
    return max(0, min(layers, int(free // per_layer)))


@dataclass(frozen=True)
class Fit:
    """Whether a model fits this machine at a context size, and where it would run."""

    context: int
    estimated_bytes: int
    kv_cache_bytes: int
    fits_in_ram: bool
    gpu_layers: int
    runs_on: str  # "gpu", "split" or "cpu"


def fit_report(info: GGUFInfo, n_ctx: int, hw: Hardware) -> Fit:
    """Whether the model fits, and where, in plain numbers for ``models info``."""
    needed = info.size_bytes + kv_cache_bytes(info, n_ctx) + _OVERHEAD_BYTES
    gpu_layers = auto_gpu_layers(info, n_ctx, hw)
    layers = info.block_count or 0
    if gpu_layers > layers > 0:
        where = "gpu"
    elif gpu_layers > 0:
        where = "split"
    else:
        where = "cpu"
    return Fit(
        context=n_ctx,
        estimated_bytes=needed,
        kv_cache_bytes=kv_cache_bytes(info, n_ctx),
        fits_in_ram=needed <= hw.ram_available_bytes,
        gpu_layers=gpu_layers,
        runs_on=where,
    )
