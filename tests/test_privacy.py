"""Nothing leaves the machine: offline switches, the connection guard, a process with no network."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from engine.errors import NetworkBlocked
from engine.privacy import guard
from tests.conftest import BIN


@pytest.fixture(autouse=True)
def _guard() -> None:
    guard.activate()


def test_switches_are_set() -> None:
    for key in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HF_HUB_DISABLE_TELEMETRY",
        "UNSLOTH_DISABLE_STATISTICS",
        "DO_NOT_TRACK",
    ):
        assert os.environ[key] in ("1", "true", "True"), key
    assert os.environ["WANDB_MODE"] == "disabled"


def test_outbound_connection_is_refused_naming_the_caller() -> None:
    before = len(guard.blocked_attempts())
    with pytest.raises(NetworkBlocked) as info:
        socket.create_connection(("192.0.2.1", 9), timeout=1)  # TEST-NET-1, never routed
    message = str(info.value)
    assert "192.0.2.1:9" in message
    assert "test_outbound_connection_is_refused_naming_the_caller" in message
    attempts = guard.blocked_attempts()
    assert len(attempts) == before + 1 and attempts[-1].target == "192.0.2.1:9"


def test_name_lookup_is_refused() -> None:
    with pytest.raises(NetworkBlocked, match=r"example\.org"):
        socket.getaddrinfo("example.org", 443)


def test_http_library_sees_a_connection_error() -> None:
    with pytest.raises(urllib.error.URLError) as info:
        urllib.request.urlopen("http://198.51.100.7/", timeout=1)
    assert isinstance(info.value.reason, NetworkBlocked)
    assert "test_http_library_sees_a_connection_error" in str(info.value.reason)


def test_loopback_and_unix_sockets_still_work(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("localhost", port), timeout=5) as client:
            conn, _ = server.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.close()
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as unix_server:
        unix_server.bind(path)
        unix_server.listen()
        with socket.socket(socket.AF_UNIX) as unix_client:
            unix_client.connect(path)


def test_allow_network_opens_the_guard_only_inside() -> None:
    with guard.allow_network("test download"):
        # Not blocked by the guard; the connection itself may fail (no network here).
        try:
            socket.create_connection(("192.0.2.1", 9), timeout=0.2).close()
        except NetworkBlocked:
            pytest.fail("blocked inside allow_network")
        except OSError:
            pass
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("192.0.2.1", 9), timeout=0.2)


def test_a_process_using_the_engine_reports_the_attempt(home: Path) -> None:
    code = (
        "from engine import Engine\n"
        "Engine()\n"
        "import urllib.request\n"
        "def fetch_update():\n"
        "    urllib.request.urlopen('http://203.0.113.9/check')\n"
        "fetch_update()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "BASTION_HOME": str(home)},
        timeout=60,
    )
    assert proc.returncode != 0
    assert "blocked a network connection to 203.0.113.9:80" in proc.stderr
    assert "fetch_update" in proc.stderr
    log = (home / "logs" / "bastion.log").read_text()
    assert "blocked a network connection to 203.0.113.9:80" in log


def _can_unshare_network() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare_network(), reason="needs unshare -n (root or user namespaces)")
def test_chat_works_in_a_process_without_any_network(home: Path) -> None:
    env = {**os.environ, "BASTION_HOME": str(home)}
    probe = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", "import socket; print(len(socket.if_nameindex()))"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert probe.stdout.strip() == "1", "only the loopback interface should exist"
    proc = subprocess.run(
        ["unshare", "-n", str(BIN / "bastion"), "chat", "Hello", "--max-tokens", "8", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"answer"' in proc.stdout


def test_prompts_and_answers_are_not_written_to_the_log(cli, home: Path) -> None:
    secret = "my-private-passphrase-4471"
    result = cli("chat", f"Remember {secret}", "--max-tokens", "8", "--json")
    assert result.code == 0
    answer = result.json()["answer"]
    log = (home / "logs" / "bastion.log").read_text()
    assert "answer:" in log  # the log is written ...
    assert secret not in log  # ... but without the prompt
    assert len(answer) < 20 or answer not in log
