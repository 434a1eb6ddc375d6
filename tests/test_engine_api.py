"""The engine's front door: every client type is exported, and the facade returns dataclasses."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import engine as api
from engine import (
    Citation,
    Config,
    DatasetPreview,
    Engine,
    InvalidInput,
    JobContext,
    LossCurve,
    ModelInfo,
    PrivacyStatus,
    StorageUsage,
)
from tests.conftest import DEFAULT_MODEL


def test_every_exported_name_resolves_and_importing_stays_light() -> None:
    code = (
        "import sys, engine\n"
        "missing = [n for n in engine.__all__ if getattr(engine, n, None) is None]\n"
        "heavy = [m for m in ('llama_cpp', 'torch', 'transformers', 'faiss', 'numpy')"
        " if m in sys.modules]\n"
        "print(missing, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "[] []", proc.stderr
    assert "Engine" in api.__all__ and "Citation" in api.__all__
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        api.Nope  # noqa: B018


def test_model_info_is_typed_and_its_json_keeps_the_contract(engine: Engine) -> None:
    info = engine.model_info(DEFAULT_MODEL)
    assert isinstance(info, ModelInfo)
    assert info.id == DEFAULT_MODEL and info.path.is_file()
    assert info.layers and info.layers > 0 and info.fit.context == info.load.context
    assert info.fit.runs_on in {"cpu", "gpu", "split"}
    public = info.to_public()
    json.dumps(public)  # JSON-ready all the way down
    for key in ("id", "arch", "params", "fit", "load", "hardware", "has_chat_template"):
        assert key in public
    assert public["fit"]["estimated_bytes"] == info.fit.estimated_bytes


def test_settings_are_validated_saved_and_announced_once(engine: Engine, home: Path) -> None:
    heard: list[tuple[Config, frozenset[str], str]] = []
    stop = engine.on_settings_changed(
        lambda config, changed: heard.append((config, changed, threading.current_thread().name))
    )
    assert engine.get_settings() == Config()
    updated = engine.update_settings(theme="dark", model_keep_alive_seconds=-1)
    assert updated.theme == "dark" and engine.get_settings() == updated
    assert heard == [(updated, frozenset({"theme", "model_keep_alive_seconds"}), "MainThread")]
    engine.update_settings(theme="dark")  # no change: nothing announced
    assert len(heard) == 1
    for bad in ({"theme": "pink"}, {"audit_log": 1}, {"nope": True}):
        with pytest.raises(InvalidInput):
            engine.update_settings(**bad)
    assert engine.get_settings() == updated and len(heard) == 1
    # A change written by another process is announced when this engine next reads.
    other = Engine(home)
    try:
        other.update_settings(audit_log=True)
    finally:
        other.close()
    assert engine.get_settings().audit_log
    assert heard[-1][1] == frozenset({"audit_log"})
    stop()
    engine.update_settings(theme="light")
    assert len(heard) == 2
    names = [s.name for s in engine.describe_settings()]
    assert names == [f.name for f in dataclasses.fields(Config)]
    theme = next(s for s in engine.describe_settings() if s.name == "theme")
    assert theme.choices == ("system", "light", "dark") and theme.doc


def test_a_broken_listener_does_not_stop_a_change(engine: Engine) -> None:
    heard: list[str] = []

    def broken(config: Config, changed: frozenset[str]) -> None:
        raise RuntimeError("listener bug")

    engine.on_settings_changed(broken)
    engine.on_settings_changed(lambda config, changed: heard.append(config.theme))
    engine.update_settings(theme="light")
    assert heard == ["light"] and engine.get_settings().theme == "light"


def test_privacy_status_and_storage_usage(engine: Engine, home: Path) -> None:
    status = engine.privacy_status()
    assert isinstance(status, PrivacyStatus)
    assert status.guard_active and not status.offline_missing and not status.telemetry_missing
    assert status.audit_log is False and status.audit_log_path.parent == home / "logs"
    reports: list[str] = []
    usage = engine.storage_usage(JobContext(on_progress=lambda p: reports.append(p.label)))
    assert isinstance(usage, StorageUsage)
    db = usage.areas["Database (conversations, document text, model list)"]
    assert db >= (home / "bastion.db").stat().st_size > 0
    assert usage.total == sum(usage.areas.values()) and len(reports) == len(usage.areas)


def test_dataset_preview_and_loss_curve(engine: Engine, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": f"Write to ann{i}@example.com."}]}
        for i in range(6)
    ]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n", encoding="utf-8")
    preview = engine.training.preview_dataset(data, DEFAULT_MODEL, val_fraction=0.2)
    assert isinstance(preview, DatasetPreview)
    assert preview.check.examples == 6 and [b.line for b in preview.check.bad_lines] == [7]
    assert not preview.check.usable and preview.check.pii.get("EMAIL") == 6
    assert preview.prepared is not None and preview.prepared.redactions.get("EMAIL") == 6
    assert preview.prepared.sample and "ann" in preview.prepared.sample[0].before
    assert not preview.prepared.out_path.exists()  # the dry run left nothing behind
    assert preview.check.to_public()["bad_lines"] == [
        {"line": 7, "error": preview.check.bad_lines[0].error}
    ]
    assert engine.training.loss_curve("no-such-run") == LossCurve([], [])
    assert engine.training.get_run("no-such-run") is None


def test_stored_citations_come_back_as_citations(engine: Engine) -> None:
    conversation = engine.conversations.create(DEFAULT_MODEL, title="t")
    answer = engine.conversations.add_message(conversation.id, "assistant", "See [1].")
    cited = Citation(n=1, path="/docs/a.pdf", page=3, snippet="text", score=0.5)
    engine.conversations.set_citations(answer.id, [cited.to_public()])
    _, messages = engine.get_conversation(conversation.id)
    assert messages[-1].citations == (cited,)
    assert json.loads(json.dumps(messages[-1].to_dict()))["citations"][0]["page"] == 3
