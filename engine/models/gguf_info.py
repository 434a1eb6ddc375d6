"""Reading and validating a GGUF file's header without loading its weights.

The layout, type codes and quantization block sizes come from the ``gguf`` package (the
reference implementation maintained with llama.cpp). The walk over the header is our own:
``gguf.GGUFReader`` builds a numpy view for every element of every array, so on a model
with a 49k-token vocabulary it spends seconds materializing the tokenizer; here arrays
are skipped with one ``struct`` call per string, which takes milliseconds. A test checks
that both readers agree on the default model.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InvalidModelFile, NotFound

# Arrays at most this long are kept in ``metadata`` (languages, tags); longer ones
# (vocabularies, merges) are only counted.
_SMALL_ARRAY = 64
# A GGUF with more keys or tensors than this is corrupt rather than big.
_MAX_COUNT = 10_000_000
# Arrays of arrays nested deeper than this are corrupt (llama.cpp reads no nested arrays
# at all); the walk is recursive, so a bound keeps a crafted header from exhausting the
# stack ("RecursionError") instead of being refused as a bad file.
_MAX_NESTING = 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's place in the file."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    n_elements: int
    n_bytes: int
    offset: int  # absolute, in bytes from the start of the file


@dataclass(frozen=True)
class GGUFInfo:
    """What Bastion records about a GGUF file."""

    path: Path
    size_bytes: int
    version: int
    architecture: str
    file_kind: str  # general.type: "model", or "adapter" for LoRA adapters
    name: str | None
    params: int
    quant: str
    context_length: int | None
    chat_template: str | None
    block_count: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    vocab_size: int | None
    tensor_count: int
    metadata: dict[str, Any] = field(repr=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False, default=())

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict without the per-tensor list."""
        data = asdict(self)
        data.pop("tensors")
        data["path"] = str(self.path)
        data["has_chat_template"] = self.chat_template is not None
        return data

    def arch_value(self, key: str) -> Any:
        """A value of the ``<architecture>.<key>`` family, or None."""
        return self.metadata.get(f"{self.architecture}.{key}")


class _Cursor:
    """Sequential little-endian reads over a memory map, failing as 'truncated'."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.size = len(buf)

    def _truncated(self, what: str) -> InvalidModelFile:
        return InvalidModelFile(
            f"{self.path.name} is truncated: its header ends inside {what} "
            f"(file is {self.size} bytes)",
            hint="the download or copy did not finish; get the file again",
        )

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        st = struct.Struct("<" + fmt)
        if self.pos + st.size > self.size:
            raise self._truncated(what)
        values = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return values

    def u32(self, what: str) -> int:
        return int(self.unpack("I", what)[0])

    def u64(self, what: str) -> int:
        return int(self.unpack("Q", what)[0])

    def string(self, what: str) -> str:
        length = self.u64(what)
        if self.pos + length > self.size:
            raise self._truncated(what)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidModelFile(f"{self.path.name} has a {what} that is not UTF-8") from exc

    def skip_strings(self, count: int, what: str) -> None:
        """Skip ``count`` length-prefixed strings (one struct call each)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self._truncated(what)
            pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            raise self._truncated(what)
        self.pos = pos

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self._truncated(what)
        self.pos += n


def _scalar_formats() -> dict[int, str]:
    from gguf import GGUFValueType as T

    return {
        T.UINT8: "B",
        T.INT8: "b",
        T.UINT16: "H",
        T.INT16: "h",
        T.UINT32: "I",
        T.INT32: "i",
        T.FLOAT32: "f",
        T.UINT64: "Q",
        T.INT64: "q",
        T.FLOAT64: "d",
        T.BOOL: "?",
    }


def _read_value(cur: _Cursor, vtype: int, key: str, formats: dict[int, str], depth: int = 0) -> Any:
    from gguf import GGUFValueType as T

    if vtype in formats:
        return cur.unpack(formats[vtype], f"the value of {key}")[0]
    if vtype == T.STRING:
        return cur.string(f"the value of {key}")
    if vtype == T.ARRAY:
        if depth >= _MAX_NESTING:
            raise InvalidModelFile(
                f"{cur.path.name} has a corrupt header: the value of {key} is arrays nested "
                f"more than {_MAX_NESTING} deep"
            )
        item_type = cur.u32(f"the array type of {key}")
        count = cur.u64(f"the array length of {key}")
        if count > _MAX_COUNT * 100:
            raise InvalidModelFile(f"{cur.path.name} declares an impossible array length for {key}")
        # Every element takes at least one byte (strings: eight for the length; arrays:
        # twelve for their type and length).
        if item_type == T.STRING:
            min_item = 8
        elif item_type == T.ARRAY:
            min_item = 12
        else:
            min_item = struct.calcsize("<" + formats.get(item_type, "B"))
        if cur.pos + count * min_item > cur.size:
            raise cur._truncated(f"the array {key}")
        if count <= _SMALL_ARRAY:
            return [_read_value(cur, item_type, key, formats, depth + 1) for _ in range(count)]
        if item_type == T.STRING:
            cur.skip_strings(count, f"the array {key}")
        elif item_type in formats:
            cur.skip(struct.calcsize("<" + formats[item_type]) * count, f"the array {key}")
        else:
            for _ in range(count):  # arrays of arrays: rare, walk them
                _read_value(cur, item_type, key, formats, depth + 1)
        return _ArrayLength(count)
    raise InvalidModelFile(f"{cur.path.name} has an unknown value type {vtype} for key {key}")


