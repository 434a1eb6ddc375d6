"""The lock (installer/lock/*.txt): complete, hashed, fresh, and what set-up installed."""

from __future__ import annotations

import http.server
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "installer" / "lock"
# Installed by set-up itself, per machine (installer/lockfile.py says why).
NOT_LOCKED = {"torch", "llama-cpp-python"}


def _pins(lock: Path) -> dict[str, list[tuple[str, Marker | None, int]]]:
    """``{name: [(version, marker, number of hashes)]}`` of a lock file."""
    pins: dict[str, list[tuple[str, Marker | None, int]]] = {}
    for block in re.split(r"\n(?=\S)", lock.read_text()):
        head = block.splitlines()[0].rstrip(" \\")
        if head.startswith("#") or not head.strip():
            continue
        requirement, _, marker = head.partition(" ; ")
        name, _, version = requirement.partition("==")
        hashes = block.count("--hash=sha256:")
        pins.setdefault(canonicalize_name(name), []).append(
            (version, Marker(marker) if marker else None, hashes)
        )
    return pins


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_dependency_is_locked_with_hashes() -> None:
    project = _project()
    wanted = {
        "base": project["dependencies"],
        "dev": project["dependencies"] + project["optional-dependencies"]["dev"],
        "gpu": project["dependencies"] + project["optional-dependencies"]["gpu"],
    }
    for name, requirements in wanted.items():
        pins = _pins(LOCKS / f"{name}.txt")
        for text in requirements:
            requirement = canonicalize_name(Requirement(text).name)
            if requirement not in NOT_LOCKED:
                assert requirement in pins, (name, requirement)
        assert not NOT_LOCKED & set(pins), name
        assert not [p for p in pins if p.startswith(("nvidia-", "cuda-"))], name
        for package, versions in pins.items():
            for version, _marker, hashes in versions:
                assert version and hashes >= 1, (name, package)
    # The lock holds what PyTorch itself needs on every machine.
    assert {"sympy", "networkx", "filelock", "fsspec"} <= set(_pins(LOCKS / "base.txt"))


def test_this_environment_is_the_lock() -> None:
    """Set-up installed exactly the lock's versions (dev: this suite runs in a dev set-up)."""
    differs = []
    for name, versions in _pins(LOCKS / "dev.txt").items():
        for version, marker, _hashes in versions:
            if marker is not None and not marker.evaluate():
                continue
            installed = importlib.metadata.version(name)
            if installed != version:
                differs.append(f"{name} {installed} (lock: {version})")
    assert not differs, differs


def test_torch_is_the_version_pinned_in_one_place() -> None:
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["bastion"]["torch"]
    assert importlib.metadata.version("torch").split("+")[0] == pinned


