"""The engine's side of ``bastion bundle create``: which files the chosen models need.

The bundle itself (wheels from the lock, PyTorch, the self-tested llama.cpp wheel, the
source, the manifest) is written by the installer (``installer/bundle.py``, run through
``installer/bootstrap.py bundle``): it owns the lock, the builds and pip, and it is what
installs the bundle on the other machine, so making and installing stay in one place.
This module resolves model ids to their files (a fine-tune brings its base) and runs it.

``bundle create`` is, besides ``models search/pull``, the one command that connects out:
pip, in a child process, downloads the locked wheels from the package index pip is set to
use. Nothing else of Bastion does, and the models come from this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput, OperationFailed
from engine.models.registry import ModelRegistry

BACKENDS = ("cpu", "cuda", "metal")
# Runs the installer (a script, not a module) in a child: ``python -c _RUN_INSTALLER
# SCRIPT ARGS...``. It is the one Python child of Bastion without the privacy guard, by
# design: it downloads what the user asked for (tests/test_hardening_privacy.py lists it).
_RUN_INSTALLER = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
LLAMA_BUILDS = ("portable", "native")


def bootstrap_script() -> Path:
    """The installer of this checkout; bundles are made from a source checkout only."""
    script = Path(__file__).resolve().parents[1] / "installer" / "bootstrap.py"
    if not script.is_file():
        raise OperationFailed(
            "bundle create needs Bastion's source checkout (installer/bootstrap.py)",
            hint="run it from the checkout that `installer/bootstrap.py setup` installed",
        )
    return script


def model_files(registry: ModelRegistry, ids: list[str]) -> list[dict[str, Any]]:
    """``[{"id", "path", "base", "adapter"}]`` for ``ids``, each fine-tune's base before it."""
    listed: dict[str, dict[str, Any]] = {}
    for model_id in ids:
        entry = registry.get(model_id)
        chain = [registry.get(entry.base), entry] if entry.base else [entry]
        for item in chain:
            if item.id not in listed:
                listed[item.id] = {
                    "id": item.id,
                    "path": item.path,
                    "base": item.base,
                    "adapter": item.adapter,
                }
    return list(listed.values())


def create(
    out: Path,
    models: list[dict[str, Any]],
    *,
    backend: str = "cpu",
    llama_build: str = "portable",
    archive: bool = False,
    on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write an offline bundle into ``out``; returns its manifest (without the file list).

    Args:
        out: a new or empty folder.
        models: what ``model_files`` returns.
        backend: the llama.cpp backend of the target machines.
        llama_build: for ``cpu``, ``portable`` (runs on other CPUs) or ``native`` (this
            machine's own build, for machines like it).
        archive: also write ``<out>.tar``.
        on_line: receives the installer's progress lines.

    Raises:
        InvalidInput: a bad backend or build, or ``out`` is not new or empty.
        OperationFailed: the installer failed (its last line says why).
    """
    if backend not in BACKENDS:
        raise InvalidInput(f"unknown backend {backend!r}", hint=f"use one of {BACKENDS}")
    if llama_build not in LLAMA_BUILDS:
        raise InvalidInput(f"unknown llama.cpp build {llama_build!r}", hint=f"use {LLAMA_BUILDS}")
    out = out.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"{out} exists and is not an empty folder")
    script = bootstrap_script()
    env = dict(os.environ)
    env["BASTION_VENV"] = sys.prefix  # the environment this engine runs in
    with tempfile.TemporaryDirectory(prefix="bastion-bundle-") as tmp:
        listing = Path(tmp) / "models.json"
        listing.write_text(json.dumps(models), encoding="utf-8")
        cmd = [
            sys.executable,
            "-c",
            _RUN_INSTALLER,
            str(script),
            "bundle",
            str(out),
            "--backend",
            backend,
            "--llama-build",
            llama_build,
            "--models-json",
            str(listing),
        ]
        if archive:
            cmd.append("--archive")
        with subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as child:
            assert child.stdout is not None
            last = ""
            for line in child.stdout:  # pip's output and the installer's progress
                if line.strip():
                    last = line.strip()
                if on_line is not None:
                    on_line(line.rstrip("\n"))
    if child.returncode != 0:
        reason = last.removeprefix("[bastion setup] ").removeprefix("error: ")
        raise OperationFailed(f"the bundle was not made: {reason}")
    try:
        manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise OperationFailed(f"the installer wrote no readable manifest: {exc}") from exc
    summary = {key: value for key, value in manifest.items() if key != "files"}
    summary["files"] = len(manifest.get("files", []))
    summary["path"] = str(out)
    if archive:
        summary["archive"] = str(out.with_name(out.name + ".tar"))
    return summary