class _ArrayLength(int):
    """Stands in for a long array: only its length is kept."""


def _quant_name(file_type: Any, tensors: list[TensorInfo]) -> str:
    from gguf import LlamaFileType

    if isinstance(file_type, int):
        try:
            name = LlamaFileType(file_type).name
        except ValueError:
            name = ""
        if name and name != "GUESSED":
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    # No (known) file type: name it after the type holding most of the bytes.
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.n_bytes
    return max(by_type, key=lambda k: by_type[k]) if by_type else "unknown"


def read_gguf_info(path: Path) -> GGUFInfo:
    """Validate ``path`` as a GGUF file and return its metadata.

    Checks the magic, the version, that the header parses to its end, that it names an
    architecture, and that every tensor's data lies inside the file. Weights are not read.

    Raises:
        NotFound: there is no such file.
        InvalidModelFile: the file is not GGUF, is truncated or is inconsistent.
    """
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType

    path = Path(path).expanduser()
    if not path.exists():
        raise NotFound(f"no such file: {path}")
    if not path.is_file():
        raise InvalidModelFile(f"{path} is not a file")
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc.strerror or exc}") from exc
    with fh:
        size = path.stat().st_size
        if size < 24:
            raise InvalidModelFile(f"{path.name} is not a GGUF model ({size} bytes is too small)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, path)
            (magic,) = cur.unpack("I", "the magic number")
            if magic != GGUF_MAGIC:
                raise InvalidModelFile(
                    f"{path.name} is not a GGUF model (it does not start with 'GGUF')",
                    hint="Bastion runs llama.cpp GGUF files; convert other formats first",
                )
            version = cur.u32("the version")
            if version not in (2, 3):
                raise InvalidModelFile(
                    f"{path.name} is GGUF version {version}; versions 2 and 3 are supported"
                )
            tensor_count = cur.u64("the tensor count")
            kv_count = cur.u64("the key count")
            if tensor_count > _MAX_COUNT or kv_count > _MAX_COUNT:
                raise InvalidModelFile(f"{path.name} has a corrupt header (impossible counts)")
            formats = _scalar_formats()
            metadata: dict[str, Any] = {}
            for _ in range(kv_count):
                key = cur.string("a metadata key")
                vtype = cur.u32(f"the type of {key}")
                metadata[key] = _read_value(cur, vtype, key, formats)

            raw_tensors = []
            for _ in range(tensor_count):
                name = cur.string("a tensor name")
                n_dims = cur.u32(f"the shape of tensor {name}")
                if n_dims > 8:
                    raise InvalidModelFile(f"{path.name}: tensor {name} has {n_dims} dimensions")
                dims = cur.unpack("Q" * n_dims, f"the shape of tensor {name}") if n_dims else ()
                ttype = cur.u32(f"the type of tensor {name}")
                rel_offset = cur.u64(f"the offset of tensor {name}")
                raw_tensors.append((name, tuple(int(d) for d in dims), ttype, rel_offset))
            alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
            if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
                raise InvalidModelFile(f"{path.name} has an invalid alignment {alignment!r}")
            data_start = -(-cur.pos // alignment) * alignment

    tensors = []
    for name, dims, ttype, rel_offset in raw_tensors:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError) as exc:
            raise InvalidModelFile(
                f"{path.name}: tensor {name} has unknown type {ttype}",
                hint="the file may need a newer llama.cpp than this Bastion has",
            ) from exc
        n_elements = 1
        for d in dims:
            n_elements *= d
        n_bytes = n_elements * type_size // block
        start = data_start + rel_offset
        if start + n_bytes > size:
            raise InvalidModelFile(
                f"{path.name} is truncated: tensor {name} needs bytes up to {start + n_bytes:,} "
                f"but the file has {size:,}",
                hint="the download or copy did not finish; get the file again",
            )
        tensors.append(TensorInfo(name, dims, qtype.name, n_elements, n_bytes, start))

    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InvalidModelFile(f"{path.name} names no architecture (general.architecture)")
    template = metadata.get("tokenizer.chat_template")
    tokens = metadata.get("tokenizer.ggml.tokens")

    def arch_int(key: str) -> int | None:
        value = metadata.get(f"{arch}.{key}")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    vocab = arch_int("vocab_size")
    if vocab is None and isinstance(tokens, int):
        vocab = int(tokens)
    return GGUFInfo(
        path=path.resolve(),
        size_bytes=size,
        version=version,
        architecture=arch,
        file_kind=str(metadata.get("general.type", "model")),
        name=metadata.get("general.name")
        if isinstance(metadata.get("general.name"), str)
        else None,
        params=sum(t.n_elements for t in tensors),
        quant=_quant_name(metadata.get("general.file_type"), tensors),
        context_length=arch_int("context_length"),
        chat_template=template if isinstance(template, str) and template.strip() else None,
        block_count=arch_int("block_count"),
        embedding_length=arch_int("embedding_length"),
        head_count=arch_int("attention.head_count"),
        head_count_kv=arch_int("attention.head_count_kv"),
        vocab_size=vocab,
        tensor_count=len(tensors),
        metadata={
            k: (f"<array of {int(v)}>" if isinstance(v, _ArrayLength) else v)
            for k, v in metadata.items()
        },
        tensors=tuple(tensors),
    )
