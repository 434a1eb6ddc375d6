"""Bastion's lock: every dependency resolved once, pinned, with the hashes of its files.

    python3 installer/bootstrap.py lock      # refresh installer/lock/*.txt (needs PyPI)

The lock files are pip requirement files written by uv (``uv pip compile --universal
--generate-hashes``): one resolution for every platform and Python from 3.11 on, with
environment markers where a platform needs other packages or versions. There is one file
per set of extras set-up can install (``base``, ``dev``, ``gpu``, ``dev-gpu``). Set-up
installs the matching file with ``pip install --no-deps --require-hashes``, so two
machines set up a month apart get the same files, and a file that differs from the one
resolved is refused.

Three things are kept out of the lock and installed by set-up itself, pinned exactly:

* PyTorch (its version lives in ``[tool.bastion] torch`` in pyproject.toml): the build
  differs by machine -- the CPU build (``+cpu``) where there is no NVIDIA GPU, locked in
  ``torch-cpu.txt`` with the SHA-256 of each of its files as PyTorch's own CPU index
  lists them (that index has other files and hashes than PyPI, so uv's resolution can't
  give them); PyPI's CUDA build with its ``nvidia-*``/``cuda-*`` libraries and Triton
  where there is one (and on macOS), locked with its hashes in ``torch.txt``, cut from
  the same resolution. The lock still holds PyTorch's other dependencies (sympy,
  networkx, filelock, fsspec, ...).
* llama-cpp-python, built from source for this machine's backend (its version is the
  ``==`` pin in pyproject.toml). Its source archive is locked on its own, with its hash,
  in ``llama-cpp-python.txt``: set-up builds from that file with ``--require-hashes``, so
  a tampered or substituted archive is refused before anything is compiled.
* Bastion itself (an editable install of this checkout).

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tempfile
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = ROOT / "installer" / "lock"
BUILD_TOOLS = LOCK_DIR / "build-tools.in"
LLAMA_LOCK = LOCK_DIR / "llama-cpp-python.txt"
# PyPI's PyTorch with what it brings on each platform (CUDA libraries, Triton), hashed:
# set-up installs it from here where it takes PyPI's build (an NVIDIA GPU, macOS).
TORCH_LOCK = LOCK_DIR / "torch.txt"
# PyTorch's CPU build (``torch==VERSION+cpu``), hashed: set-up installs it where there is
# no NVIDIA GPU. Its files are on PyTorch's own index only.
TORCH_CPU_LOCK = LOCK_DIR / "torch-cpu.txt"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The resolver that writes the lock (not needed to install from it).
UV_VERSION = "0.13.9"
# The oldest Python the project takes; uv's universal resolution covers it and newer.
LOWEST_PYTHON = "3.11"
EXTRAS_SETS = ("", "dev", "gpu", "dev,gpu")
# Installed by set-up itself, per machine (see the module docstring).
_NOT_LOCKED = re.compile(
    r"^(torch|triton|triton-windows|llama-cpp-python|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)=="
)


def torch_version() -> str:
    """PyTorch's version: ``[tool.bastion] torch`` in pyproject.toml, the one place it lives."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return str(data["tool"]["bastion"]["torch"])


def inputs_digest() -> str:
    """What the lock was resolved from: pyproject's dependencies, extras and torch pin."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    inputs = {
        "dependencies": data["project"]["dependencies"],
        "extras": data["project"].get("optional-dependencies", {}),
        "torch": torch_version(),
        "python": LOWEST_PYTHON,
        "build_tools": BUILD_TOOLS.read_text(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def stale_reason(extras: str) -> str | None:
    """Why the lock of ``extras`` can't be installed as it is, or None when it can."""
    path = lock_path(extras)
    if not path.is_file():
        return f"{path.relative_to(ROOT)} is missing"
    if f"# inputs: {inputs_digest()}\n" not in path.read_text():
        return f"{path.relative_to(ROOT)} was resolved before pyproject.toml's dependencies changed"
    return None


def lock_path(extras: str) -> Path:
    """The lock file for a set of extras ("", "dev", "gpu" or "dev,gpu")."""
    names = sorted(name for name in extras.split(",") if name)
    return LOCK_DIR / (("-".join(names) or "base") + ".txt")


