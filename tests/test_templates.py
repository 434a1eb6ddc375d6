"""Chat templates and fitting a conversation into the context window (pure functions)."""

from __future__ import annotations

import pytest

from engine.chat.context import MIN_ANSWER_TOKENS, fit_messages
from engine.chat.templates import ChatMessage, ChatTemplate
from engine.errors import ContextOverflow, OperationFailed
from engine.models.gguf_info import read_gguf_info
from tests.conftest import default_model_path

SYS = ChatMessage("system", "Be brief.")
USER = ChatMessage("user", "Hello")


def test_model_template_is_used() -> None:
    template = ChatTemplate(read_gguf_info(default_model_path()).chat_template)
    assert template.from_model
    text = template.render([SYS, USER])
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_model_without_a_template_gets_chatml_with_a_notice() -> None:
    template = ChatTemplate(None, model="bare")
    assert not template.from_model
    assert template.render([USER]).endswith("<|im_start|>assistant\n")
    assert template.notice is not None
    assert "'bare'" in template.notice and "ChatML" in template.notice
    own = ChatTemplate(read_gguf_info(default_model_path()).chat_template, model="m")
    assert own.notice is None


def test_a_template_that_does_not_compile_is_an_error_naming_the_model() -> None:
    # Never ChatML in its place: the model would get prompts in a format it was not
    # trained on, and answer badly with no sign of why.
    with pytest.raises(OperationFailed, match="'broken'") as failure:
        ChatTemplate("{% for m in messages %}{{ m.content ", model="broken")
    message = str(failure.value)
    assert "chat template" in message and "TemplateSyntaxError" in message
    assert "\n" not in message


def test_template_refusing_system_role_gets_it_merged() -> None:
    strict = (
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    )
    text = ChatTemplate(strict).render([SYS, USER])
    assert text == "[user] Be brief.\n\nHello\n"


def test_template_sandbox_blocks_python_internals() -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(OperationFailed, match="chat template failed"):
        ChatTemplate(evil).render([USER])


def _encode(messages: list[ChatMessage]) -> list[int]:
    """One token per word, plus one per message for the role marker."""
    return [0] * sum(len(m.content.split()) + 1 for m in messages)


def _history(turns: int) -> list[ChatMessage]:
    msgs = []
    for i in range(turns):
        msgs += [ChatMessage("user", f"q{i} " * 10), ChatMessage("assistant", f"a{i} " * 10)]
    return msgs


def test_everything_fits() -> None:
    fitted = fit_messages(SYS, _history(2), USER, _encode, n_ctx=1000, reserve=100)
    assert fitted.dropped == 0 and len(fitted.messages) == 6


def test_oldest_turns_dropped_system_kept() -> None:
    fitted = fit_messages(SYS, _history(10), USER, _encode, n_ctx=120, reserve=40)
    assert fitted.dropped > 0
    assert fitted.messages[0] == SYS and fitted.messages[-1] == USER
    assert fitted.messages[1].role == "user", "kept history starts with a user turn"
    assert len(fitted.tokens) <= 120 - 40
    # As much as fits: one more exchange would not.
    kept = len(fitted.messages) - 2
    assert len(_encode([SYS, *_history(10)[-(kept + 2) :], USER])) > 80


def test_question_alone_when_no_history_fits() -> None:
    fitted = fit_messages(SYS, _history(3), USER, _encode, n_ctx=40, reserve=30)
    assert fitted.messages == [SYS, USER] and fitted.dropped == 6


def test_prompt_alone_too_long() -> None:
    huge = ChatMessage("user", "word " * 500)
    with pytest.raises(ContextOverflow) as info:
        fit_messages(SYS, [], huge, _encode, n_ctx=256, reserve=64)
    assert "504 tokens" in str(info.value) and "256" in str(info.value)
    assert str(MIN_ANSWER_TOKENS) in str(info.value)
