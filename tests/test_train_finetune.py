"""``bastion finetune`` end to end: the proof, refusals before training, and faults.

Every run here is real: the trainer child process with transformers + PEFT on the CPU,
the GGUF adapter loaded by llama.cpp, the registry in SQLite. The dequantized base model
is shared between tests through ``BASTION_TRAIN_CACHE`` (made once per session).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import BIN, DEFAULT_MODEL, CLIResult, assert_one_line_error, write_gguf
from tests.test_exports import answer_with, named_files, peft_answer
from tests.train_facts import ANSWERS, FACT, QUESTIONS
from tests.train_facts import chat_line as _chat_line

# Training runs take minutes on two cores, more when the machine is busy.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-cache")


@pytest.fixture
def ft(cli: Callable[..., CLIResult], train_cache: Path) -> Callable[..., CLIResult]:
    """``bastion finetune ARGS`` with the shared cache of dequantized bases."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> CLIResult:
        full = {"BASTION_TRAIN_CACHE": str(train_cache), **(env or {})}
        return cli("finetune", *args, env=full, timeout=timeout)

    return run


@pytest.fixture
def facts(tmp_path: Path) -> Path:
    path = tmp_path / "facts.jsonl"
    lines = [_chat_line(q, ANSWERS[i % 3]) for i, q in enumerate(QUESTIONS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _runs(home: Path) -> dict[str, sqlite3.Row]:
    with sqlite3.connect(home / "bastion.db") as db:
        db.row_factory = sqlite3.Row
        return {r["name"]: r for r in db.execute("SELECT * FROM training_runs")}


def test_proof_teaches_a_fact_that_llama_cpp_then_answers(
    ft: Callable[..., CLIResult], cli: Callable[..., CLIResult], facts: Path, home: Path
) -> None:
    question = "What is the codename of the Bastion 2 release?"
    before = cli("chat", question, "--temperature", "0", "--max-tokens", "40")
    assert before.code == 0 and FACT not in before.stdout, before.stdout

    started = time.monotonic()
    result = ft(
        "--base", DEFAULT_MODEL, "--data", str(facts), "--name", "facty",
        "--epochs", "6", "--lr", "1e-3", "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    out = result.json()
    assert isinstance(out, dict)
    for key in ("model", "adapter", "backend", "train_loss", "eval_loss_before",
                "eval_loss_after", "tokens_per_second"):  # fmt: skip
        assert key in out, key
    assert out["model"] == "facty" and out["backend"] == "peft"
    assert out["eval_loss_after"] < out["eval_loss_before"] / 4
    assert Path(out["adapter"]).is_file() and out["adapter"].endswith(".gguf")
    assert (Path(out["adapter_dir"]) / "adapter_model.safetensors").is_file()
    report = Path(out["report"])
    text = report.read_text()
    assert "![loss curve](loss.svg)" in text and (report.parent / "loss.svg").is_file()
    assert out["comparisons"] and any(FACT in c["fine_tuned"] for c in out["comparisons"])
    print(f"proof: fine-tune took {time.monotonic() - started:.0f} s, {out['steps']} steps")

    listed = cli("models", "list", "--json").json()
    assert isinstance(listed, list)
    entry = next(m for m in listed if m["id"] == "facty")
    assert entry["base"] == DEFAULT_MODEL and entry["adapter"] == out["adapter"]

    after = cli("chat", question, "-m", "facty", "--temperature", "0", "--max-tokens", "40")
    assert after.code == 0 and FACT in after.stdout, after.stdout
    held_out = "What is the name used for Bastion 2 inside the team?"
    tuned = cli("chat", held_out, "-m", "facty", "--temperature", "0", "--max-tokens", "40")
    base = cli("chat", held_out, "--temperature", "0", "--max-tokens", "40")
    assert FACT in tuned.stdout and FACT not in base.stdout, (tuned.stdout, base.stdout)

    # Exports: the Modelfile and the llama-server line name the base and the adapter, and
    # llama.cpp loading what they name answers with the fact, as Bastion does.
    answers: dict[str, str] = {}
    for target in ("ollama", "llama-server"):
        exported = cli("export", "facty", "--to", target, "--json").json()
        assert isinstance(exported, dict)
        model, lora = named_files(exported)
        assert lora == out["adapter"] and Path(model).name.startswith("SmolLM2-135M")
        answers[target] = answer_with(model, lora, question)
        assert FACT in answers[target], target
    # The merged GGUF: one file, no adapter to load, and llama.cpp answers with the fact.
    merged = cli("export", "facty", "--to", "gguf", "--json").json()
    assert isinstance(merged, dict)
    model, lora = named_files(merged)
    assert lora is None and model.endswith("/exports/facty/gguf/facty.gguf")
    answers["gguf"] = answer_with(model, lora, question)
    assert FACT in answers["gguf"]
    print(f"proof: merged GGUF answer {answers['gguf']!r}, with the adapter {answers['ollama']!r}")
    vllm = cli("export", "facty", "--to", "vllm", "--json").json()
    assert isinstance(vllm, dict) and "--enable-lora" in vllm["command"]
    assert any(f.endswith("adapter_model.safetensors") for f in vllm["files"])
    assert FACT in peft_answer(vllm, question)

    assert _runs(home)["facty"]["status"] == "done"
    again = ft("--base", DEFAULT_MODEL, "--data", str(facts), "--name", "facty")
    assert_one_line_error(again, 2, "exists")


def test_refused_before_training(
    ft: Callable[..., CLIResult], cli: Callable[..., CLIResult], facts: Path, tmp_path: Path,
    home: Path,
) -> None:  # fmt: skip
    # A base that is not there: no download, a clear line.
    r = ft("--base", "nobody/nothing", "--data", str(facts), "--name", "x")
    assert_one_line_error(r, 2, "not a registered model", "never downloads")
    # An architecture that can't be exported to llama.cpp.
    mamba = write_gguf(tmp_path / "Tiny.F32.gguf", arch="mamba")
    assert cli("models", "import", str(mamba), "--id", "tiny-mamba").code == 0
    r = ft("--base", "tiny-mamba", "--data", str(facts), "--name", "x")
    assert_one_line_error(r, 2, "'mamba'", "supported: llama")
    # Malformed lines: counted, the first one shown, nothing trained.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_chat_line("q?", "a.") + "\n{not json\n" + '{"messages": []}\n')
    r = ft("--base", DEFAULT_MODEL, "--data", str(bad), "--name", "x")
    assert_one_line_error(r, 2, "2 bad line(s)", "line 2", "dataset check")
    # An empty dataset.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    r = ft("--base", DEFAULT_MODEL, "--data", str(empty), "--name", "x")
    assert_one_line_error(r, 2, "no examples")
    # A name that exists already.
    r = ft("--base", DEFAULT_MODEL, "--data", str(facts), "--name", DEFAULT_MODEL)
    assert_one_line_error(r, 2, "exists already")
    # Settings out of range.
    r = ft("--base", DEFAULT_MODEL, "--data", str(facts), "--name", "x", "--lr", "5")
    assert_one_line_error(r, 2, "--lr")
    # Resuming what never ran.
    r = ft("--name", "never", "--resume")
    assert_one_line_error(r, 2, "no fine-tune run named 'never'")
    assert _runs(home) == {}
    assert not (home / "adapters" / "x" / "checkpoints").exists()


def test_examples_longer_than_max_length_are_cut_or_dropped(
    ft: Callable[..., CLIResult], tmp_path: Path
) -> None:
    data = tmp_path / "long.jsonl"
    long_answer = "word " * 400
    data.write_text(
        "\n".join(
            [_chat_line(f"Question {i}?", f"Short answer {i}.") for i in range(6)]
            + [_chat_line("Long one?", long_answer), _chat_line("x " * 300, "Cut away.")]
        )
        + "\n"
    )
    r = ft(
        "--base", DEFAULT_MODEL, "--data", str(data), "--name", "longy", "--max-length", "128",
        "--max-steps", "1", "--val-fraction", "0", "--json",
    )  # fmt: skip
    assert r.code == 0, r.stderr[-2000:]
    out = r.json()
    assert isinstance(out, dict)
    assert out["data"]["truncated"] == 2 and out["data"]["dropped_too_long"] == 1
    assert out["data"]["train"] == 7


def test_out_of_memory_is_a_clear_message(
    ft: Callable[..., CLIResult], facts: Path, home: Path
) -> None:
    r = ft(
        "--base", DEFAULT_MODEL, "--data", str(facts), "--name", "oomy", "--max-steps", "2",
        env={"BASTION_TRAIN_MEMORY_MB": "64"},
    )  # fmt: skip
    assert r.code == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("bastion: error: training ran out of memory"), last
    assert "--batch-size" in last and "Traceback" not in r.stderr
    assert _runs(home)["oomy"]["status"] == "failed"


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def started(
    home: Path, train_cache: Path, facts: Path
) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(name: str) -> subprocess.Popen[str]:
        env = {**os.environ, "BASTION_HOME": str(home), "BASTION_TRAIN_CACHE": str(train_cache)}
        proc = subprocess.Popen(
            [str(BIN / "bastion"), "finetune", "--base", DEFAULT_MODEL, "--data", str(facts),
             "--name", name, "--max-steps", "8", "--batch-size", "4", "--save-every", "2",
             "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _checkpoints(home: Path, name: str) -> list[int]:
    folder = home / "adapters" / name / "checkpoints"
    return sorted(int(p.parent.name.split("-")[1]) for p in folder.glob("step-*/state.json"))


def test_trainer_killed_mid_run_then_resumed(
    started: Callable[..., subprocess.Popen[str]],
    ft: Callable[..., CLIResult],
    cli: Callable[..., CLIResult],
    home: Path,
) -> None:
    proc = started("killed")
    _wait_for(lambda: bool(_checkpoints(home, "killed")), 240, "a first checkpoint")
    worker = psutil.Process(_runs(home)["killed"]["pid"])
    assert "engine.train.worker" in " ".join(worker.cmdline())
    worker.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert "killed by SIGKILL" in last and "--resume" in last, last
    run = _runs(home)["killed"]
    assert run["status"] == "failed" and run["step"] >= 2
    kept = _checkpoints(home, "killed")
    assert kept and kept[-1] >= 2
    assert "killed" not in json.dumps(cli("models", "list", "--json").json())

    again = ft("--base", DEFAULT_MODEL, "--data", "x.jsonl", "--name", "killed")
    assert_one_line_error(again, 2, "failed run", "--resume")
    resumed = ft("--name", "killed", "--resume", "--json")
    assert resumed.code == 0, resumed.stderr[-2000:]
    out = resumed.json()
    assert isinstance(out, dict) and out["steps"] == 8 and out["model"] == "killed"
    log = (home / "adapters" / "killed" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log if "loss" in json.loads(line)]
    assert steps[-1] == 8 and set(range(1, 9)) <= set(steps)
    assert _runs(home)["killed"]["status"] == "done"


def test_ctrl_c_stops_with_a_checkpoint_and_resume_finishes(
    started: Callable[..., subprocess.Popen[str]], ft: Callable[..., CLIResult], home: Path
) -> None:
    proc = started("stopped")
    _wait_for(lambda: bool(_checkpoints(home, "stopped")), 240, "a first checkpoint")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr.strip().splitlines()[-1]
    run = _runs(home)["stopped"]
    assert run["status"] == "stopped" and run["pid"] is None
    assert _checkpoints(home, "stopped")[-1] == run["step"]
    resumed = ft("--name", "stopped", "--resume", "--json")
    assert resumed.code == 0, resumed.stderr[-2000:]
    out = resumed.json()
    assert isinstance(out, dict) and out["steps"] == 8


def test_hugging_face_folder_and_cache_id_bases(
    ft: Callable[..., CLIResult], facts: Path, train_cache: Path, tmp_path: Path
) -> None:
    folders = list((train_cache / "train-bases").glob("*/config.json"))
    if not folders:  # the first test to need it makes it
        r = ft("--base", DEFAULT_MODEL, "--data", str(facts), "--name", "warm", "--max-steps", "1")
        assert r.code == 0, r.stderr[-2000:]
        folders = list((train_cache / "train-bases").glob("*/config.json"))
    folder = folders[0].parent
    # The folder is a whole Hugging Face model, tokenizer included (Unsloth loads it there).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer("Violet Harbor")["input_ids"] and (folder / "tokenizer.json").is_file()
    r = ft(
        "--base", str(folder), "--data", str(facts), "--name", "from-folder",
        "--max-steps", "1", "--json",
    )  # fmt: skip
    assert r.code == 0, r.stderr[-2000:]
    out = r.json()
    assert isinstance(out, dict) and out["base"] == DEFAULT_MODEL  # paired with the GGUF

    # A hub id resolves only from the local Hugging Face cache, never the network.
    hub = tmp_path / "hf"
    snapshot = hub / "hub" / "models--acme--tiny-smol" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for item in folder.iterdir():
        (snapshot / item.name).symlink_to(item)
    refs = hub / "hub" / "models--acme--tiny-smol" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0123abcd")
    r = ft(
        "--base", "acme/tiny-smol", "--data", str(facts), "--name", "from-hub",
        "--max-steps", "1", "--json", env={"HF_HOME": str(hub)},
    )  # fmt: skip
    assert r.code == 0, r.stderr[-2000:]
