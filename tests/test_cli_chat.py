"""``bastion chat`` and ``bastion history`` through the installed command."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, DEFAULT_MODEL, assert_one_line_error

CHAT_KEYS = {"answer", "model", "conversation_id", "usage", "tokens_per_second", "citations"}
FAST = ("--max-tokens", "16", "--temperature", "0")


def test_one_shot_streams_to_stdout(cli) -> None:
    result = cli("chat", "Say hello.", *FAST)
    assert result.code == 0, result.stderr
    assert result.stdout.strip()
    assert "Traceback" not in result.stderr


def test_json_answer_has_the_contract_fields(cli) -> None:
    result = cli("chat", "Name a fruit.", *FAST, "--seed", "7", "--json")
    assert result.code == 0, result.stderr
    data = result.json()
    assert set(data) >= CHAT_KEYS
    assert data["model"] == DEFAULT_MODEL and data["answer"]
    assert set(data["usage"]) >= {"prompt_tokens", "completion_tokens"}
    assert data["citations"] == []
    again = cli("chat", "Name a fruit.", *FAST, "--seed", "7", "--json").json()
    assert again["answer"] == data["answer"]


def test_continue_conversation_and_history_commands(cli) -> None:
    first = cli("chat", "Remember the word zephyr.", *FAST, "--json").json()
    cid = str(first["conversation_id"])
    second = cli("chat", "Which word?", "--conversation", cid, *FAST, "--json").json()
    assert second["conversation_id"] == first["conversation_id"]

    listed = cli("history", "list", "--json").json()
    assert [c["id"] for c in listed] == [first["conversation_id"]]
    assert listed[0]["message_count"] == 4

    shown = cli("history", "show", cid, "--json").json()
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant"] * 2
    assert shown["messages"][0]["content"] == "Remember the word zephyr."

    hits = cli("history", "search", "zephyr", "--json").json()
    assert hits and all(h["conversation_id"] == first["conversation_id"] for h in hits)
    assert cli("history", "search", 'C++ AND "(', "--json").code == 0

    md = cli("history", "export", cid, "--format", "md")
    assert md.code == 0 and "zephyr" in md.stdout and md.stdout.startswith("#")
    exported = json.loads(cli("history", "export", cid, "--format", "json").stdout)
    assert len(exported["messages"]) == 4


def test_export_to_file(cli, tmp_path: Path) -> None:
    cid = str(cli("chat", "Hi", *FAST, "--json").json()["conversation_id"])
    out = tmp_path / "conv.md"
    result = cli("history", "export", cid, "--format", "md", "--output", str(out))
    assert result.code == 0 and out.read_text().startswith("#")


def test_stdin_prompt(cli) -> None:
    result = cli("chat", "-", *FAST, "--json", input="What is two plus two?\n")
    assert result.code == 0, result.stderr
    assert result.json()["usage"]["prompt_tokens"] > 5


def test_user_errors_are_one_line_with_exit_2(cli) -> None:
    assert_one_line_error(cli("chat", "   "), 2, "empty")
    assert_one_line_error(cli("chat", "Hi", "-m", "missing-model"), 2, "no model 'missing-model'")
    assert_one_line_error(cli("chat", "Hi", "--conversation", "42"), 2, "no conversation 42")
    assert_one_line_error(cli("chat", "Hi", "-c", "papers"), 2, "collection")
    assert_one_line_error(cli("chat", "Hi", "--max-tokens", "0"), 2, "max-tokens")
    assert_one_line_error(cli("history", "show", "7"), 2, "no conversation 7")
    assert_one_line_error(cli("history", "export", "7", "--format", "pdf"), 2, "format")
    assert_one_line_error(cli("nonsense"), 2, "no such command")
    assert cli("history", "list", "--json").json() == []


def test_prompt_longer_than_context(cli) -> None:
    cli("models", "set", DEFAULT_MODEL, "--context", "128")
    result = cli("chat", "word " * 300, *FAST)
    assert_one_line_error(result, 2, "context window holds 128")
    assert cli("history", "list", "--json").json() == []


def test_interactive_session(cli) -> None:
    script = "Hello there\n/new\nSecond conversation\n/exit\n"
    result = cli("chat", "--max-tokens", "8", "--temperature", "0", input=script)
    assert result.code == 0, result.stderr
    assert result.stdout.count(f"{DEFAULT_MODEL}> ") == 2
    assert len(cli("history", "list", "--json").json()) == 2


def _interrupt_mid_answer(home: Path, sig: int) -> tuple[int, str]:
    env = {**os.environ, "BASTION_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            str(BIN / "bastion"),
            "chat",
            "Write a very long story about a lighthouse keeper.",
            "--max-tokens",
            "2000",
            "--temperature",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    received = b""
    while len(received.split()) < 6:  # wait for the answer to be well under way
        chunk = proc.stdout.read1(256)  # type: ignore[attr-defined]
        assert chunk, "the answer ended before it could be interrupted"
        received += chunk
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_keeps_partial_answer_marked_interrupted(cli, home: Path, sig: int) -> None:
    code, err = _interrupt_mid_answer(home, sig)
    assert code == 128 + sig, err
    assert "Traceback" not in err and "interrupted" in err
    db = sqlite3.connect(home / "bastion.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    content, interrupted = db.execute(
        "SELECT content, interrupted FROM messages WHERE role = 'assistant'"
    ).fetchone()
    db.close()
    assert interrupted == 1 and len(content.split()) >= 5
    shown = cli("history", "show", "1", "--json").json()
    assert shown["messages"][-1]["interrupted"] is True


def test_two_processes_chat_on_one_database_at_once(home: Path) -> None:
    env = {**os.environ, "BASTION_HOME": str(home)}
    procs = [
        subprocess.Popen(
            [str(BIN / "bastion"), "chat", f"Question {i}", *FAST, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for proc, (_out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    ids = {json.loads(out)["conversation_id"] for out, _ in results}
    assert len(ids) == 2
    db = sqlite3.connect(home / "bastion.db")
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 4
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


def test_model_that_llama_cpp_cannot_load(cli, tiny_gguf: Path) -> None:
    assert cli("models", "import", str(tiny_gguf), "--id", "tiny").code == 0
    assert_one_line_error(cli("chat", "Hi", "-m", "tiny"), 1, "could not load model tiny")
    assert cli("history", "list", "--json").json() == []
