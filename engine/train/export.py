"""Writing a trained LoRA as a llama.cpp adapter (GGUF), with the gguf package.

The file llama.cpp expects (``llama_adapter_lora_init``): ``general.type = "adapter"``,
``general.architecture`` equal to the base model's, ``adapter.type = "lora"``,
``adapter.lora.alpha``, and for every adapted weight ``W`` (GGUF name ``blk.N.x.weight``)
two tensors ``blk.N.x.weight.lora_a`` (shape rank x in) and ``.lora_b`` (out x rank) — the
same shapes PEFT keeps in ``lora_A.weight`` and ``lora_B.weight``. llama.cpp scales the
product by alpha / rank, as PEFT does without rsLoRA.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import OperationFailed
from engine.train.arch import ArchSpec, gguf_tensor_name, permute_rows

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def lora_pairs(
    state: Mapping[str, npt.NDArray[np.float32]],
) -> dict[str, dict[str, npt.NDArray[np.float32]]]:
    """Group a PEFT adapter state dict by module: ``{module path: {"A": a, "B": b}}``."""
    modules: dict[str, dict[str, npt.NDArray[np.float32]]] = {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match is not None:
            modules.setdefault(match["module"], {})[match["ab"]] = value
    return modules


def write_gguf_lora(
    state: Mapping[str, npt.NDArray[np.float32]],
    arch: ArchSpec,
    *,
    alpha: float,
    n_head: int,
    n_head_kv: int,
    out: Path,
    name: str,
) -> int:
    """Write ``state`` (PEFT LoRA weights as float32 arrays) as a GGUF adapter at ``out``.

    Written to a temporary file, fsynced and renamed, so a crash never leaves half an
    adapter. Returns the number of adapted weights.

    Raises:
        OperationFailed: a LoRA module has no llama.cpp name (nothing is written).
    """
    import gguf
    import numpy as np

    strays = [key for key in state if not _LORA_KEY.match(key)]
    if strays:  # e.g. DoRA magnitudes or saved embeddings: llama.cpp can't apply them
        raise OperationFailed(f"the adapter has weights llama.cpp can't apply: {strays[0]}")
    tensors: list[tuple[str, npt.NDArray[np.float32]]] = []
    for module, pair in sorted(lora_pairs(state).items()):
        mapped = gguf_tensor_name(module)
        if mapped is None or set(pair) != {"A", "B"}:
            raise OperationFailed(f"the adapter's layer {module} has no llama.cpp equivalent")
        base_name, short = mapped
        a = np.ascontiguousarray(pair["A"], dtype=np.float32)
        b = np.ascontiguousarray(pair["B"], dtype=np.float32)
        if arch.permute_qk and short in ("q_proj", "k_proj"):
            b = np.ascontiguousarray(permute_rows(b, n_head if short == "q_proj" else n_head_kv))
        tensors.append((base_name + ".lora_a", a))
        tensors.append((base_name + ".lora_b", b))
    if not tensors:
        raise OperationFailed("the adapter has no LoRA weights to export")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor_name, data in tensors:
        writer.add_tensor(tensor_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return len(tensors) // 2
