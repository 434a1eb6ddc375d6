"""installer/bootstrap.py: hardware detection for the llama.cpp build, and a fast second run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bootstrap() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bootstrap", ROOT / "installer" / "bootstrap.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("platform", "machine", "nvcc", "driver", "expected"),
    [
        ("linux", "x86_64", "/usr/local/cuda/bin/nvcc", True, "cuda"),
        ("linux", "x86_64", "/usr/local/cuda/bin/nvcc", False, "cpu"),  # toolkit, no GPU
        ("linux", "x86_64", None, True, "cpu"),  # driver but no toolkit to build with
        ("linux", "x86_64", None, False, "cpu"),
        ("darwin", "arm64", None, False, "metal"),
        ("darwin", "x86_64", None, False, "cpu"),
    ],
)
def test_backend_follows_the_hardware(
    bootstrap: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    platform: str,
    machine: str,
    nvcc: str | None,
    driver: bool,
    expected: str,
) -> None:
    monkeypatch.delenv("BASTION_LLAMA_BACKEND", raising=False)
    monkeypatch.setattr(bootstrap.sys, "platform", platform)
    monkeypatch.setattr(bootstrap.platform, "machine", lambda: machine)
    monkeypatch.setattr(bootstrap, "find_nvcc", lambda: nvcc)
    monkeypatch.setattr(bootstrap, "nvidia_driver_present", lambda: driver)
    assert bootstrap.llama_backend() == expected


def test_backend_override(bootstrap: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_LLAMA_BACKEND", "CUDA")
    assert bootstrap.llama_backend() == "cuda"
    monkeypatch.setenv("BASTION_LLAMA_BACKEND", "vulkan")
    with pytest.raises(SystemExit):
        bootstrap.llama_backend()


def test_wheelhouse_is_keyed_by_backend(bootstrap: ModuleType) -> None:
    # A CPU wheel must never be served for a CUDA request: the key holds the backend.
    assert bootstrap.cpu_key() == bootstrap.cpu_key()
    assert len(bootstrap.cpu_key()) == 10


def test_second_setup_installs_nothing() -> None:
    cmd = [sys.executable, str(ROOT / "installer" / "bootstrap.py"), "setup", "--dev"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "$ " not in proc.stderr, f"a second set-up ran commands:\n{proc.stderr}"


def test_default_model_file_matches_the_catalogue(bootstrap: ModuleType) -> None:
    import tomllib

    from tests.conftest import default_model_path

    entry = tomllib.loads((ROOT / "resources" / "catalogue.toml").read_text())["model"][0]
    path = default_model_path()
    assert path.stat().st_size == entry["size_bytes"]
    assert bootstrap.sha256_of(path) == entry["sha256"]


def test_llama_source_archive_is_hash_checked(
    bootstrap: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A llama-cpp-python source archive that is not the locked one is refused unbuilt."""
    lock = (ROOT / "installer" / "lock" / "llama-cpp-python.txt").read_text()
    version = bootstrap.llama_requirement().split("==", 1)[1]
    assert f"llama-cpp-python=={version} \\\n    --hash=sha256:" in lock
    links = tmp_path / "links"
    links.mkdir()
    # Same name and version as the real archive, other bytes (no network: pip's only source).
    (links / f"llama_cpp_python-{version}.tar.gz").write_bytes(b"not the archive on PyPI" * 100)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("BASTION_WHEEL_CACHE", str(tmp_path / "wheels"))
    with pytest.raises(SystemExit):
        bootstrap.llama_wheel("cpu", "portable")
    err = capfd.readouterr().err
    assert "DO NOT MATCH THE HASHES" in err
    assert "error: building llama-cpp-python" in err and "is refused" in err
    assert not list((tmp_path / "wheels").rglob("*.whl"))  # nothing was built or kept