def _header(extras: str) -> str:
    return (
        f"# Bastion's lock for the extras {extras or '(none)'}: every dependency, pinned, with\n"
        "# the hashes of its files, for every platform (see the markers).\n"
        "# Written by `python3 installer/bootstrap.py lock`; do not edit by hand.\n"
        "# Not here, installed by set-up per machine: torch (pyproject.toml [tool.bastion]),\n"
        "# its CUDA libraries, llama-cpp-python (built from source) and Bastion itself.\n"
        f"# inputs: {inputs_digest()}\n"
    )


def _blocks(text: str) -> list[str]:
    """uv's output, one block per package (its pin, markers and hashes)."""
    return re.split(r"\n(?=\S)", text.strip("\n"))


def _bare(block: str) -> str:
    """A block without uv's ``# via`` comment lines."""
    lines = [line for line in block.splitlines() if not line.strip().startswith("#")]
    return "\n".join(lines).rstrip(" \\")


def strip_unlocked(text: str) -> str:
    """``text`` (uv's output) without the packages set-up installs itself."""
    kept = [block for block in _blocks(text) if not _NOT_LOCKED.match(block)]
    return "\n".join(kept) + "\n"


def llama_pin() -> str:
    """llama-cpp-python's version: its ``==`` pin in pyproject.toml's dependencies."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for dep in data["project"]["dependencies"]:
        if dep.replace("_", "-").startswith("llama-cpp-python=="):
            return str(dep).split("==", 1)[1].strip()
    raise SystemExit("pyproject.toml must pin llama-cpp-python with ==")


def _pin_reason(path: Path, pin: str, changed: str) -> str | None:
    """Why the lock file ``path`` can't be installed from as it is (it is missing, or does
    not pin ``pin`` with hashes because ``changed``), or None when it can."""
    if not path.is_file():
        return f"{path.relative_to(ROOT)} is missing"
    text = path.read_text()
    if not re.search(f"^{re.escape(pin)} ", text, re.MULTILINE) or "--hash=sha256:" not in text:
        return f"{path.relative_to(ROOT)} does not pin {pin} with its hashes ({changed})"
    return None


def llama_lock_reason() -> str | None:
    """Why llama-cpp-python.txt can't be built from as it is, or None when it can."""
    pin = f"llama-cpp-python=={llama_pin()}"
    return _pin_reason(LLAMA_LOCK, pin, "pyproject.toml's pin changed")


_TORCH_CHANGED = "pyproject.toml's [tool.bastion] torch changed"


def torch_lock_reason() -> str | None:
    """Why torch.txt can't be installed from as it is, or None when it can."""
    return _pin_reason(TORCH_LOCK, f"torch=={torch_version()}", _TORCH_CHANGED)


def torch_cpu_lock_reason() -> str | None:
    """Why torch-cpu.txt can't be installed from as it is, or None when it can."""
    return _pin_reason(TORCH_CPU_LOCK, f"torch=={torch_version()}+cpu", _TORCH_CHANGED)


# An index page's link to a wheel, with the digest PEP 503 lets the index append.
_WHEEL_LINK = re.compile(r'href="[^"#]*?([^/"#]+\.whl)#sha256=([0-9a-f]{64})"')


def cpu_torch_block(version: str, page: str) -> str:
    """``torch==VERSION+cpu`` with one ``--hash`` per ``+cpu`` wheel that ``page`` links.

    ``page`` is the PEP 503 page of the project ``torch`` on PyTorch's CPU index (``<a
    href=".../torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl#sha256=...">``).
    """
    prefix = f"torch-{version}+cpu-"
    digests = {}
    for quoted, digest in _WHEEL_LINK.findall(page):
        name = urllib.parse.unquote(quoted)
        if name.startswith(prefix):
            digests[name] = digest
    if not digests:
        raise SystemExit(f"PyTorch's CPU index lists no torch {version}+cpu wheel with a hash")
    lines = [f"torch=={version}+cpu"]
    lines += [f"    --hash=sha256:{digests[name]}" for name in sorted(digests)]
    return " \\\n".join(lines) + "\n"


def fetch_cpu_torch_page(index: str = TORCH_CPU_INDEX) -> str:
    """The PEP 503 page of ``torch`` on PyTorch's CPU index (the lock refresh only)."""
    url = index.rstrip("/") + "/torch/"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return str(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError) as exc:
        raise SystemExit(f"could not read {url}: {exc}") from None


