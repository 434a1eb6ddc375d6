"""Settings in config.toml, and the audit log that records chats only when switched on."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest

from engine import Engine
from engine.chat.session import ChatRequest
from engine.config import Config, config_path, dumps_toml, load_config, update_config
from engine.errors import InvalidInput
from engine.jobs import JobContext
from engine.models.runtime import SamplingParams
from engine.privacy.audit import AuditLog, audit_log_path
from tests.conftest import DEFAULT_MODEL

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


# -- config.toml ------------------------------------------------------------------------


def test_missing_config_gives_private_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path) == Config(audit_log=False, theme="system")
    assert not config_path(tmp_path).exists()


def test_update_writes_toml_and_reads_back(tmp_path: Path) -> None:
    updated = update_config(tmp_path, audit_log=True, theme="dark")
    assert updated == Config(audit_log=True, theme="dark")
    raw = tomllib.loads(config_path(tmp_path).read_text(encoding="utf-8"))
    assert raw == {
        "audit_log": True,
        "audit_server_text": False,
        "theme": "dark",
        "model_keep_alive_seconds": 300,
    }
    assert load_config(tmp_path) == updated
    assert update_config(tmp_path, audit_log=False).theme == "dark"
    # No temporary file is left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_unknown_keys_survive_a_rewrite(tmp_path: Path) -> None:
    config_path(tmp_path).write_text(
        'future_option = "keep me"\nlimit = 3\n\n[server]\nport = 8080\n', encoding="utf-8"
    )
    update_config(tmp_path, audit_log=True)
    raw = tomllib.loads(config_path(tmp_path).read_text(encoding="utf-8"))
    assert raw["future_option"] == "keep me" and raw["limit"] == 3
    assert raw["server"] == {"port": 8080}
    assert raw["audit_log"] is True


@pytest.mark.parametrize(
    "changes", [{"nope": True}, {"audit_log": "yes"}, {"audit_log": 1}, {"theme": "pink"}]
)
def test_bad_changes_are_refused_and_nothing_written(
    tmp_path: Path, changes: dict[str, object]
) -> None:
    with pytest.raises(InvalidInput):
        update_config(tmp_path, **changes)
    assert not config_path(tmp_path).exists()


def test_broken_or_mistyped_file_falls_back_to_defaults(tmp_path: Path) -> None:
    config_path(tmp_path).write_text("audit_log = [unclosed\n", encoding="utf-8")
    assert load_config(tmp_path) == Config()
    config_path(tmp_path).write_text('audit_log = "true"\ntheme = "pink"\n', encoding="utf-8")
    assert load_config(tmp_path) == Config()


def test_toml_writer_round_trips_awkward_strings() -> None:
    data = {
        "text": 'quote " backslash \\ newline \n tab \t del \x7f bell \x07 é 漢',
        "flag": False,
        "ratio": 0.25,
        "items": [1, 2, 3],
        "dotted.key": "x",
        "table": {"inner": "y"},
    }
    assert tomllib.loads(dumps_toml(data)) == data


# -- the audit log ------------------------------------------------------------------------


def test_audit_log_off_writes_nothing(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    assert not audit.enabled
    assert audit.record_answer(model="m", prompt="secret question", answer="a") is False
    assert not audit_log_path(tmp_path).exists()
    assert not (tmp_path / "logs").exists()


def test_audit_log_on_appends_private_json_lines(tmp_path: Path) -> None:
    update_config(tmp_path, audit_log=True)
    audit = AuditLog(tmp_path)
    assert audit.record_answer(model="m1", prompt="first?", answer="one", conversation_id=3)
    assert audit.record_answer(model="m2", prompt="second?", answer="two\nlines")
    path = audit_log_path(tmp_path)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["model"], r["prompt"], r["answer"]) for r in records] == [
        ("m1", "first?", "one"),
        ("m2", "second?", "two\nlines"),
    ]
    assert records[0]["conversation_id"] == 3 and records[0]["event"] == "chat"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_chat_answers_land_in_the_audit_log_only_while_it_is_on(engine: Engine) -> None:
    home = engine.home
    path = audit_log_path(home)
    engine.chat(ChatRequest("What colour is the sky, audit-off-1?", sampling=GREEDY))
    assert not path.exists()

    update_config(home, audit_log=True)  # what the desktop app's switch does
    result = engine.chat(
        ChatRequest("Name a fruit, audit-on.", system="Be brief.", sampling=GREEDY)
    )
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["prompt"] == "Name a fruit, audit-on."
    assert record["answer"] == result.answer and result.answer
    assert record["model"] == DEFAULT_MODEL
    assert record["system"] == "Be brief."
    assert record["conversation_id"] == result.conversation_id
    assert record["message_id"] == result.message_id
    assert record["stop_reason"] == result.stop_reason

    update_config(home, audit_log=False)
    engine.chat(ChatRequest("And a vegetable, audit-off-2?", sampling=GREEDY))
    assert path.read_text(encoding="utf-8").splitlines() == lines

    # Bastion's own log never holds the prompts, with the audit log on or off.
    own_log = (home / "logs" / "bastion.log").read_text(encoding="utf-8")
    for marker in ("audit-off-1", "audit-on", "audit-off-2"):
        assert marker not in own_log


def test_cancelled_and_source_less_turns_are_audited_too(engine: Engine) -> None:
    update_config(engine.home, audit_log=True)
    job = JobContext()
    pieces: list[str] = []

    def cancel_after_three(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3:
            job.cancel()

    long = SamplingParams(max_tokens=200, temperature=0.0)
    cancelled = engine.chat(
        ChatRequest("Tell a long story, audit-cancel.", sampling=long), job, cancel_after_three
    )
    engine.documents.create("empty-notes")
    unanswered = engine.chat(
        ChatRequest("What do my notes say?", collection="empty-notes", sampling=GREEDY)
    )
    lines = audit_log_path(engine.home).read_text(encoding="utf-8").splitlines()
    first, second = (json.loads(line) for line in lines)
    assert cancelled.interrupted and first["stop_reason"] == "cancelled"
    assert first["answer"] == cancelled.answer and "collection" not in first
    assert unanswered.stop_reason == second["stop_reason"] == "no_sources"
    assert second["collection"] == "empty-notes"
    assert second["answer"] == unanswered.answer and "empty-notes" in second["answer"]
    assert second["message_id"] == unanswered.message_id


def test_server_requests_are_recorded_without_text_unless_asked_and_rotated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.privacy import audit as audit_module

    log = AuditLog(tmp_path)
    ask = {
        "key": "alice",
        "model": "m",
        "endpoint": "/v1/chat/completions",
        "status": 200,
        "latency_ms": 12.3,
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "prompt": "the question",
        "answer": "the answer",
    }
    assert not log.record_request(**ask)  # off by default: nothing written
    assert not audit_log_path(tmp_path).exists()
    update_config(tmp_path, audit_log=True)
    assert log.record_request(**ask)
    record = json.loads(audit_log_path(tmp_path).read_text().splitlines()[-1])
    assert record["key"] == "alice" and record["completion_tokens"] == 7
    assert "prompt" not in record and "answer" not in record
    update_config(tmp_path, audit_server_text=True)
    assert log.record_request(**ask)
    record = json.loads(audit_log_path(tmp_path).read_text().splitlines()[-1])
    assert record["prompt"] == "the question" and record["answer"] == "the answer"

    monkeypatch.setattr(audit_module, "ROTATE_BYTES", 200)
    for _ in range(12):
        log.record_request(**ask)
    rotated = sorted(p.name for p in audit_log_path(tmp_path).parent.iterdir())
    assert rotated[:2] == ["audit.log", "audit.log.1"]
    assert len(rotated) <= 1 + audit_module.KEEP_ROTATED
    assert audit_log_path(tmp_path).stat().st_size <= 200 + 400
