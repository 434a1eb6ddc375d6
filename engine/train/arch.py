"""Which model architectures Bastion can fine-tune, and how their LoRA layers map to GGUF.

A fine-tune is only useful if llama.cpp can apply it, so an architecture is supported
when three things hold: transformers can load it (from GGUF or a Hugging Face folder),
PEFT can wrap its linear layers, and we know the GGUF names of those layers and any
reordering llama.cpp's converter applies to them. Anything else is refused before
training starts.

llama.cpp's converter reorders the rows of the query and key projections of Llama-family
models (interleaved rotary halves); transformers undoes that when it loads a GGUF, so a
LoRA trained on the loaded model lives in Hugging Face order, and the rows of its ``B``
matrices for ``q_proj``/``k_proj`` must be reordered the same way on export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import InvalidInput

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Hugging Face module name (last two parts) -> llama.cpp tensor name inside ``blk.N``.
LAYER_MODULES: dict[str, str] = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TARGET_MODULES = tuple(name.split(".")[-1] for name in LAYER_MODULES)


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # general.architecture in GGUF files
    hf_model_types: tuple[str, ...]  # config.json "model_type" values
    permute_qk: bool  # llama.cpp reorders q/k rows for this family


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama", "mistral"), permute_qk=True),
    ArchSpec("qwen2", ("qwen2",), permute_qk=False),
)


def supported_names() -> str:
    return ", ".join(a.gguf_arch for a in ARCHITECTURES)


def for_gguf(arch: str | None, what: str) -> ArchSpec:
    """The spec for a GGUF architecture, or ``InvalidInput`` saying why it can't be trained."""
    for spec in ARCHITECTURES:
        if spec.gguf_arch == arch:
            return spec
    raise InvalidInput(
        f"{what} can't be fine-tuned: architecture {arch or 'unknown'!r} is not one Bastion "
        f"can train and export as a llama.cpp adapter (supported: {supported_names()})"
    )


def for_hf(model_type: str | None, what: str) -> ArchSpec:
    """The spec for a Hugging Face ``model_type``, or ``InvalidInput``."""
    for spec in ARCHITECTURES:
        if model_type in spec.hf_model_types:
            return spec
    raise InvalidInput(
        f"{what} can't be fine-tuned: model type {model_type or 'unknown'!r} is not one "
        f"Bastion can train and export as a llama.cpp adapter (supported: "
        f"{', '.join(t for a in ARCHITECTURES for t in a.hf_model_types)})"
    )


def gguf_tensor_name(module_path: str) -> tuple[str, str] | None:
    """``(gguf base name, HF short name)`` for a PEFT module path, or None if not a layer.

    ``base_model.model.model.layers.3.self_attn.q_proj`` -> ``("blk.3.attn_q.weight", "q_proj")``.
    """
    parts = module_path.split(".")
    try:
        at = parts.index("layers")
        block = int(parts[at + 1])
    except (ValueError, IndexError):
        return None
    key = ".".join(parts[at + 2 : at + 4])
    name = LAYER_MODULES.get(key)
    if name is None:
        return None
    return f"blk.{block}.{name}.weight", parts[at + 3]


def permute_rows(w: npt.NDArray[np.float32], n_head: int) -> npt.NDArray[np.float32]:
    """Reorder the output rows of a q/k projection (or a LoRA ``B``) the way llama.cpp does.

    Within each head, rows ``[0, d/2)`` and ``[d/2, d)`` (the two rotary halves, Hugging
    Face layout) become interleaved pairs (GGUF layout).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of rotary pairs")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