def _replace(path: Path, text: str) -> Path:
    """Write ``path`` whole or not at all (a lock file is never left half written)."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)
    return path


def write_cpu_torch_lock(page: str) -> Path:
    """Write torch-cpu.txt from PyTorch's CPU index page of ``torch``."""
    return _replace(
        TORCH_CPU_LOCK,
        "# PyTorch's CPU build, which set-up installs where there is no NVIDIA GPU\n"
        "# (`pip install --no-deps --require-hashes -r` this file): one hash per file of\n"
        f"# it, as PyTorch's CPU index lists them ({TORCH_CPU_INDEX}/torch/).\n"
        "# Written by `python3 installer/bootstrap.py lock`; do not edit by hand.\n"
        + cpu_torch_block(torch_version(), page),
    )


def torch_blocks(text: str) -> str:
    """PyTorch and the packages that come with PyPI's build, from uv's output, hashed."""
    kept = [
        _bare(block)
        for block in _blocks(text)
        if _NOT_LOCKED.match(block) and not block.startswith("llama-cpp-python==")
    ]
    if not any(block.startswith(f"torch=={torch_version()} ") for block in kept):
        raise SystemExit(f"uv's resolution holds no torch=={torch_version()}")
    return "\n".join(kept) + "\n"


def llama_block(text: str) -> str:
    """The ``llama-cpp-python==... --hash=...`` block of uv's output (its source archive)."""
    for block in _blocks(text):
        if block.startswith("llama-cpp-python=="):
            return _bare(block) + "\n"
    raise SystemExit("uv's resolution holds no llama-cpp-python")


def locked_names(path: Path) -> set[str]:
    """The project names pinned in a lock file (normalized)."""
    names = set()
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if match:
            names.add(re.sub(r"[-_.]+", "-", match[1]).lower())
    return names


def refresh(uv: Path, log: Callable[[str], None]) -> list[Path]:
    """Resolve every extras set again with ``uv`` and rewrite the lock files."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    log(f"reading the hashes of PyTorch's CPU build from {TORCH_CPU_INDEX}")
    written = [write_cpu_torch_lock(fetch_cpu_torch_page())]
    with tempfile.TemporaryDirectory(prefix="bastion-lock-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(f"torch=={torch_version()}\n")
        for extras in EXTRAS_SETS:
            raw = Path(tmp) / "raw.txt"
            cmd = [
                str(uv), "pip", "compile", "pyproject.toml", str(BUILD_TOOLS.relative_to(ROOT)),
                "--universal", "--python-version", LOWEST_PYTHON, "--generate-hashes",
                "--no-header", "--quiet", "--constraint", str(constraints), "-o", str(raw),
            ]  # fmt: skip
            for name in filter(None, extras.split(",")):
                cmd += ["--extra", name]
            log(f"resolving the extras {extras or '(none)'}")
            result = subprocess.run(cmd, cwd=ROOT, check=False)
            if result.returncode != 0:
                raise SystemExit(f"uv could not resolve the extras {extras!r}; see above")
            text = raw.read_text()
            written.append(_replace(lock_path(extras), _header(extras) + strip_unlocked(text)))
            if not extras:
                llama = (
                    "# llama-cpp-python's source archive, which set-up builds for each machine,\n"
                    "# with its hash (`pip wheel --require-hashes -r` this file).\n"
                    "# Written by `python3 installer/bootstrap.py lock`; do not edit by hand.\n"
                    + llama_block(text)
                )
                torch = (
                    "# PyTorch as PyPI builds it (CUDA on Linux x86-64, Metal on macOS) with the\n"
                    "# packages that build brings, hashed; set-up installs it where it takes\n"
                    "# PyPI's build (`pip install --no-deps --require-hashes -r` this file).\n"
                    "# The CPU build (torch==VERSION+cpu) is in torch-cpu.txt.\n"
                    "# Written by `python3 installer/bootstrap.py lock`; do not edit by hand.\n"
                    + torch_blocks(text)
                )
                written += [_replace(LLAMA_LOCK, llama), _replace(TORCH_LOCK, torch)]
    return written
