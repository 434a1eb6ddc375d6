"""Merging a fine-tune's GGUF LoRA adapter into its base: one GGUF for tools without adapters.

For every weight ``W`` the adapter names (``W.lora_a``, rank x in, and ``W.lora_b``, out x
rank, numpy order), the merged file holds ``dequantize(W) + s * (B @ A)`` with
``s = alpha / rank`` -- llama.cpp's own scale (``llama_adapter_lora_weight::get_scale``:
``alpha`` from ``adapter.lora.alpha``, the rank from ``lora_b``; ``alpha = 0`` means an
unscaled ``s = 1``), so the merged model computes what llama.cpp computes with base +
``--lora``. Every other tensor is copied as it is (type and bytes), and every metadata key
of the base (architecture, tokenizer, chat template) is kept; ``general.name`` becomes the
fine-tune's id.

Merged weights are stored as F16 (F32 where the base kept that weight in F32), not
requantized to the base's type: every llama.cpp backend multiplies F16 weights, while a
4-bit grid (a step of about a fifteenth of a block's range) is far coarser than a LoRA's
delta and would round much of what was learned away -- and ``gguf`` can requantize only
the legacy types (Q4_0 ... Q8_0), not the K-quants. The file is larger than the base for
that; ``llama-quantize`` can shrink it afterwards, knowingly.

Memory: base and adapter are memory-mapped, and tensors are written one at a time; a
merged weight is built in blocks of rows, so the peak is one weight in F16 plus a block in
F32, never the whole model (a 7B model's largest adapted weight is about 90 MB in F16).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import EnvironmentFault, InvalidModelFile, OperationFailed
from engine.paths import fsync_folder
from engine.units import human_size

if TYPE_CHECKING:
    import gguf
    import numpy.typing as npt

    from engine.jobs import JobContext

# F32 elements of one block of rows of a merged weight (16 MB).
_BLOCK_ELEMENTS = 1 << 22
_SUFFIXES = (".lora_a", ".lora_b")


@dataclass(frozen=True)
class _Lora:
    """One adapted weight: the base tensor, its LoRA pair, and how to store the sum."""

    a: gguf.ReaderTensor
    b: gguf.ReaderTensor
    out_type: gguf.GGMLQuantizationType


def merge_lora(
    base: Path, adapter: Path, out: Path, *, name: str, ctx: JobContext | None = None
) -> int:
    """Write ``base`` with ``adapter`` merged in as one GGUF at ``out``.

    Written to a hidden temporary file beside ``out``, fsynced and renamed, so ``out`` is
    never half a model; on any error or cancel the temporary file is removed.

    Args:
        base: the base model's GGUF.
        adapter: a llama.cpp LoRA adapter (GGUF) made for ``base``.
        out: the merged file to write (replaced if it exists).
        name: the merged model's ``general.name``.
        ctx: progress (one step per tensor) and cancel.

    Returns:
        The number of weights the adapter changed.

    Raises:
        InvalidModelFile: a file is unreadable, or the adapter does not fit the base
            (another architecture, a tensor the base lacks, a shape that differs).
        EnvironmentFault: the disk is full or the folder cannot be written.
        OperationFailed: a merged weight overflows F16.
        Cancelled: ``ctx`` was cancelled (nothing is left behind).
    """
    import gguf

    base_file = _read(base, "the base model")
    lora_file = _read(adapter, "the adapter")
    loras = _pairs(base_file, lora_file, adapter)
    alpha = _field(lora_file, gguf.Keys.Adapter.LORA_ALPHA) or 0.0
    out_sizes = [_out_nbytes(t, loras.get(t.name)) for t in base_file.tensors]
    _check_space(out.parent, base_file, base, sum(out_sizes))

    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
        os.close(fd)
        tmp = Path(tmp_name)
        arch = _field(base_file, gguf.Keys.General.ARCHITECTURE)
        writer = gguf.GGUFWriter(str(tmp), arch, endianess=base_file.endianess)
        try:
            _write_header(writer, base_file, name, loras)
            total = len(base_file.tensors)
            for done, tensor in enumerate(base_file.tensors):
                if ctx is not None:
                    ctx.check_cancelled()
                lora = loras.get(tensor.name)
                if lora is None:
                    writer.write_tensor_data(tensor.data, tensor_endianess=base_file.endianess)
                else:
                    writer.write_tensor_data(_merged(tensor, lora, float(alpha)))
                if ctx is not None:
                    ctx.report(done + 1, total, tensor.name)
        finally:
            writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        tmp = None
        fsync_folder(out.parent)
    except OSError as exc:
        raise _write_fault(exc, out) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return len(loras)


def _read(path: Path, what: str) -> gguf.GGUFReader:
    import gguf

    if not path.is_file():
        raise InvalidModelFile(f"{what} is missing: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # a corrupt file fails in numpy, struct or gguf itself
        raise InvalidModelFile(f"{what} ({path}) is not a readable GGUF file: {exc}") from exc


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def _pairs(base: gguf.GGUFReader, lora: gguf.GGUFReader, path: Path) -> dict[str, _Lora]:
    """The adapter's LoRA pairs by base tensor name, checked the way llama.cpp checks them."""
    import gguf

    def unfit(why: str) -> InvalidModelFile:
        return InvalidModelFile(f"the adapter {path.name} does not fit its base model: {why}")

    if _field(lora, gguf.Keys.General.TYPE) != gguf.GGUFType.ADAPTER or _field(
        lora, gguf.Keys.Adapter.TYPE
    ) not in (None, "lora"):
        raise InvalidModelFile(f"{path.name} is not a LoRA adapter")
    if _field(lora, gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS) is not None:
        raise InvalidModelFile(
            f"{path.name} is an activated LoRA: it applies only after its invocation "
            "tokens, so it can't be merged into the weights"
        )
    arch = _field(base, gguf.Keys.General.ARCHITECTURE)
    lora_arch = _field(lora, gguf.Keys.General.ARCHITECTURE)
    if lora_arch != arch:
        raise unfit(f"it is for architecture {lora_arch!r}, the base is {arch!r}")
    weights = {t.name: t for t in base.tensors}
    halves: dict[str, dict[str, gguf.ReaderTensor]] = {}
    for tensor in lora.tensors:
        stem, suffix = tensor.name[:-7], tensor.name[-7:]
        if suffix not in _SUFFIXES:
            raise unfit(f"tensor {tensor.name} is not a LoRA half (.lora_a/.lora_b)")
        halves.setdefault(stem, {})[suffix] = tensor
    if not halves:
        raise unfit("it has no LoRA tensors")
    loras: dict[str, _Lora] = {}
    for stem, pair in halves.items():
        if len(pair) != 2:
            raise unfit(f"{stem} has only one of .lora_a and .lora_b")
        weight = weights.get(stem)
        if weight is None:
            raise unfit(f"the base has no tensor {stem}")
        if stem == "token_embd.weight":  # llama.cpp adds it to looked-up rows, A and B flipped,
            # and a model with tied embeddings reads the same weight as its output layer
            raise InvalidModelFile(
                f"{path.name} adapts the token embeddings, which Bastion does not merge",
                hint="use the adapter as it is (--to llama-server or ollama)",
            )
        a, b = pair[".lora_a"], pair[".lora_b"]
        w_shape, a_shape, b_shape = _shape(weight), _shape(a), _shape(b)
        if len(w_shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2:
            raise unfit(f"{stem} is not a matrix in both files")
        if a_shape[0] != b_shape[1] or w_shape != (b_shape[0], a_shape[1]):
            raise unfit(
                f"{stem} is {w_shape[0]} x {w_shape[1]} in the base, but B @ A is "
                f"({b_shape[0]} x {b_shape[1]}) @ ({a_shape[0]} x {a_shape[1]})"
            )
        f32 = gguf.GGMLQuantizationType.F32
        out_type = f32 if weight.tensor_type == f32 else gguf.GGMLQuantizationType.F16
        loras[stem] = _Lora(a, b, out_type)
    return loras


def _shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """The tensor's logical shape in numpy order (GGUF lists dimensions innermost first)."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _out_nbytes(tensor: gguf.ReaderTensor, lora: _Lora | None) -> int:
    import gguf

    if lora is None:
        return int(tensor.n_bytes)
    width = 4 if lora.out_type == gguf.GGMLQuantizationType.F32 else 2
    return int(tensor.n_elements) * width


def _write_header(
    writer: gguf.GGUFWriter, base: gguf.GGUFReader, name: str, loras: dict[str, _Lora]
) -> None:
    """The base's metadata (with the new name and file type) and the merged tensor table."""
    import gguf
    import numpy as np

    alignment = _field(base, gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment)
    replaced = {gguf.Keys.General.NAME, gguf.Keys.General.FILE_TYPE}
    for field in base.fields.values():
        # GGUF.* are the reader's view of the header; the writer writes the architecture.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        if field.name in replaced:
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
    writer.add_name(name)
    file_type = _file_type(base, loras)
    if file_type is not None:
        writer.add_file_type(file_type)
    for tensor in base.tensors:
        lora = loras.get(tensor.name)
        if lora is None:  # raw: the byte shape and the type, as gguf_new_metadata does
            writer.add_tensor_info(
                tensor.name, tensor.data.shape, tensor.data.dtype, tensor.n_bytes,
                tensor.tensor_type,
            )  # fmt: skip
        else:
            dtype = np.float32 if lora.out_type == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(
                tensor.name, _shape(tensor), np.dtype(dtype), _out_nbytes(tensor, lora)
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def _file_type(base: gguf.GGUFReader, loras: dict[str, _Lora]) -> int | None:
    """``general.file_type`` for the merged file: MOSTLY_F16 once most non-F32 tensors are
    F16 (llama.cpp's own guess counts tensors by type the same way), else the base's."""
    import gguf

    f32 = gguf.GGMLQuantizationType.F32
    types = Counter(
        loras[t.name].out_type if t.name in loras else t.tensor_type for t in base.tensors
    )
    types.pop(f32, None)
    kept = _field(base, gguf.Keys.General.FILE_TYPE)
    if types and types.most_common(1)[0][0] == gguf.GGMLQuantizationType.F16:
        return int(gguf.LlamaFileType.MOSTLY_F16)
    return int(kept) if kept is not None else None


def _merged(weight: gguf.ReaderTensor, lora: _Lora, alpha: float) -> npt.NDArray[Any]:
    """``dequantize(W) + scale * (B @ A)`` in the output type, built a block of rows at a time."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    a = dequantize(lora.a.data, lora.a.tensor_type).astype(np.float32, copy=False)
    b = dequantize(lora.b.data, lora.b.tensor_type).astype(np.float32)
    rank = b.shape[1]
    b *= alpha / rank if alpha else 1.0
    rows, cols = _shape(weight)
    f32 = lora.out_type == gguf.GGMLQuantizationType.F32
    merged = np.empty((rows, cols), dtype=np.float32 if f32 else np.float16)
    step = max(1, _BLOCK_ELEMENTS // cols)
    try:
        for start in range(0, rows, step):
            block = slice(start, start + step)
            # A row of a quantized tensor is whole blocks, so a slice of rows dequantizes alone.
            w = dequantize(weight.data[block], weight.tensor_type).reshape(-1, cols)
            with np.errstate(over="ignore"):  # an overflow is caught below, with its name
                np.add(w, b[block] @ a, out=merged[block], casting="same_kind")
    except NotImplementedError as exc:  # a type the gguf package cannot dequantize
        raise OperationFailed(f"can't merge {weight.name}: {exc}") from exc
    if not f32 and not np.isfinite(merged).all():
        raise OperationFailed(
            f"the merged weight {weight.name} has values beyond F16's range",
            hint="the adapter's weights are far too large; check the fine-tune",
        )
    return merged


def _check_space(folder: Path, base: gguf.GGUFReader, base_path: Path, tensor_bytes: int) -> None:
    """Refuse now, not after writing 90 %: the merged tensors plus the base's header."""
    header = base_path.stat().st_size - sum(int(t.n_bytes) for t in base.tensors)
    needed = tensor_bytes + max(header, 0)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # can't tell: the write itself will say if the disk fills
    if free < needed:
        raise EnvironmentFault(
            f"not enough disk space for the merged model ({human_size(needed)}) in {folder}",
            hint="free some space, or export with --out to another disk",
        )


def _write_fault(exc: OSError, out: Path) -> EnvironmentFault:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EnvironmentFault(
            f"the disk filled up while writing {out}",
            hint="free some space, or export with --out to another disk",
        )
    return EnvironmentFault(
        f"could not write {out}: {exc.strerror or exc}",
        hint="check that the folder is writable and the disk healthy",
    )
