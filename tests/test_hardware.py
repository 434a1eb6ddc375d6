"""Threads and GPU offload decisions, on the real machine and on described ones."""

from __future__ import annotations

from dataclasses import replace

import psutil

from engine.models import hardware
from engine.models.gguf_info import read_gguf_info
from engine.models.hardware import GPU, Hardware
from tests.conftest import default_model_path

GIB = 1024**3


def _machine(free_vram: int | None, offload: bool = True) -> Hardware:
    gpus = () if free_vram is None else (GPU("Test GPU", "cuda", 24 * GIB, free_vram),)
    return Hardware("cpu", 8, 16, 64 * GIB, 32 * GIB, gpus, offload)


def test_threads_are_physical_cores() -> None:
    assert hardware.physical_cores() == (psutil.cpu_count(logical=False) or 1)
    assert hardware.detect().physical_cores == hardware.physical_cores()


def test_all_layers_offloaded_when_they_fit() -> None:
    info = read_gguf_info(default_model_path())
    assert hardware.auto_gpu_layers(info, 4096, _machine(8 * GIB)) == info.block_count + 1


def test_partial_offload_when_memory_is_short() -> None:
    info = read_gguf_info(default_model_path())
    big = replace(info, size_bytes=40 * GIB)  # describe a 40 GB model with the same layout
    layers = hardware.auto_gpu_layers(big, 4096, _machine(10 * GIB))
    assert 0 < layers < info.block_count
    assert hardware.fit_report(big, 4096, _machine(10 * GIB)).runs_on == "split"


def test_no_offload_without_gpu_or_gpu_build() -> None:
    info = read_gguf_info(default_model_path())
    assert hardware.auto_gpu_layers(info, 4096, _machine(None)) == 0
    assert hardware.auto_gpu_layers(info, 4096, _machine(8 * GIB, offload=False)) == 0
    assert hardware.fit_report(info, 4096, _machine(None)).runs_on == "cpu"


def test_kv_cache_estimate_grows_with_context() -> None:
    info = read_gguf_info(default_model_path())
    small, large = hardware.kv_cache_bytes(info, 1024), hardware.kv_cache_bytes(info, 8192)
    # 30 layers x 3 KV heads x 64 dims x K and V x 2 bytes per token
    assert small == 1024 * 30 * 3 * 64 * 2 * 2
    assert large == 8 * small
