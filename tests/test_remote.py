"""Remote models: another Bastion's server, registered with `models add-remote`, used by chat,
collections and this Bastion's own server like a local model, through the privacy guard.

The remote server listens on this machine's own network address (not loopback), so every
call to it has to pass the guard, which lets through the registered host only, and only
during a call to it.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from engine.errors import NetworkBlocked
from tests.conftest import DEFAULT_MODEL, CLIResult, assert_one_line_error
from tests.test_server import MANUAL, bastion, start_server


def lan_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    try:
        out = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "scope", "global"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:
        return None
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return None


ADDRESS = lan_address()
pytestmark = pytest.mark.skipif(ADDRESS is None, reason="no non-loopback address to serve on")


def cli(home: Path, *args: str, input: str | None = None) -> CLIResult:
    if input is None:
        done = bastion(home, *args)
    else:
        import os

        from tests.conftest import BIN

        done = subprocess.run(
            [str(BIN / "bastion"), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
            env={**os.environ, "BASTION_HOME": str(home)},
        )
    return CLIResult(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Another Bastion serving on this machine's network address: (its /v1 URL, a key)."""
    home = tmp_path_factory.mktemp("remote-home")
    key = json.loads(bastion(home, "keys", "create", "office", "--json").stdout)["key"]
    url, process = start_server(home, "--host", "0.0.0.0")
    port = url.rsplit(":", 1)[1]
    yield f"http://{ADDRESS}:{port}/v1", key
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def office(remote: tuple[str, str], home: Path) -> str:
    """This home, with the remote registered as the model ``office``."""
    url, key = remote
    assert cli(home, "secrets", "set", "office-key", input=key + "\n").code == 0
    added = cli(
        home,
        "models",
        "add-remote",
        "office",
        "--url",
        url,
        "--model",
        DEFAULT_MODEL,
        "--api-key-from-keyring",
        "office-key",
        "--json",
    )
    assert added.code == 0, added.stderr
    entry = added.json()
    assert entry["remote"] == {"url": url, "model": DEFAULT_MODEL}  # type: ignore[index]
    return url


def test_chat_and_collections_use_a_remote_model(office: str, home: Path, tmp_path: Path) -> None:
    answer = cli(home, "chat", "Say hello.", "-m", "office", "--max-tokens", "8", "--json")
    assert answer.code == 0, answer.stderr
    reply = answer.json()
    assert reply["model"] == "office" and reply["answer"]  # type: ignore[index]
    assert reply["usage"]["completion_tokens"] > 0  # type: ignore[index]
    listed = {m["id"]: m for m in cli(home, "models", "list", "--json").json()}  # type: ignore[union-attr]
    assert listed["office"]["remote"]["url"] == office

    doc = tmp_path / "valves.txt"
    doc.write_text(MANUAL)
    assert cli(home, "collections", "create", "manual").code == 0
    assert cli(home, "collections", "add", "manual", str(doc)).code == 0
    grounded = cli(
        home,
        "chat",
        "What torque does the Orca main valve need?",
        "-c",
        "manual",
        "-m",
        "office",
        "--max-tokens",
        "24",
        "--json",
    )
    assert grounded.code == 0, grounded.stderr
    assert grounded.json()["citations"]  # type: ignore[index]


def test_the_own_server_serves_a_remote_model(office: str, home: Path) -> None:
    key = json.loads(bastion(home, "keys", "create", "me", "--json").stdout)["key"]
    url, process = start_server(home)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
        assert "office" in {m.id for m in client.models.list()}
        pieces = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="office",
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=8,
                stream=True,
            )
            if c.choices
        ]
        assert "".join(pieces)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_guard_lets_through_the_registered_host_during_its_calls_only(
    remote: tuple[str, str], home: Path
) -> None:
    from engine import Engine
    from engine.models.runtime import SamplingParams

    url, key = remote
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    engine = Engine(home)  # activates the guard in this process
    try:
        engine.secrets.set("office-key", key)
        engine.add_remote_model("office", url, DEFAULT_MODEL, "office-key")
        done = engine.complete("office", _messages("Hi"), SamplingParams(max_tokens=4))
        assert done.text
        with pytest.raises(NetworkBlocked):
            socket.create_connection((ADDRESS, port), timeout=5)
    finally:
        engine.close()


def _messages(text: str) -> list:  # type: ignore[type-arg]
    from engine.chat.templates import ChatMessage

    return [ChatMessage("user", text)]


def test_add_remote_refuses_bad_input_in_one_line(remote: tuple[str, str], home: Path) -> None:
    url, key = remote
    assert cli(home, "secrets", "set", "wrong", input="bst-wrong\n").code == 0
    assert_one_line_error(
        cli(home, "models", "add-remote", "x", "--url", url, "--api-key-from-keyring", "wrong"),
        2,
        "refused the API key",
    )
    assert_one_line_error(
        cli(home, "models", "add-remote", "x", "--url", url, "--api-key-from-keyring", "missing"),
        2,
        "no secret",
    )
    assert_one_line_error(
        cli(home, "models", "add-remote", "x", "--url", "ftp://box"), 2, "not an http"
    )
    assert cli(home, "secrets", "set", "right", input=key + "\n").code == 0
    assert_one_line_error(
        cli(
            home,
            "models",
            "add-remote",
            "x",
            "--url",
            url,
            "--model",
            "nope",
            "--api-key-from-keyring",
            "right",
        ),
        2,
        "does not list",
    )
    unreachable = cli(home, "models", "add-remote", "x", "--url", "http://127.0.0.1:9/v1")
    assert_one_line_error(unreachable, 1, "did not answer")
    assert "x" not in {m["id"] for m in cli(home, "models", "list", "--json").json()}  # type: ignore[union-attr]
