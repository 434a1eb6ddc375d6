"""The model host process: answers stream from it, and its death ends one answer, not us.

Real parts throughout: the real llama.cpp in a real child process, the default model, the
installed ``bastion`` command, real signals (SIGSEGV, SIGKILL) sent to the real host in
the middle of an answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from engine.chat.session import ChatRequest
from engine.config import update_config
from engine.errors import ModelCrashed
from engine.jobs import JobContext
from engine.models.runtime import SamplingParams
from tests.conftest import BIN, DEFAULT_MODEL

LONG = SamplingParams(max_tokens=400, temperature=0.7, seed=3)
STORY = "Write a long story about a lighthouse keeper and the sea."


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def host_children(pid: int) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if "engine.models.host" in " ".join(p.cmdline())
    ]


def test_the_model_runs_in_a_child_process_and_answers_stream(engine: Any) -> None:
    assert engine.model_host_pid() is None  # nothing started before it is needed
    pieces: list[str] = []
    result = engine.chat(
        ChatRequest("Name three colours.", sampling=SamplingParams(max_tokens=16, seed=1)),
        on_text=pieces.append,
    )
    pid = engine.model_host_pid()
    assert pid is not None and pid != os.getpid()
    assert psutil.Process(pid).ppid() == os.getpid()
    assert len(pieces) >= 2 and "".join(pieces).strip() == result.answer
    assert result.completion_tokens > 0 and result.ttft_s is not None
    # llama.cpp's compute never runs here: the library is not even loaded in this process.
    maps = Path(f"/proc/{os.getpid()}/maps")
    if maps.exists() and "llama_cpp" not in sys.modules:
        assert "libllama" not in maps.read_text()


def test_cancel_still_stops_between_two_tokens(engine: Any) -> None:
    job = JobContext()
    seen: list[str] = []

    def on_text(text: str) -> None:
        seen.append(text)
        if len(seen) == 3:
            job.cancel("test")

    result = engine.chat(ChatRequest(STORY, sampling=LONG), job, on_text=on_text)
    assert result.interrupted and result.stop_reason == "cancelled"
    assert result.completion_tokens < 20  # it stopped at once, not at the budget
    # The same host goes on serving.
    pid = engine.model_host_pid()
    again = engine.chat(ChatRequest("Hi", sampling=SamplingParams(max_tokens=4, seed=1)))
    assert again.completion_tokens > 0 and engine.model_host_pid() == pid


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_a_host_that_dies_mid_answer_ends_that_answer_and_the_next_gets_a_fresh_one(
    engine: Any, sig: signal.Signals
) -> None:
    pieces: list[str] = []

    def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 5:
            os.kill(engine.model_host_pid(), sig)

    first_pid = None
    with pytest.raises(ModelCrashed) as caught:
        engine.chat(ChatRequest(STORY, sampling=LONG), on_text=on_text)
    message = str(caught.value)
    assert sig.name in message and "partial answer is kept" in message
    assert "\n" not in message

    # The partial answer is on disk, marked interrupted.
    conversation = engine.list_conversations()[0]
    _, messages = engine.get_conversation(conversation.id)
    answer = messages[-1]
    assert answer.role == "assistant" and answer.interrupted
    assert answer.content.strip() and answer.content.strip() in "".join(pieces).strip()

    first_pid = engine.model_host_pid()
    assert first_pid is None  # the dead host is not reused
    result = engine.chat(
        ChatRequest("Hi", conversation_id=conversation.id, sampling=SamplingParams(max_tokens=8))
    )
    assert result.completion_tokens > 0 and not result.interrupted
    assert engine.model_host_pid() is not None


def test_idle_host_is_stopped_and_gives_its_memory_back(engine: Any, home: Path) -> None:
    update_config(home, model_keep_alive_seconds=1)
    engine.chat(ChatRequest("Hi", sampling=SamplingParams(max_tokens=4, seed=1)))
    pid = engine.model_host_pid()
    assert pid is not None
    process = psutil.Process(pid)
    assert process.memory_info().rss > 50 * 2**20  # the model is in it
    wait_for(lambda: engine.model_host_pid() is None, timeout=30)
    wait_for(lambda: not psutil.pid_exists(pid) or process.status() == psutil.STATUS_ZOMBIE)
    # The next answer starts a host again.
    result = engine.chat(ChatRequest("Hi again", sampling=SamplingParams(max_tokens=4, seed=1)))
    assert result.completion_tokens > 0 and engine.model_host_pid() not in (None, pid)


def test_a_negative_keep_alive_keeps_the_host(engine: Any, home: Path) -> None:
    update_config(home, model_keep_alive_seconds=-1)
    engine.chat(ChatRequest("Hi", sampling=SamplingParams(max_tokens=4, seed=1)))
    assert engine.model_host_pid() is not None
    assert engine._lane._idle_timer is None  # nothing will stop it


def test_closing_the_engine_ends_the_host(home: Path) -> None:
    from engine import Engine

    eng = Engine(home)
    eng.chat(ChatRequest("Hi", sampling=SamplingParams(max_tokens=4, seed=1)))
    pid = eng.model_host_pid()
    assert pid is not None
    eng.close()
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")


def test_the_host_loads_with_the_configuration_it_is_given(home: Path) -> None:
    from engine.models.lane import ModelLane
    from engine.models.runtime import LoadSpec
    from tests.conftest import default_model_path

    log_path = home / "host.log"
    lane = ModelLane(log_path, runtime_config=lambda _model: "no-repack")
    try:
        spec = LoadSpec(DEFAULT_MODEL, str(default_model_path()), 512, 2, 0)
        assert lane.load(spec) > 0
        assert lane.load(spec) == 0.0  # loaded already
        assert len(lane.tokenize("Hello world", add_bos=False)) >= 2
    finally:
        lane.close()
    assert "(no-repack)" in log_path.read_text()


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_cli_chat_survives_a_host_crash_with_one_line_and_exit_1(
    home: Path, cli: Any, sig: signal.Signals
) -> None:
    proc = subprocess.Popen(
        [str(BIN / "bastion"), "chat", STORY, "--max-tokens", "400", "--seed", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "BASTION_HOME": str(home)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = os.read(proc.stdout.fileno(), 64)  # the answer has begun streaming
    assert first.strip()
    hosts = host_children(proc.pid)
    assert len(hosts) == 1
    hosts[0].send_signal(sig)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 1  # not a signal: the CLI itself is fine
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bastion: error: "), lines
    assert sig.name in lines[0] and "partial answer is kept in conversation" in lines[0]
    out = (first + rest).decode()
    assert out.endswith("\n")  # the error line is not glued to the partial answer

    shown = cli("history", "show", "1", "--json").json()
    answer = shown["messages"][-1]
    assert answer["interrupted"] and answer["content"].strip()
    assert answer["content"].strip() in out

    again = cli("chat", "Hi", "--max-tokens", "4", "--json")
    assert again.code == 0 and again.json()["usage"]["completion_tokens"] > 0


def test_loading_compiles_none_of_the_gguf_chat_templates() -> None:
    # llama-cpp-python would compile (and constant-fold) every template in the GGUF at load;
    # a hostile one built gigabytes there. Bastion renders templates itself, bounded.
    import llama_cpp.llama_chat_format

    from engine.models.runtime import LoadedModel, LoadSpec
    from tests.conftest import default_model_path

    original = llama_cpp.llama_chat_format.Jinja2ChatFormatter
    model = LoadedModel(LoadSpec(DEFAULT_MODEL, str(default_model_path()), 256, 1, 0))
    try:
        handlers = model.llm._chat_handlers
        assert "chat_template.default" in handlers
        with pytest.raises(RuntimeError, match="renders chat templates itself"):
            handlers["chat_template.default"](llama=model.llm, messages=[])
        assert llama_cpp.llama_chat_format.Jinja2ChatFormatter is original  # put back
    finally:
        model.close()
