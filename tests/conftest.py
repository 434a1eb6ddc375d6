"""Shared fixtures: a temporary BASTION_HOME, the real engine, the installed CLI, GGUF files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.paths import builtin_models_dirs
from tests.fake_hub import REPO, FakeHub, Repo

DEFAULT_MODEL = "smollm2-135m-instruct"
BIN = Path(sys.executable).parent


def default_model_path() -> Path:
    for d in builtin_models_dirs():
        candidate = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return candidate
    pytest.fail("the default model is not installed: run python3 installer/bootstrap.py setup")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("BASTION_HOME", str(path))
    return path


@pytest.fixture
def engine(home: Path) -> Iterator[object]:
    from engine import Engine

    eng = Engine(home)
    yield eng
    eng.close()


@dataclass
class CLIResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> object:
        return json.loads(self.stdout)


@pytest.fixture
def cli(home: Path) -> Callable[..., CLIResult]:
    """Run the installed ``bastion`` command in a subprocess against ``home``."""

    def run(
        *args: str,
        input: str | None = None,
        timeout: float = 240,
        env: dict[str, str] | None = None,
    ) -> CLIResult:
        full_env = {**os.environ, "BASTION_HOME": str(home), **(env or {})}
        proc = subprocess.run(
            [str(BIN / "bastion"), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
        return CLIResult(proc.returncode, proc.stdout, proc.stderr)

    return run


def assert_one_line_error(result: CLIResult, code: int, *needles: str) -> None:
    """The contract for user errors: the exit code, one line on stderr, no traceback."""
    assert result.code == code, (result.code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bastion: error: "), lines
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


def write_gguf(
    path: Path,
    arch: str = "llama",
    *,
    general_type: str | None = None,
    context_length: int = 2048,
    n_tensors: int = 2,
    big_tensor: int = 0,
) -> Path:
    """A small but valid GGUF file (header-valid; too small to be a useful model), with one
    more tensor of ``big_tensor`` floats when asked (a file of a chosen size)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if general_type is not None:
        writer.add_type(general_type)
    writer.add_name("tiny test model")
    writer.add_context_length(context_length)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for i in range(n_tensors):
        writer.add_tensor(f"blk.0.t{i}.weight", np.full((16, 8), i, dtype=np.float32))
    if big_tensor:
        writer.add_tensor("blk.0.big.weight", np.arange(big_tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "Tiny-Test.F32.gguf")


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A private copy of the default model (to import or damage)."""
    target = tmp_path / "copy" / "SmolLM2-Copy.Q4_1.gguf"
    target.parent.mkdir()
    shutil.copyfile(default_model_path(), target)
    return target


# -- a Hugging Face Hub stand-in on loopback (tests/fake_hub.py) ---------------------


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    (tmp_path / "src").mkdir()
    small = write_gguf(tmp_path / "src" / "tiny.gguf")
    # About 12 MB: more than one 10 MB read of huggingface-hub's client.
    big = write_gguf(tmp_path / "src" / "big.gguf", n_tensors=0, big_tensor=3_000_000)
    server_hub = FakeHub()
    server_hub.add(
        Repo(
            REPO,
            {
                "tiny-test.F32.gguf": small.read_bytes(),
                "tiny-test.Q4_K_M.gguf": big.read_bytes(),
            },
        )
    )
    server = server_hub.start()
    cache = tmp_path / "hf-cache"
    # In this process (the engine fixture) and in the CLI's (environment).
    monkeypatch.setattr(constants, "ENDPOINT", server_hub.url)
    template = server_hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", server_hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    yield server_hub
    server.shutdown()
