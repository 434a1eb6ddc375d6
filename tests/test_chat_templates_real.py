"""Real models' chat templates render byte for byte as transformers renders them.

The templates are the ones their model repositories publish (tests/data/chat_templates,
see SOURCES.md). The reference is transformers' own renderer, ``render_jinja_template``,
which is what ``tokenizer.apply_chat_template`` calls, given the same BOS and EOS texts.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import TemplateError
from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

from engine import Engine
from engine.chat.sandbox import compile_template
from engine.chat.session import ChatRequest
from engine.chat.templates import ChatMessage, ChatTemplate
from engine.errors import OperationFailed
from engine.models.runtime import SamplingParams

DATA = Path(__file__).parent / "data" / "chat_templates"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Each family: its BOS and EOS texts, and how its prompt for CONVERSATION must end (a
# check that does not depend on transformers, so that a shared mistake cannot pass).
IM_END = "<|im_start|>user\nWhat is 2+2? — café 🙂<|im_end|>\n<|im_start|>assistant\n"
LLAMA3_END = (
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2? — café 🙂<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>", LLAMA3_END),
    "meta-llama-Llama-3.2-3B-Instruct": ("<|begin_of_text|>", "<|eot_id|>", LLAMA3_END),
    "Qwen-Qwen2.5-7B-Instruct": ("", "<|im_end|>", IM_END),
    "Qwen-Qwen3-0.6B": ("", "<|im_end|>", IM_END),
    "mistralai-Mistral-Nemo-Instruct-2407": (
        "<s>",
        "</s>",
        "[INST]Be brief.\n\nWhat is 2+2? — café 🙂[/INST]",
    ),
    "google-gemma-2-2b-it": (
        "<bos>",
        "<eos>",
        "<start_of_turn>user\nWhat is 2+2? — café 🙂<end_of_turn>\n<start_of_turn>model\n",
    ),
    "microsoft-Phi-3.5-mini-instruct": (
        "<s>",
        "<|endoftext|>",
        "<|user|>\nWhat is 2+2? — café 🙂<|end|>\n<|assistant|>\n",
    ),
    "HuggingFaceTB-SmolLM3-3B": ("", "<|im_end|>", IM_END),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": (
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "<｜User｜>What is 2+2? — café 🙂<｜Assistant｜><think>\n</think>",
    ),
    "LFM2.5-8B-A1B": ("<|startoftext|>", "<|im_end|>", IM_END),
}
# Templates that refuse a system message: Bastion merges it into the first user turn.
REFUSE_SYSTEM = {"google-gemma-2-2b-it"}

CONVERSATION = [
    ChatMessage("system", "Be brief."),
    ChatMessage("user", 'Hi, "quoted" <b>tags</b>'),
    ChatMessage("assistant", "Hello! {{ not a template }}"),
    ChatMessage("user", "What is 2+2? — café 🙂"),
]
FINISHED = [*CONVERSATION, ChatMessage("assistant", "4.")]  # as training renders it


def _payload(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _reference(
    source: str, messages: list[ChatMessage], add_generation_prompt: bool, bos: str, eos: str
) -> str:
    """What transformers renders (its ``apply_chat_template`` passes the same variables)."""
    rendered, _ = render_jinja_template(
        [_payload(messages)],
        chat_template=source,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos,
        eos_token=eos,
    )
    return str(rendered[0])


def _merged(messages: list[ChatMessage]) -> list[ChatMessage]:
    system, first, *rest = messages
    return [ChatMessage("user", f"{system.content}\n\n{first.content}"), *rest]


def test_the_test_data_is_complete() -> None:
    files = sorted(p.stem for p in DATA.glob("*.jinja"))
    assert files == sorted(FAMILIES) and len(files) >= 6
    sources = (DATA / "SOURCES.md").read_text(encoding="utf-8")
    assert "models/templates" in sources and "llama-cpp-python 0.3.36" in sources
    for name in files:
        assert f"`{name}.jinja`" in sources, f"SOURCES.md does not name {name}.jinja"
    assert any("{%- generation -%}" in (DATA / f"{n}.jinja").read_text() for n in files)


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["prompt", "finished"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_real_template_renders_as_transformers_does(
    family: str, add_generation_prompt: bool
) -> None:
    source = (DATA / f"{family}.jinja").read_text(encoding="utf-8")
    bos, eos, ending = FAMILIES[family]
    messages = CONVERSATION if add_generation_prompt else FINISHED
    template = ChatTemplate(source, bos, eos, model=family)
    assert template.from_model and template.notice is None

    reference_messages = messages
    if family in REFUSE_SYSTEM:
        with pytest.raises(TemplateError, match="System role not supported"):
            _reference(source, messages, add_generation_prompt, bos, eos)
        reference_messages = _merged(messages)
    ours = template.render(messages, add_generation_prompt)
    theirs = _reference(source, reference_messages, add_generation_prompt, bos, eos)
    if ours != theirs:  # a template that prints today's date, rendered across midnight
        ours = template.render(messages, add_generation_prompt)
    assert ours == theirs

    assert 'Hi, "quoted" <b>tags</b>' in ours and "Hello! {{ not a template }}" in ours
    if add_generation_prompt:
        assert ours.endswith(ending), ours[-200:]
    else:
        assert "4." in ours and not ours.endswith(ending)


GENERATION = (
    "{% for m in messages %}{{ '<' + m.role + '>' }}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content + eos_token }}{% endgeneration %}"
    "{% else %}{{ m.content }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_generation_blocks_render() -> None:
    # {% generation %} marks the assistant's text for transformers' assistant masks; it
    # used to send the template to ChatML without a word.
    template = ChatTemplate(GENERATION, eos_token="</s>", model="masks")
    assert template.from_model
    text = template.render(FINISHED[1:], add_generation_prompt=False)
    assert text == _reference(GENERATION, FINISHED[1:], False, "", "</s>")
    assert "<assistant>Hello! {{ not a template }}</s><user>" in text and text.endswith("4.</s>")


@pytest.mark.parametrize(
    ("expression", "arguments"),
    [
        ("tojson", {}),
        ("tojson(indent=2)", {"indent": 2}),
        ("tojson(separators=(',', ':'))", {"separators": (",", ":")}),
        ("tojson(indent=2, separators=(',', ': '), sort_keys=true)", {
            "indent": 2, "separators": (",", ": "), "sort_keys": True}),
        ("tojson(ensure_ascii=true)", {"ensure_ascii": True}),
        ("tojson(indent='\\t')", {"indent": "\t"}),
    ],
)  # fmt: skip
def test_tojson_takes_hugging_faces_arguments(expression: str, arguments: dict[str, Any]) -> None:
    source = "{{ messages | " + expression + " }}"
    text = ChatTemplate(source, model="json").render(CONVERSATION)
    assert text == _reference(source, CONVERSATION, True, "", "")
    options = {"ensure_ascii": False, **arguments}
    assert text == json.dumps(_payload(CONVERSATION), **options)


def test_two_name_loop_targets_compile() -> None:
    # Llama 3.1 and Mistral Nemo loop with "for name, value in ...": the earlier sandbox
    # failed to compile them and rendered their models' prompts in ChatML instead.
    source = (
        "{% for key, value in {'a': 1, 'b': [2]}.items() %}{{ key }}={{ value }};{% endfor %}"
        "{% set x, y = 'x', messages | length %}{{ x }}{{ y }}"
    )
    text = ChatTemplate(source, model="loops").render(CONVERSATION)
    assert text == "a=1;b=[2];x4" == _reference(source, CONVERSATION, True, "", "")


def test_no_tools_or_documents_is_none_as_in_transformers() -> None:
    # transformers passes tools=None and documents=None; "tools is not none" on an unset
    # variable would be true, and a template would announce tools the model does not have.
    source = "{{ tools is none }} {{ documents is none }} {{ tools is not none }}"
    text = ChatTemplate(source, model="tools").render(CONVERSATION)
    assert text == "True True False" == _reference(source, CONVERSATION, True, "", "")


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("{% for m in messages %}{{ m.content ", "could not be compiled: TemplateSyntaxError"),
        ("{% if true %}{{ 1 }}", "could not be compiled"),
        ("{{ raise_exception('Only user and assistant roles are supported') }}", "refused"),
        ("{{ no_such_thing.attribute }}", "UndefinedError"),
        ("{{ messages | tojson(indent=10**9) }}", "too large"),
        (
            "{{ (range(1000) | list) | tojson(separators=('x' * 100000, ':')) }}",
            "JSON text would be more than",
        ),
    ],
)
def test_a_template_that_cannot_render_is_an_error_naming_the_model(
    source: str, reason: str
) -> None:
    with pytest.raises(OperationFailed, match="'acme-7b'") as failure:
        ChatTemplate(source, "<s>", "</s>", model="acme-7b").render(CONVERSATION)
    message = str(failure.value)
    assert "chat template" in message and reason in message, message
    assert "\n" not in message and len(message) < 500


def test_a_wide_json_text_is_refused_before_it_is_made() -> None:
    # 100,000 items indented by 1,000 spaces would make some 100 MB of text.
    source = "{{ (range(100000) | list) | tojson(indent=1000) }}"
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(OperationFailed, match="JSON text would be more than"):
            ChatTemplate(source, model="wide").render(CONVERSATION)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 * 1024 and time.monotonic() - started < 30


def test_a_long_message_still_goes_through_tojson() -> None:
    # The JSON check counts escapes, not a worst case: 6 MB of plain text is 6 MB of JSON.
    long_text = "word, " * 1_000_000
    source = "{{ messages[0].content | tojson }}"
    text = ChatTemplate(source, model="long").render([ChatMessage("user", long_text)])
    assert text == json.dumps(long_text)


def test_the_environment_is_hugging_faces() -> None:
    # A transformers upgrade that changes its environment must show up here, not as a
    # prompt that differs from what the model was trained on.
    ours = compile_template("").environment
    theirs = _compile_jinja_template("").environment
    assert isinstance(ours, type(theirs))
    assert [type(e) for e in ours.extensions.values()] == [
        type(e) for e in theirs.extensions.values()
    ]
    for option in (
        "trim_blocks",
        "lstrip_blocks",
        "keep_trailing_newline",
        "newline_sequence",
        "autoescape",
        "undefined",
        "block_start_string",
        "variable_start_string",
        "comment_start_string",
        "line_statement_prefix",
        "line_comment_prefix",
    ):
        assert getattr(ours, option) == getattr(theirs, option), option
    assert set(ours.filters) == set(theirs.filters)
    assert ours.filters["tojson"].__wrapped__ is theirs.filters["tojson"]
    assert set(ours.tests) == set(theirs.tests)
    # lipsum makes text of any size and no chat template uses it.
    assert set(ours.globals) == set(theirs.globals) - {"lipsum"}
    for name in ("raise_exception", "strftime_now"):
        assert ours.globals[name] is theirs.globals[name]


def test_chat_does_not_import_torch_and_transformers_only_on_first_render() -> None:
    code = (
        "import sys, time\n"
        "from engine.chat.templates import ChatMessage, ChatTemplate\n"
        "assert 'transformers' not in sys.modules, 'imported with the module'\n"
        "started = time.perf_counter()\n"
        "ChatTemplate(None).render([ChatMessage('user', 'hi')])\n"
        "print(f'first render: {time.perf_counter() - started:.2f} s', file=sys.stderr)\n"
        "assert 'transformers' in sys.modules\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_a_model_without_a_template_is_told_once(engine: Engine, model_copy: Path) -> None:
    engine.import_model(model_copy, "bare")
    with sqlite3.connect(engine.home / "bastion.db") as db:
        db.execute("UPDATE models SET chat_template = NULL WHERE id = 'bare'")
    notices: list[str] = []
    sampling = SamplingParams(max_tokens=2, temperature=0.0)
    first = engine.chat(
        ChatRequest("Hi", model_id="bare", sampling=sampling), None, None, notices.append
    )
    engine.chat(
        ChatRequest(
            "And?", model_id="bare", conversation_id=first.conversation_id, sampling=sampling
        ),
        on_notice=notices.append,
    )
    assert len(notices) == 1 and "'bare'" in notices[0] and "ChatML" in notices[0], notices
