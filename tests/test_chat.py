"""Chat through the engine with the real llama.cpp and the default model."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from engine import Engine
from engine.chat.session import ChatRequest
from engine.errors import Cancelled, ContextOverflow, InvalidInput, NotFound
from engine.jobs import JobContext
from engine.models.runtime import SamplingParams
from tests.conftest import DEFAULT_MODEL

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def test_default_model_is_listed_in_a_fresh_home(engine: Engine) -> None:
    models = {m.id: m for m in engine.list_models()}
    assert DEFAULT_MODEL in models
    entry = models[DEFAULT_MODEL]
    assert entry.builtin and entry.arch == "llama" and entry.quant == "Q4_1"
    assert engine.default_model_id() == DEFAULT_MODEL


def test_answer_streams_and_is_stored(engine: Engine) -> None:
    pieces: list[str] = []
    result = engine.chat(ChatRequest("Name a color.", sampling=GREEDY), on_text=pieces.append)
    assert len(pieces) > 1, "tokens should arrive one by one"
    assert "".join(pieces).rstrip() == result.answer
    assert result.answer and result.model == DEFAULT_MODEL
    assert result.prompt_tokens > 5 and 0 < result.completion_tokens <= 24
    assert result.ttft_s is not None and result.ttft_s > 0
    conv, messages = engine.get_conversation(result.conversation_id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[0].content == "Name a color."
    answer = messages[1]
    assert answer.content == result.answer and not answer.interrupted
    assert answer.completion_tokens == result.completion_tokens
    assert answer.tokens_per_second is None or answer.tokens_per_second > 0
    assert conv.title == "Name a color." and conv.model == DEFAULT_MODEL


def test_same_seed_same_answer(engine: Engine) -> None:
    sampling = SamplingParams(max_tokens=16, temperature=0.9, seed=1234)
    first = engine.chat(ChatRequest("Tell me a word.", sampling=sampling))
    second = engine.chat(ChatRequest("Tell me a word.", sampling=sampling))
    assert first.answer == second.answer
    assert first.conversation_id != second.conversation_id


def test_continuing_a_conversation_sends_the_history(engine: Engine) -> None:
    first = engine.chat(ChatRequest("My name is Ada.", sampling=GREEDY))
    second = engine.chat(
        ChatRequest("What is my name?", conversation_id=first.conversation_id, sampling=GREEDY)
    )
    assert second.conversation_id == first.conversation_id
    assert second.prompt_tokens > first.prompt_tokens + first.completion_tokens
    _, messages = engine.get_conversation(first.conversation_id)
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]


def test_system_prompt_is_kept_with_the_conversation(engine: Engine) -> None:
    result = engine.chat(ChatRequest("Hi", system="Answer in one word.", sampling=GREEDY))
    conv, _ = engine.get_conversation(result.conversation_id)
    assert conv.system_prompt == "Answer in one word."
    follow = engine.chat(
        ChatRequest("Again", conversation_id=result.conversation_id, sampling=GREEDY)
    )
    # The system prompt is part of the second prompt too.
    assert follow.prompt_tokens > result.prompt_tokens


def test_empty_prompt_is_refused_and_nothing_stored(engine: Engine) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        engine.chat(ChatRequest("   \n"))
    assert engine.list_conversations() == []


def test_unknown_model_and_conversation(engine: Engine) -> None:
    with pytest.raises(NotFound, match="no model 'nope'"):
        engine.chat(ChatRequest("Hi", model_id="nope"))
    with pytest.raises(NotFound):
        engine.chat(ChatRequest("Hi", conversation_id=999))
    assert engine.list_conversations() == []


def test_prompt_longer_than_context_is_refused_with_numbers(engine: Engine) -> None:
    engine.set_model_settings(DEFAULT_MODEL, context=256)
    with pytest.raises(ContextOverflow) as info:
        engine.chat(ChatRequest("lighthouse " * 400, sampling=GREEDY))
    message = str(info.value)
    assert "256" in message and "tokens" in message
    assert engine.list_conversations() == []


def test_old_turns_are_dropped_when_the_context_fills(engine: Engine) -> None:
    engine.set_model_settings(DEFAULT_MODEL, context=512)
    notices: list[str] = []
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    conv_id = None
    for i in range(8):
        result = engine.chat(
            ChatRequest(
                f"Fact {i}: " + "the keeper lit the lamp at dusk. " * 12,
                conversation_id=conv_id,
                system="Be brief.",
                sampling=sampling,
            ),
            on_notice=notices.append,
        )
        conv_id = result.conversation_id
        assert result.prompt_tokens + 8 <= 512
    assert result.dropped_messages > 0
    assert notices and "oldest" in notices[-1]
    # Everything is still in the history, even what the model no longer sees.
    _, messages = engine.get_conversation(conv_id)
    assert len(messages) == 16


def test_cancel_keeps_the_partial_answer_marked_interrupted(engine: Engine) -> None:
    job = JobContext()
    pieces: list[str] = []

    def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 5:
            job.cancel()

    result = engine.chat(
        ChatRequest(
            "Write a long story about a lighthouse.",
            sampling=SamplingParams(max_tokens=400, temperature=0.0),
        ),
        job,
        on_text=on_text,
    )
    assert result.interrupted and result.stop_reason == "cancelled"
    assert 5 <= result.completion_tokens <= 7
    _, messages = engine.get_conversation(result.conversation_id)
    assert messages[-1].interrupted
    assert messages[-1].content == result.answer == "".join(pieces).strip()


def test_cancel_before_generation_writes_nothing(engine: Engine) -> None:
    job = JobContext()
    job.cancel()
    with pytest.raises(Cancelled):
        engine.chat(ChatRequest("Hello", sampling=GREEDY), job)
    assert engine.list_conversations() == []


def test_answer_is_saved_while_it_streams(engine: Engine, home: Path) -> None:
    """A kill mid-answer loses at most the last half second: the row grows during streaming."""
    seen_in_db: list[str] = []
    db = sqlite3.connect(home / "bastion.db")

    def on_text(_text: str) -> None:
        row = db.execute(
            "SELECT content FROM messages WHERE role = 'assistant' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        seen_in_db.append(row[0] if row else "")

    from engine.chat import session

    session.SAVE_INTERVAL_S, saved = 0.0, session.SAVE_INTERVAL_S
    try:
        engine.chat(
            ChatRequest(
                "Count to twenty.", sampling=SamplingParams(max_tokens=40, temperature=0.0)
            ),
            on_text=on_text,
        )
    finally:
        session.SAVE_INTERVAL_S = saved
    db.close()
    assert any(seen_in_db[i] for i in range(len(seen_in_db) // 2)), seen_in_db
