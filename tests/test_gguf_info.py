"""Reading GGUF headers: agreement with the reference reader, and every way a file is bad."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from engine.errors import InvalidModelFile, NotFound
from engine.models.gguf_info import read_gguf_info
from tests.conftest import default_model_path, write_gguf


def test_default_model_matches_reference_reader() -> None:
    import gguf

    path = default_model_path()
    info = read_gguf_info(path)
    ref = gguf.GGUFReader(str(path))
    assert info.architecture == ref.fields["general.architecture"].contents() == "llama"
    assert info.tensor_count == len(ref.tensors)
    assert info.params == sum(int(t.n_elements) for t in ref.tensors)
    assert info.context_length == ref.fields["llama.context_length"].contents() == 8192
    assert info.chat_template == ref.fields["tokenizer.chat_template"].contents()
    assert info.quant == "Q4_1"
    assert info.vocab_size == 49152
    assert info.block_count == 30
    for ours, theirs in zip(info.tensors, ref.tensors, strict=True):
        assert ours.name == theirs.name
        assert ours.offset == theirs.data_offset
        assert ours.n_bytes == theirs.n_bytes


def test_crafted_small_file_is_valid(tiny_gguf: Path) -> None:
    info = read_gguf_info(tiny_gguf)
    assert info.architecture == "llama"
    assert info.params == 2 * 16 * 8
    assert info.quant == "F32"
    assert info.context_length == 2048
    assert info.chat_template is not None


def test_missing_file() -> None:
    with pytest.raises(NotFound):
        read_gguf_info(Path("/nonexistent/model.gguf"))


def test_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("these are not the weights you are looking for\n" * 10)
    with pytest.raises(InvalidModelFile, match="does not start with 'GGUF'"):
        read_gguf_info(path)


def test_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(InvalidModelFile, match="too small"):
        read_gguf_info(path)


def test_truncated_in_tensor_data(model_copy: Path) -> None:
    with model_copy.open("r+b") as fh:
        fh.truncate(model_copy.stat().st_size // 2)
    with pytest.raises(InvalidModelFile, match="truncated: tensor"):
        read_gguf_info(model_copy)


def test_truncated_in_header(model_copy: Path) -> None:
    with model_copy.open("r+b") as fh:
        fh.truncate(5000)  # inside the chat template / vocabulary
    with pytest.raises(InvalidModelFile, match="truncated"):
        read_gguf_info(model_copy)


def test_unsupported_version(tiny_gguf: Path) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    tiny_gguf.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFile, match="version 99"):
        read_gguf_info(tiny_gguf)


def test_impossible_counts(tiny_gguf: Path) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    data[16:24] = struct.pack("<Q", 2**62)  # key count
    tiny_gguf.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFile, match="impossible counts"):
        read_gguf_info(tiny_gguf)


def test_unknown_tensor_type(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t.gguf", n_tensors=1)
    data = bytearray(path.read_bytes())
    name = b"blk.0.t0.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # after n_dims and two dims
    data[at : at + 4] = struct.pack("<I", 9999)
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFile, match="unknown type 9999"):
        read_gguf_info(path)


def test_no_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t.gguf")
    data = path.read_bytes().replace(b"general.architecture", b"general.architecturX")
    path.write_bytes(data)
    with pytest.raises(InvalidModelFile, match="names no architecture"):
        read_gguf_info(path)
