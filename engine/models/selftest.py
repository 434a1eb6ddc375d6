"""The llama.cpp self-test: is the installed build safe on this machine, and how to load it.

Machines differ in ways a build cannot see: llama.cpp's AMX path, for one, crashes on
some virtualised Intel Xeons as soon as a prompt has two tokens (llama.cpp issue 20824).
So before any model is served, set-up runs this self-test; the model host (and the
engine, when set-up's verdict is missing or stale) loads models only with the
configuration it passed.

Each probe runs in a child process (a crash there is a verdict, not an accident; what it
does is in ``engine.models.probe``): it loads the default model as the engine would,
evaluates a prompt, scores tokens and generates. A crash is reported with the stage the
child had announced and the last line it wrote ("SIGSEGV ... while loading the model
(...)"): on a machine the test runs on once, that line may be all anyone sees.
Configurations are tried safest last (``runtime.RUNTIME_CONFIGS``); the first that
passes is the verdict.

    python -m engine.models.selftest run [--json] [--out FILE] [--model GGUF]

The verdict is kept beside the build it judges (``<venv>/share/bastion/``), keyed by the
llama.cpp library's identity and the CPU, so a rebuilt or copied install is tested anew.
A test-only switch, ``BASTION_SELFTEST_CRASH=CONFIG``, makes that configuration's probe
die by SIGSEGV where a native crash would happen (``BASTION_SELFTEST_GARBAGE=CONFIG``:
as if the logits were noise; ``BASTION_SELFTEST_HANG=CONFIG``: it never answers).

A probe that gives no answer in time is tried once more, and if it hangs again the
verdict is not *settled*: a hang, or a machine so busy that llama.cpp's spinning
threads crawl, says nothing sure of the build, so set-up and the engine test it again
next time instead of keeping the failure.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.models.runtime import RUNTIME_CONFIGS, disabled_by

log = logging.getLogger(__name__)

RECIPE = 1  # bump when the probe changes, so that old verdicts are not trusted
VERDICT_FILE = "llama-selftest.json"
PROBE_TIMEOUT_S = 180.0  # a probe takes 3-8 s on 2 busy cores; this is a hang, or a machine
PROBE_TRIES = 2  # so busy that llama.cpp's spinning threads crawl: then it is tried once more


@dataclass(frozen=True)
class Probe:
    """One configuration tried: whether it passed, and the numbers or the failure."""

    config: str
    ok: bool
    detail: str
    seconds: float
    timed_out: bool = False  # no answer: says nothing of the build, so nothing is concluded


@dataclass(frozen=True)
class Verdict:
    """What the self-test found for one llama.cpp build on one machine."""

    build: str  # "native" | "portable" (set-up's wheel variant; "unknown" outside set-up)
    backend: str  # "cpu" | "cuda" | "metal"
    config: str | None  # the configuration that passed; None: none did
    disabled: tuple[str, ...]  # what the passing configuration turned off, in words
    probes: tuple[Probe, ...]
    build_key: str
    tested_at: str

    @property
    def ok(self) -> bool:
        return self.config is not None

    @property
    def settled(self) -> bool:
        """Passed, or failed for a reason a rerun would find again (not a probe that hung)."""
        return self.ok or not any(p.timed_out for p in self.probes)

    def summary(self) -> str:
        """One line: what was chosen and why."""
        if self.config is None:
            failures = "; ".join(f"{p.config}: {p.detail}" for p in self.probes)
            return f"llama.cpp ({self.build} {self.backend} build) failed its self-test: {failures}"
        numbers = next((p.detail for p in self.probes if p.config == self.config), "")
        text = f"llama.cpp ({self.build} {self.backend} build) passed its self-test"
        failed = [p for p in self.probes if not p.ok]
        if failed:
            turned_off = ", ".join(self.disabled) or "nothing"
            reasons = "; ".join(f"{p.config}: {p.detail}" for p in failed)
            return f"{text} with {turned_off} turned off ({reasons}); {numbers}"
        return f"{text} ({self.config} configuration{'; ' + numbers if numbers else ''})"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["settled"] = self.settled
        data["summary"] = self.summary()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        return cls(
            build=str(data["build"]),
            backend=str(data["backend"]),
            config=data["config"],
            disabled=tuple(data.get("disabled", ())),
            probes=tuple(Probe(**p) for p in data.get("probes", ())),
            build_key=str(data["build_key"]),
            tested_at=str(data.get("tested_at", "")),
        )


# -- where the verdict lives, and whose it is -------------------------------------------


def verdict_path() -> Path:
    """Beside the default models that set-up installs into this environment."""
    return Path(sys.prefix) / "share" / "bastion" / VERDICT_FILE


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_key() -> str:
    """The identity of the installed llama.cpp libraries on this CPU (no import needed)."""
    spec = importlib.util.find_spec("llama_cpp")
    parts = [f"recipe {RECIPE}", platform.machine(), _cpu_flags()]
    if spec is None or spec.origin is None:
        parts.append("llama_cpp missing")
    else:
        package = Path(spec.origin).parent
        for lib in sorted((package / "lib").glob("*")):
            st = lib.stat()
            parts.append(f"{lib.name} {st.st_size} {st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def read_verdict(path: Path | None = None) -> Verdict | None:
    """The verdict for the installed build; None if it was never tested (or rebuilt since)."""
    path = path or verdict_path()
    try:
        verdict = Verdict.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return verdict if verdict.build_key == build_key() else None


def _backend() -> str:
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return "cpu"
    return "metal" if sys.platform == "darwin" else "cuda"


# -- the parent: try the configurations in turn -----------------------------------------


def default_model_path() -> Path | None:
    """The default chat model set-up installed, which every probe loads."""
    import tomllib

    from engine.paths import builtin_models_dirs, resources_dir

    catalogue = tomllib.loads((resources_dir() / "catalogue.toml").read_text(encoding="utf-8"))
    for entry in catalogue.get("model", []):
        for folder in builtin_models_dirs():
            candidate = folder / str(entry["file"])
            if candidate.is_file():
                return candidate
    return None


def run_selftest(
    model: Path,
    *,
    build: str = "unknown",
    out: Path | None = None,
    configs: tuple[str, ...] = RUNTIME_CONFIGS,
) -> Verdict:
    """Probe ``configs`` in turn (each in a child) until one passes; write the verdict."""
    probes: list[Probe] = []
    passed: str | None = None
    for config in configs:
        probe = _probe_in_child(model, config)
        probes.append(probe)
        log.info("self-test %s: %s (%s)", config, "passed" if probe.ok else "failed", probe.detail)
        if probe.ok:
            passed = config
            break
    verdict = Verdict(
        build=build,
        backend=_backend(),
        config=passed,
        disabled=disabled_by(passed) if passed else (),
        probes=tuple(probes),
        build_key=build_key(),
        tested_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    target = out or verdict_path()
    try:
        from engine.paths import atomic_write_bytes

        atomic_write_bytes(target, json.dumps(verdict.to_json(), indent=1).encode())
    except OSError as exc:  # a read-only environment: the verdict holds for this process
        log.warning("could not keep the self-test verdict in %s: %s", target, exc)
    return verdict


def _probe_in_child(model: Path, config: str) -> Probe:
    for attempt in range(1, PROBE_TRIES + 1):
        probe = _probe_once(model, config)
        if not probe.timed_out:
            return probe
        if attempt < PROBE_TRIES:
            log.warning("self-test %s: %s; trying it once more", config, probe.detail)
    return replace(probe, detail=f"{probe.detail} ({PROBE_TRIES} tries)")


def _probe_once(model: Path, config: str) -> Probe:
    started = time.monotonic()
    command = [sys.executable, "-m", "engine.models.selftest", "probe", str(model), config]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        said = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        stage, _ = _read_child(said or "")
        where = f" while {stage}" if stage else ""
        detail = f"no answer in {PROBE_TIMEOUT_S:.0f} s{where}"
        return Probe(config, False, detail, PROBE_TIMEOUT_S, timed_out=True)
    elapsed = round(time.monotonic() - started, 2)
    stage, result = _read_child(done.stdout)
    if done.returncode < 0:
        from engine.protocol import describe_exit

        detail = describe_exit(done.returncode, "the probe", "llama.cpp")
        if stage:
            detail += f" while {stage}"
        said = _last_words(done.stderr)
        return Probe(config, False, f"{detail} ({said})" if said else detail, elapsed)
    if result is None:
        tail = _last_words(done.stderr) or "no output"
        where = f" while {stage}" if stage else ""
        return Probe(config, False, f"exit code {done.returncode}{where}: {tail}", elapsed)
    return Probe(config, bool(result["ok"]), str(result["detail"]), elapsed)


def _read_child(stdout: str) -> tuple[str | None, dict[str, Any] | None]:
    """The last stage the child announced, and its result line (None if it died first)."""
    stage: str | None = None
    result: dict[str, Any] | None = None
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if "stage" in item:
            stage = str(item["stage"])
        elif "ok" in item:
            result = item
    return stage, result


def _last_words(stderr: str) -> str:
    """The child's last meaningful line on stderr, shortened (faulthandler's own lines skipped)."""
    noise = ("Fatal Python error", "Current thread", "Thread 0x", "Extension modules", "<no Python")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(noise)]
    # faulthandler prints the Python stack innermost first: its first "File" line is where
    # the crash happened; otherwise the last thing printed is the best clue.
    frames = [line for line in useful if line.startswith("File ")]
    return (frames[0] if frames else useful[-1] if useful else "")[:200]


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.models.selftest")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="probe every configuration and keep the verdict")
    run.add_argument("--json", action="store_true", help="print the verdict as JSON")
    run.add_argument("--out", type=Path, help="where to keep the verdict")
    run.add_argument("--model", type=Path, help="the GGUF to probe with (default model)")
    run.add_argument("--build", default="unknown", help="the wheel variant, for the record")
    probe = sub.add_parser("probe", help="(internal) one configuration, in this process")
    probe.add_argument("model", type=Path)
    probe.add_argument("config", choices=RUNTIME_CONFIGS)
    args = parser.parse_args(argv)
    from engine.privacy import guard

    # First, before llama.cpp is loaded: every process Bastion starts runs under the guard.
    guard.activate()
    if args.command == "probe":
        from engine.models.probe import main as probe_main

        return probe_main(args.model, args.config)

    model = args.model or default_model_path()
    if model is None:
        sys.stderr.write("self-test: the default model is not installed\n")
        return 2
    verdict = run_selftest(model, build=args.build, out=args.out)
    if args.json:
        sys.stdout.write(json.dumps(verdict.to_json()) + "\n")
    sys.stderr.write(verdict.summary() + "\n")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