def test_a_lock_older_than_the_dependencies_is_refused(tmp_path: Path) -> None:
    """Set-up stops in one line when pyproject's dependencies changed since the lock."""
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "installer", root / "installer",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (root / "resources").mkdir()
    shutil.copy(ROOT / "resources" / "catalogue.toml", root / "resources")
    text = (ROOT / "pyproject.toml").read_text()
    (root / "pyproject.toml").write_text(text.replace('"click>=8.1",', '"click>=8.2",'))
    env = {key: value for key, value in os.environ.items() if key != "BASTION_VENV"}
    env["BASTION_VENV"] = str(tmp_path / "venv")
    base_python = getattr(sys, "_base_executable", sys.executable)
    result = subprocess.run(
        [base_python, str(root / "installer" / "bootstrap.py"), "setup"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "resolved before pyproject.toml's dependencies changed" in last, result.stderr
    assert "bootstrap.py lock" in last


def test_pypi_torch_and_the_llama_source_are_locked_with_hashes() -> None:
    """torch.txt: PyPI's PyTorch and what its build brings; llama-cpp-python.txt: the sdist."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pins = _pins(LOCKS / "torch.txt")
    assert [v for v, _m, _h in torch_pins["torch"]] == [project["tool"]["bastion"]["torch"]]
    assert {"triton", "nvidia-cublas", "nvidia-cuda-runtime"} <= set(torch_pins)
    for package, versions in torch_pins.items():
        assert package == "torch" or package.startswith(("nvidia-", "cuda-", "triton")), package
        for version, marker, hashes in versions:
            assert version and hashes >= 1, package
            if package != "torch":  # the CUDA libraries only where PyPI's build is CUDA
                assert marker is not None and "linux" in str(marker), package
    assert not set(torch_pins) & set(_pins(LOCKS / "base.txt"))  # one place for each
    (llama,) = _pins(LOCKS / "llama-cpp-python.txt")["llama-cpp-python"]
    pin = next(d for d in project["project"]["dependencies"] if d.startswith("llama-cpp-python"))
    assert llama[0] == pin.split("==")[1] and llama[2] == 1  # one file: the source archive


def test_a_stale_torch_or_llama_lock_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    lockfile = _lockfile()
    assert lockfile.torch_lock_reason() is None and lockfile.llama_lock_reason() is None
    assert lockfile.torch_cpu_lock_reason() is None
    monkeypatch.setattr(lockfile, "torch_version", lambda: "9.9.9")
    reason, cpu_reason = lockfile.torch_lock_reason(), lockfile.torch_cpu_lock_reason()
    assert reason is not None and "does not pin torch==9.9.9 " in reason
    assert cpu_reason is not None and "torch-cpu.txt does not pin torch==9.9.9+cpu" in cpu_reason
    monkeypatch.setattr(lockfile, "llama_pin", lambda: "0.0.1")
    reason = lockfile.llama_lock_reason()
    assert reason is not None and "does not pin llama-cpp-python==0.0.1" in reason


def _lockfile():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "installer"))
    try:
        import lockfile
    finally:
        sys.path.pop(0)
    return lockfile


def test_cpu_torch_is_locked_with_hashes() -> None:
    """torch-cpu.txt: the CPU build at the one pinned version, a hash per file of it."""
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["bastion"]["torch"]
    pins = _pins(LOCKS / "torch-cpu.txt")
    assert list(pins) == ["torch"]
    [(version, marker, hashes)] = pins["torch"]
    assert version == f"{pinned}+cpu" and marker is None and hashes >= 8


def _fake_wheel(folder: Path, version: str) -> Path:
    """A wheel named like this machine's CPU build of torch, with other bytes."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheel = folder / f"torch-{version}+cpu-{tag}-{tag}-manylinux_2_28_{os.uname().machine}.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("torch/__init__.py", "substituted = True\n")
    return wheel


def test_a_cpu_torch_that_is_not_the_locked_file_is_refused(tmp_path: Path) -> None:
    """Set-up's own command for the CPU build (pip, --require-hashes, torch-cpu.txt)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU build's file names here are Linux ones")
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["bastion"]["torch"]
    links = tmp_path / "links"
    links.mkdir()
    _fake_wheel(links, pinned)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--isolated", "--no-index", "--find-links",
         str(links), "--dest", str(tmp_path / "out"), "--no-deps", "--require-hashes", "-r",
         str(LOCKS / "torch-cpu.txt")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "DO NOT MATCH THE HASHES" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_lock_refresh_takes_the_cpu_hashes_from_the_index(tmp_path: Path) -> None:
    """`bootstrap.py lock` reads PyTorch's CPU index page (PEP 503) for torch-cpu.txt."""
    lockfile = _lockfile()
    digests = {name: f"{i:064x}" for i, name in enumerate([
        "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "torch-2.13.0+cpu-cp311-cp311-win_amd64.whl",
        "torch-2.13.0+cpu-cp312-cp312-manylinux_2_28_aarch64.whl",
        "torch-2.13.0-cp311-cp311-macosx_14_0_arm64.whl",  # not the CPU build's name
        "torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",  # another version
    ], start=1)}  # fmt: skip
    links = "".join(
        f'<a href="/whl/cpu/{name.replace("+", "%2B")}#sha256={digest}">{name}</a><br/>\n'
        for name, digest in digests.items()
    )
    page = f"<!DOCTYPE html>\n<html><body>\n<h1>Links for torch</h1>\n{links}</body></html>\n"
    (tmp_path / "whl" / "cpu" / "torch").mkdir(parents=True)
    (tmp_path / "whl" / "cpu" / "torch" / "index.html").write_text(page)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fetched = lockfile.fetch_cpu_torch_page(f"http://127.0.0.1:{server.server_port}/whl/cpu")
    finally:
        server.shutdown()
        server.server_close()
    assert fetched == page
    block = lockfile.cpu_torch_block("2.13.0", fetched)
    assert block.splitlines()[0] == "torch==2.13.0+cpu \\"
    wanted = [digests[name] for name in sorted(digests) if name.startswith("torch-2.13.0+cpu-")]
    assert re.findall(r"--hash=sha256:([0-9a-f]{64})", block) == wanted
    with pytest.raises(SystemExit, match=re.escape("no torch 2.14.0+cpu wheel")):
        lockfile.cpu_torch_block("2.14.0", fetched)
    with pytest.raises(SystemExit, match=re.escape("could not read http://127.0.0.1:9/")):
        lockfile.fetch_cpu_torch_page("http://127.0.0.1:9")
