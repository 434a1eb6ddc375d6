"""The Server page: keys made and revoked, the server started and stopped, its activity."""

from __future__ import annotations

import socket
from typing import Any

import openai
import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication

from tests.conftest import DEFAULT_MODEL

WAIT_MS = 120_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_key(page: Any, qtbot: Any, name: str, rpm: int = 0) -> str:
    before = page.keys.topLevelItemCount()
    page.key_name.setText(name)
    page.rpm.setValue(rpm)
    qtbot.mouseClick(page.create_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.keys.topLevelItemCount() == before + 1, timeout=WAIT_MS)
    assert page.new_key.isVisible() and page.new_key.text().startswith("bst-")
    return str(page.new_key.text())


def test_keys_serving_and_activity(window: Any, qtbot: Any, tmp_path: Any) -> None:
    window.show_page("Server")
    page = window.server
    key = make_key(page, qtbot, "alice")
    qtbot.mouseClick(page.copy_button, Qt.MouseButton.LeftButton)
    assert QGuiApplication.clipboard().text() == key
    slow = make_key(page, qtbot, "slow", rpm=1)

    port = free_port()
    page.port.setValue(port)
    qtbot.mouseClick(page.start_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(page.stop_button.isEnabled, timeout=WAIT_MS)
    url = f"http://127.0.0.1:{port}/v1"
    assert url in page.state.text()
    window.grab().save(str(tmp_path / "server-page.png"))

    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert answer.choices[0].message.content is not None
    limited = openai.OpenAI(base_url=url, api_key=slow, max_retries=0, timeout=60)
    limited.models.list()
    limited.embeddings.create(model="all-minilm-l6-v2", input="x")
    with pytest.raises(openai.RateLimitError):
        limited.embeddings.create(model="all-minilm-l6-v2", input="x")
    qtbot.waitUntil(lambda: "served 2" in page.counts.text(), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: "(429) 1" in page.counts.text(), timeout=WAIT_MS)
    assert page.recent.topLevelItemCount() >= 2
    assert {page.recent.topLevelItem(i).text(4) for i in range(2)} == {"200"}

    page.keys.setCurrentItem(page.keys.findItems("alice", Qt.MatchFlag.MatchExactly)[0])
    qtbot.mouseClick(page.revoke_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.keys.topLevelItemCount() == 1, timeout=WAIT_MS)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()

    qtbot.mouseClick(page.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(page.start_button.isEnabled, timeout=WAIT_MS)
    assert page.state.text() == "Stopped."
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # no longer listening


def test_the_office_network_needs_a_key(window: Any, qtbot: Any) -> None:
    window.show_page("Server")
    page = window.server
    page.address.setCurrentIndex(1)  # every address
    page.port.setValue(free_port())
    qtbot.mouseClick(page.start_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.state.text().startswith("Not started"), timeout=WAIT_MS)
    assert "needs API keys" in page.state.text()
    assert page.start_button.isEnabled() and not page.stop_button.isEnabled()
