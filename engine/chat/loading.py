"""How a model is loaded for chat on this machine: its context size, threads and GPU layers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from engine.models import hardware
from engine.models.registry import ModelEntry, ModelSettings
from engine.models.runtime import LoadSpec

# Context used when a model does not say or the user has not chosen: enough for long
# conversations, small enough that the KV cache of a 7B model stays in a laptop's memory.
DEFAULT_CONTEXT = 4096


def load_spec_for(entry: ModelEntry) -> LoadSpec:
    """How to load ``entry`` here: its overrides where set, automatic choices otherwise."""
    s = entry.settings
    n_ctx = s.context or min(entry.context_length or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    if entry.remote:  # served elsewhere: only its window matters here
        return LoadSpec(
            model_id=entry.id, path=entry.path, n_ctx=n_ctx, n_threads=1, n_gpu_layers=0
        )
    if s.gpu_layers is not None:
        gpu_layers = s.gpu_layers
    elif hardware.gpu_offload_supported():
        from engine.models.gguf_info import read_gguf_info

        gpu_layers = hardware.auto_gpu_layers(
            read_gguf_info(Path(entry.path)), n_ctx, hardware.detect()
        )
    else:
        gpu_layers = 0
    return LoadSpec(
        model_id=entry.id,
        path=entry.path,
        n_ctx=n_ctx,
        n_threads=s.threads or hardware.physical_cores(),
        n_gpu_layers=gpu_layers,
        lora_path=entry.adapter,
    )


class LoadSpecs:
    """The load spec of each model, decided once per process and settings.

    Deciding again would re-read the header and ask the GPU for its free memory -- which
    the loaded model itself has reduced, so the answer would differ and force a reload on
    every message.
    """

    def __init__(self) -> None:
        self._specs: dict[tuple[str, str, str | None, ModelSettings], LoadSpec] = {}
        self.parallel = 1  # generations run together (the server sets more)

    def get(self, entry: ModelEntry) -> LoadSpec:
        """The spec of ``entry``: the one decided before for these settings, else a new one."""
        key = (entry.id, entry.path, entry.adapter, entry.settings)
        if key not in self._specs:
            self._specs[key] = replace(load_spec_for(entry), parallel=self.parallel)
        return self._specs[key]

    def set_parallel(self, parallel: int) -> None:
        """Load models for ``parallel`` generations at once from now on."""
        if parallel != self.parallel:
            self.parallel = parallel
            self._specs.clear()
