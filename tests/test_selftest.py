"""The llama.cpp self-test: real probes of the installed build, in real child processes.

The probes load the default model and run the real llama.cpp; the test-only switches
make a chosen configuration's probe crash (SIGSEGV) or see noise, as a broken build would.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from engine.errors import OperationFailed
from engine.models import lane, probe, selftest
from engine.models.runtime import RUNTIME_CONFIGS, disabled_by
from tests.conftest import default_model_path

ROOT = Path(__file__).resolve().parent.parent


def run_selftest(tmp_path: Path, **switches: str) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "verdict.json"
    env = {**os.environ, **switches}
    env.pop(probe.CRASH_SWITCH, None) if not switches else None
    proc = subprocess.run(
        [sys.executable, "-m", "engine.models.selftest", "run", "--json", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert out.is_file()  # the verdict is kept whatever it says
    assert json.loads(out.read_text()) == json.loads(proc.stdout)
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def test_the_installed_build_passes_on_this_machine(tmp_path: Path) -> None:
    code, verdict, stderr = run_selftest(tmp_path)
    assert code == 0 and verdict["ok"]
    # The default passes wherever llama.cpp's repacked kernels run. Where they fault (a
    # virtualised Xeon with AMX: SIGILL), the default probe says so and the next passes.
    *failed, passed = verdict["probes"]
    assert [p["config"] for p in verdict["probes"]] == list(RUNTIME_CONFIGS[: len(failed) + 1])
    assert all(not f["ok"] and "the probe crashed" in f["detail"] for f in failed)
    assert verdict["config"] == passed["config"]
    assert verdict["disabled"] == list(disabled_by(passed["config"]))
    assert passed["ok"] and "mean NLL" in passed["detail"]
    assert "tokens generated" in passed["detail"]
    nll = float(passed["detail"].split("mean NLL ")[1].split()[0])
    assert 0.5 < nll < probe.MAX_MEAN_NLL  # plain English, read by a working model
    assert stderr.strip().splitlines() == [verdict["summary"]]  # one line says the choice


def test_a_crash_in_the_first_probe_falls_back_to_the_next_configuration(
    tmp_path: Path,
) -> None:
    code, verdict, stderr = run_selftest(tmp_path, BASTION_SELFTEST_CRASH="default")
    assert code == 0 and verdict["config"] == "no-repack"
    first, second = verdict["probes"]
    assert first["config"] == "default" and not first["ok"] and "SIGSEGV" in first["detail"]
    # Where it died, in the one line a user or a bug report sees: the stage the probe had
    # announced, and the innermost Python frame faulthandler printed.
    assert "while evaluating a 301-token prompt in one batch" in first["detail"]
    assert 'probe.py", line' in first["detail"] and "in probe" in first["detail"]
    assert second["ok"]
    assert verdict["disabled"] and "repacked weight buffers" in verdict["disabled"][0]
    (line,) = stderr.strip().splitlines()
    assert "turned off" in line and "SIGSEGV" in line


def test_garbage_and_crashes_everywhere_fail_the_build(tmp_path: Path) -> None:
    # The crash comes first: the default configuration faults for real on some machines,
    # before it could compute garbage; the forced crash happens before anything is computed.
    code, verdict, stderr = run_selftest(
        tmp_path, BASTION_SELFTEST_CRASH="default", BASTION_SELFTEST_GARBAGE="no-repack"
    )
    assert code == 1 and not verdict["ok"] and verdict["config"] is None
    assert "SIGSEGV" in verdict["probes"][0]["detail"]
    assert "garbage" in verdict["probes"][1]["detail"]
    assert "failed its self-test" in stderr


def test_a_probe_that_hangs_is_tried_twice_and_concludes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selftest, "PROBE_TIMEOUT_S", 10.0)
    monkeypatch.setenv(probe.HANG_SWITCH, "default")
    monkeypatch.delenv(probe.CRASH_SWITCH, raising=False)
    monkeypatch.delenv(probe.GARBAGE_SWITCH, raising=False)
    model = default_model_path()
    verdict = selftest.run_selftest(model, out=tmp_path / "hung-then-passed.json")
    hung, passed = verdict.probes
    assert hung.timed_out and not hung.ok and hung.seconds == 10.0
    assert hung.detail.startswith("no answer in 10 s while ") and hung.detail.endswith("(2 tries)")
    assert verdict.config == "no-repack" == passed.config and verdict.settled

    # A build whose every probe failed, one of them by hanging, is failed but not settled:
    # kept so, the engine tests it again (once per process) instead of refusing for good.
    monkeypatch.setenv(probe.CRASH_SWITCH, "default")
    monkeypatch.setenv(probe.HANG_SWITCH, "no-repack")
    out = tmp_path / "unsettled.json"
    verdict = selftest.run_selftest(model, out=out)
    assert verdict.config is None and not verdict.settled
    assert [p.timed_out for p in verdict.probes] == [False, True]
    kept = json.loads(out.read_text())
    assert kept["settled"] is False and selftest.Verdict.from_json(kept) == verdict

    again = dataclasses.replace(verdict, config="no-repack", probes=())
    runs: list[Path] = []
    monkeypatch.setattr(lane, "_verdict_config", {})
    monkeypatch.setattr(selftest, "read_verdict", lambda: verdict)
    monkeypatch.setattr(selftest, "run_selftest", lambda m: runs.append(m) or again)
    assert lane.selftest_config(model) == "no-repack" and len(runs) == 1
    monkeypatch.setattr(lane, "_verdict_config", {"retried": "yes"})
    with pytest.raises(OperationFailed, match="no answer in 10 s"):
        lane.selftest_config(model)
    assert len(runs) == 1


def test_a_verdict_for_another_build_is_not_trusted(tmp_path: Path) -> None:
    good = selftest.Verdict(
        "native", "cpu", "default", (), (), selftest.build_key(), "2026-01-01T00:00:00+00:00"
    )
    path = tmp_path / "v.json"
    path.write_text(json.dumps(good.to_json()))
    assert selftest.read_verdict(path) == good
    path.write_text(json.dumps(dataclasses.replace(good, build_key="0" * 16).to_json()))
    assert selftest.read_verdict(path) is None
    path.write_text("{not json")
    assert selftest.read_verdict(path) is None


def test_the_engine_refuses_a_build_that_passed_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = selftest.Verdict(
        "native",
        "cpu",
        None,
        (),
        (selftest.Probe("default", False, "the probe crashed (SIGSEGV)", 0.5),),
        selftest.build_key(),
        "",
    )
    monkeypatch.setattr(lane, "_verdict_config", {})
    monkeypatch.setattr(selftest, "read_verdict", lambda: failed)
    with pytest.raises(OperationFailed) as caught:
        lane.selftest_config(default_model_path())
    assert "failed its self-test" in str(caught.value) and "SIGSEGV" in str(caught.value)


def test_the_engine_loads_with_the_configuration_that_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    passed = selftest.Verdict("native", "cpu", "no-repack", (), (), selftest.build_key(), "")
    monkeypatch.setattr(lane, "_verdict_config", {})
    monkeypatch.setattr(selftest, "read_verdict", lambda: passed)
    assert lane.selftest_config(None) == "no-repack"


# -- set-up: the fallback to a portable build ------------------------------------------------


@pytest.fixture
def bootstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bootstrap", ROOT / "installer" / "bootstrap.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("BASTION_WHEEL_CACHE", str(tmp_path / "wheels"))
    return module


def test_setup_falls_back_to_a_portable_build_and_remembers_why(
    bootstrap: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    installed: list[str] = []
    tested: list[str] = []
    # Only the build and the probe are stand-ins (a real portable build takes ten minutes);
    # what set-up decides from their answers is the real code.
    monkeypatch.setattr(bootstrap, "ensure_llama", lambda _b, v, _r: installed.append(v))

    def fake_selftest(variant: str) -> dict[str, object]:
        tested.append(variant)
        if variant == "native":
            failed = "llama.cpp (native cpu build) failed its self-test: default: SIGSEGV"
            return {"ok": False, "settled": True, "summary": failed}
        passed = "llama.cpp (portable cpu build) passed its self-test"
        return {"ok": True, "settled": True, "summary": passed}

    monkeypatch.setattr(bootstrap, "selftest", fake_selftest)
    assert bootstrap.ensure_verified_llama("cpu", {}) == "portable"
    assert installed == tested == ["native", "portable"]
    err = capsys.readouterr().err
    assert "using the portable llama.cpp build" in err and "SIGSEGV" in err

    # The next set-up on this machine (a fresh clone) does not build or try native again.
    installed.clear()
    tested.clear()
    assert bootstrap.first_untried_variant("cpu", "native") == "portable"
    assert bootstrap.ensure_verified_llama("cpu", {}) == "portable"
    assert installed == tested == ["portable"]
    assert "skipping the native llama.cpp build" in capsys.readouterr().err


def test_setup_stops_when_no_build_passes(
    bootstrap: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bootstrap, "ensure_llama", lambda *_: None)
    failed = {"ok": False, "settled": True, "summary": "failed"}
    monkeypatch.setattr(bootstrap, "selftest", lambda v: failed)
    with pytest.raises(SystemExit) as caught:
        bootstrap.ensure_verified_llama("cpu", {})
    assert caught.value.code == 1


def test_a_build_whose_probes_hung_is_tried_again_by_the_next_setup(
    bootstrap: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed: list[str] = []
    monkeypatch.setattr(bootstrap, "ensure_llama", lambda _b, v, _r: installed.append(v))
    hung = {"ok": False, "settled": False, "summary": "native: no answer in 180 s (2 tries)"}
    answers = iter([hung, {"ok": True, "settled": True, "summary": "portable passed"}])
    monkeypatch.setattr(bootstrap, "selftest", lambda v: next(answers))
    assert bootstrap.ensure_verified_llama("cpu", {}) == "portable"
    # Nothing was concluded of the native build: the next set-up builds and tests it again,
    # as it does a failure recorded before failures were told apart (no "settled").
    assert bootstrap.house_verdict(bootstrap.wheel_house("cpu", "native")) is None
    assert bootstrap.first_untried_variant("cpu", "native") == "native"
    old = {"ok": False, "summary": "native: no answer in 180 s"}
    bootstrap.keep_house_verdict(bootstrap.wheel_house("cpu", "native"), old)
    assert bootstrap.first_untried_variant("cpu", "native") == "native"
    monkeypatch.setattr(bootstrap, "selftest", lambda v: {"ok": True, "settled": True,
                                                          "summary": f"{v} passed"})  # fmt: skip
    assert bootstrap.ensure_verified_llama("cpu", {}) == "native"
    assert installed == ["native", "portable", "native"]
