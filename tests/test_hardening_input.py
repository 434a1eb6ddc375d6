"""Hostile and odd input never ends in "internal error": search text, JSONL lines, GGUF
headers, a full disk on import, runaway chat templates, and fine-tune folders that belong
to another run.

Each test drives the real part (SQLite, the installed CLI, llama.cpp with the default
model) with the input that used to crash or hang it, and checks the contract: one clear
line, exit 2 for bad input and 1 for the machine, nothing left behind.
"""

from __future__ import annotations

import ast
import json
import os
import resource
import sqlite3
import struct
import subprocess
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.chat.context import MAX_CHARS_PER_TOKEN, fit_messages
from engine.chat.templates import ChatMessage, ChatTemplate
from engine.errors import ContextOverflow, InvalidInput, InvalidModelFile, OperationFailed
from engine.models.gguf_info import read_gguf_info
from engine.store.conversations import ConversationStore
from engine.store.db import Database
from engine.train.datasets import read_dataset
from tests.conftest import BIN, DEFAULT_MODEL, CLIResult, assert_one_line_error

REPO_ROOT = Path(__file__).resolve().parent.parent
USER = ChatMessage("user", "Hello")

CLI = Callable[..., CLIResult]


# --- history search: any text is searched or refused in one line -------------------


@pytest.fixture
def store(home: Path) -> ConversationStore:
    home.mkdir(parents=True, exist_ok=True)
    return ConversationStore(Database(home / "bastion.db"))


def test_history_search_with_bytes_that_are_not_utf8_is_one_line_error(cli: CLI) -> None:
    # The shell passes the raw bytes; Python hands them on as surrogate escapes.
    result = cli("history", "search", os.fsdecode(b"r\xe9sum\xe9"))
    assert_one_line_error(result, 2, "UTF-8")


def test_search_text_with_a_lone_surrogate_is_invalid_input(store: ConversationStore) -> None:
    with pytest.raises(InvalidInput, match="UTF-8"):
        store.search("abc \ud800")


def test_search_text_with_nul_characters_is_searched(store: ConversationStore) -> None:
    conversation = store.create("m")
    message = store.add_message(conversation.id, "user", "alpha beta gamma")
    # FTS5 reads its query as a C string: a NUL used to end it mid-phrase.
    assert [h.message_id for h in store.search("alpha\x00beta")] == [message.id]
    assert [h.message_id for h in store.search("\x00gamma\x00")] == [message.id]
    with pytest.raises(InvalidInput, match="empty"):
        store.search("\x00\x00")


def test_search_for_a_thousand_cjk_words_works(cli: CLI, store: ConversationStore) -> None:
    words = [chr(0x4E00 + 2 * i) + chr(0x4E01 + 2 * i) for i in range(1000)]
    conversation = store.create("m")
    message = store.add_message(conversation.id, "user", "".join(words))  # no spaces
    hits = store.search(" ".join(words))
    assert [h.message_id for h in hits] == [message.id]
    result = cli("history", "search", " ".join(words[:1000]), "--json")
    assert result.code == 0, result.stderr
    assert [h["message_id"] for h in result.json()] == [message.id]  # type: ignore[index]


def test_search_with_too_many_words_is_one_line_error(cli: CLI) -> None:
    words = " ".join(f"w{i}" for i in range(5000))
    assert_one_line_error(cli("history", "search", words), 2, "words")


# --- dataset lines: every odd line is a bad line with its number --------------------


def _lines_file(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_an_integer_of_5000_digits_is_a_bad_line(cli: CLI, tmp_path: Path) -> None:
    path = _lines_file(
        tmp_path / "big-int.jsonl",
        [b'{"text": "fine"}', b'{"text": "n", "n": ' + b"9" * 5000 + b"}", b'{"text": "ok"}'],
    )
    result = cli("dataset", "check", str(path), "--json")
    assert result.code == 2, result.stderr
    report = result.json()
    assert isinstance(report, dict)
    assert [b["line"] for b in report["bad_lines"]] == [2]
    assert "5,000 digits" in report["bad_lines"][0]["error"]
    assert report["examples"] == 2


# Each odd line and whether it is usable as a text example.
ODD_LINES: list[tuple[bytes, bool]] = [
    (b'{"text": "plain"}', True),
    (b'{"text": "n", "n": -' + b"1" * 4400 + b"}", False),  # int past Python's limit
    (b'{"text": "f", "n": 1' + b"0" * 5000 + b".5}", True),  # a long float is fine
    (b'{"text": "nan", "n": NaN}', True),
    (b'{"text": "inf", "n": -Infinity}', True),
    (b'{"text": NaN}', False),
    (b"[" * 100_000 + b"]" * 100_000, False),  # nesting beyond the recursion limit
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, False),
    (b'{"text": "escaped \\u0000 nul"}', True),
    (b'{"text": "raw \x00 nul"}', False),  # a control character inside a string
    (b'{"text": "lone \\ud800 surrogate"}', False),
    (b'{"text": "low \\udc80"}', False),
    (b'{"text": "pair \\ud83d\\ude00 is an emoji"}', True),
    (
        b'{"messages": [{"role": "user", "content": "q \\udfff"},'
        b' {"role": "assistant", "content": "a"}]}',
        False,
    ),
    (b'\xef\xbb\xbf{"text": "a byte order mark mid-file"}', True),
    (b'{"text": "crlf"}\r', True),
    (b'{"text": "tab\tinside"}', False),
    (b"\x00\x00\x00", False),
    (b'"just a string"', False),
    (b'{"text": "' + "\u2028 separators \u2029".encode() + b'"}', True),
    (b'{"text": ' + b'"x' + b"y" * 200_000 + b'"}', True),
    (b'{"role": "' + b"r" * 100_000 + b'"}', False),  # a huge value quoted in the error
    (b"{" + b'"k": 1, ' * 20_000 + b'"text": "many keys"}', True),
    (b"-" + b"9" * 100_000, False),
]


def test_fuzz_odd_jsonl_lines_are_reported_by_number(cli: CLI, tmp_path: Path) -> None:
    path = _lines_file(tmp_path / "odd.jsonl", [line for line, _ in ODD_LINES])
    expected_bad = [n for n, (_, ok) in enumerate(ODD_LINES, 1) if not ok]

    result = cli("dataset", "check", str(path), "--format", "text", "--json")
    assert result.code == 2, result.stderr
    assert "internal error" not in result.stderr
    report = result.json()
    assert isinstance(report, dict)
    assert [b["line"] for b in report["bad_lines"]] == expected_bad
    assert report["examples"] == len(ODD_LINES) - len(expected_bad)
    for bad in report["bad_lines"]:  # each reason is a short line, not the line quoted
        assert 0 < len(bad["error"]) < 300 and "\n" not in bad["error"], bad

    out = tmp_path / "prepared.jsonl"
    prepared = cli("dataset", "prepare", str(path), "--out", str(out), "--format", "text")
    assert prepared.code == 0, prepared.stderr
    # Split on newlines only: str.splitlines() also splits at U+2028 inside a string.
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert 0 < len(kept) <= len(ODD_LINES) - len(expected_bad)


CHAT_LINE = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def test_a_bad_line_quotes_at_most_a_little_of_the_line(tmp_path: Path) -> None:
    role = "r" * 100_000
    path = _lines_file(
        tmp_path / "role.jsonl",
        [
            json.dumps(CHAT_LINE).encode(),
            json.dumps({"messages": [{"role": role, "content": "q"}]}).encode(),
            b'{"messages": [{"role": "user", "content": "q"},'
            b' {"role": "assistant", "content": "cut \\ud83d"}]}',
        ],
    )
    role_line, surrogate_line = read_dataset(path).bad_lines
    assert role_line.line == 2 and "unknown role" in role_line.error
    assert len(role_line.error) < 300
    assert surrogate_line.line == 3
    assert "turn 2 (assistant) holds \\ud83d" in surrogate_line.error


def test_a_line_over_the_limit_is_a_bad_line(cli: CLI, tmp_path: Path) -> None:
    from engine.train.datasets import MAX_LINE_BYTES

    path = tmp_path / "huge-line.jsonl"
    with path.open("wb") as fh:
        fh.write(b'{"text": "before"}\n{"text": "')
        fh.write(b"y" * MAX_LINE_BYTES)
        fh.write(b'"}\n{"text": "after"}\n')
    result = cli("dataset", "check", str(path), "--json")
    assert result.code == 2, result.stderr
    report = result.json()
    assert isinstance(report, dict)
    assert [b["line"] for b in report["bad_lines"]] == [2]
    assert "longer than" in report["bad_lines"][0]["error"]
    assert report["examples"] == 2


def test_a_huge_line_is_skipped_without_holding_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as fh:
        fh.write(b'{"text": "before"}\n{"text": "')
        for _ in range(40):
            fh.write(b"z" * 2**20)
        fh.write(b'"}\n{"text": "after"}')  # the last line has no newline
    tracemalloc.start()
    try:
        report = read_dataset(path, max_line_bytes=2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [b.line for b in report.bad_lines] == [2]
    assert [e.line for e in report.examples] == [1, 3]
    assert peak < 8 * 2**20, peak  # the 40 MiB line was never held whole


# --- GGUF headers -------------------------------------------------------------------


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _nested_array_gguf(path: Path, depth: int) -> Path:
    """A GGUF header whose one extra key is an array of arrays ``depth`` levels deep."""
    string_type, array_type, uint32_type = 8, 9, 4
    kv = _gguf_string("general.architecture") + struct.pack("<I", string_type)
    kv += _gguf_string("llama")
    kv += _gguf_string("x.deep") + struct.pack("<I", array_type)
    kv += struct.pack("<IQ", array_type, 1) * depth + struct.pack("<IQ", uint32_type, 0)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kv + b"\0" * 64)
    return path


def test_deeply_nested_gguf_arrays_are_an_invalid_model(cli: CLI, tmp_path: Path) -> None:
    path = _nested_array_gguf(tmp_path / "deep.gguf", 100_000)
    with pytest.raises(InvalidModelFile, match="nested"):
        read_gguf_info(path)
    assert_one_line_error(cli("models", "import", str(path)), 2, "nested")
    # A little nesting is legal GGUF and still reads.
    assert read_gguf_info(_nested_array_gguf(tmp_path / "ok.gguf", 2)).architecture == "llama"


# --- models import --copy on a full disk --------------------------------------------


def test_import_copy_on_a_full_disk_is_one_line_and_leaves_nothing(
    cli: CLI, home: Path, model_copy: Path
) -> None:
    assert cli("models", "list").code == 0  # the home and its database exist

    def limit_file_size() -> None:
        # Files may not grow past 4 MiB: the copy of the 90 MB model hits it (EFBIG), as
        # it would hit a full disk (ENOSPC). Python ignores SIGXFSZ, so write() raises.
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))

    proc = subprocess.run(
        [str(BIN / "bastion"), "models", "import", str(model_copy), "--copy", "--id", "big"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BASTION_HOME": str(home)},
        preexec_fn=limit_file_size,
    )
    result = CLIResult(proc.returncode, proc.stdout, proc.stderr)
    assert_one_line_error(result, 1, "disk")
    assert list((home / "models").iterdir()) == []
    assert "big" not in {m["id"] for m in cli("models", "list", "--json").json()}  # type: ignore[union-attr]


def test_import_copy_is_fsynced_before_it_is_renamed(
    engine: object, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine import Engine

    assert isinstance(engine, Engine)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    entry = engine.import_model(tiny_gguf, "copied", copy=True)
    target = engine.home / "models" / tiny_gguf.name
    assert Path(entry.path) == target.resolve() and target.is_file()
    assert any(Path(p).parent == target.parent and p != str(target) for p in synced), synced
    assert sorted(p.name for p in target.parent.iterdir()) == [tiny_gguf.name]


# --- fine-tune folders: never delete what another run owns --------------------------


def _record_done_run(home: Path, name: str, run_dir: Path) -> None:
    with sqlite3.connect(home / "bastion.db") as db:
        db.execute(
            "INSERT INTO training_runs (name, base, base_source, status, run_dir, created_at, "
            "updated_at) VALUES (?, ?, ?, 'done', ?, '2025-01-01', '2025-01-01')",
            (name, DEFAULT_MODEL, DEFAULT_MODEL, str(run_dir)),
        )


def test_reusing_a_removed_fine_tunes_name_keeps_the_old_runs_files(
    cli: CLI, home: Path, tmp_path: Path
) -> None:
    assert cli("models", "list").code == 0
    old = home / "adapters" / "reused"
    old.mkdir(parents=True)
    (old / "reused.lora.gguf").write_bytes(b"the old adapter")
    (old / "report.md").write_text("the old report")
    _record_done_run(home, "reused", old)  # the model itself was removed: the run stays
    leftover = home / "adapters" / "other"  # a run of another name, not yet recorded
    leftover.mkdir()
    (leftover / "prepared.jsonl").write_text("{}")

    # Long prompts and --max-length 16: refused after the data is prepared, before training.
    data = tmp_path / "long.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": "word " * 200 + str(i)},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for i in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("reused", "other"):
        result = cli(
            "finetune",
            "--base",
            DEFAULT_MODEL,
            "--data",
            str(data),
            "--name",
            name,
            "--max-length",
            "16",
        )
        assert_one_line_error(result, 2, "max-length")

    assert (old / "reused.lora.gguf").read_bytes() == b"the old adapter"
    assert (old / "report.md").read_text() == "the old report"
    assert (leftover / "prepared.jsonl").read_text() == "{}"
    # The refused attempts left no folder of their own behind.
    assert sorted(p.name for p in (home / "adapters").iterdir()) == ["other", "reused"]


def test_each_run_claims_a_folder_of_its_own(tmp_path: Path) -> None:
    from engine.train.finetune import claim_run_dir

    adapters = tmp_path / "adapters"
    first = claim_run_dir(adapters, "tune")
    second = claim_run_dir(adapters, "tune")
    third = claim_run_dir(adapters, "tune")
    assert first == adapters / "tune"
    assert len({first, second, third}) == 3
    assert all(p.is_dir() and p.parent == adapters for p in (first, second, third))
    assert all(p.name.startswith("tune") for p in (second, third))


# --- chat templates from model files: bounded in time and size ----------------------

RUNAWAY_TEMPLATES = {
    "huge string": "{{ 'x' * 10**10 }}",
    "huge power": "{{ 10 ** (10 ** 10) }}",
    "huge list": "{{ (range(100000) | list) * 100000 }}",
    "filter width": "{{ 'x' | center(10**10) }}",
    "method width": "{{ 'x'.ljust(10**10) }}",
    "indent width": "{{ ('a\\n' * 100000) | indent(100000) }}",
    "format width": "{{ '%99999999999d' % 1 }}",
    "str.format width": "{{ '{:99999999999}'.format(1) }}",
    "str.format width argument": "{{ '{:{w}}'.format(1, w=10**10) }}",
    "doubling by ~": "{% set x = 'xxxxxxxxxx' %}" + "{% set x = x ~ x %}" * 40 + "{{ x }}",
    "doubling in a namespace": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}"
    ),
    "doubling by recursion": (
        "{% macro twice(s, n) %}{{ twice(s ~ s, n - 1) if n else s }}{% endmacro %}"
        "{{ twice('x', 64) }}"
    ),
    "join of a huge list": "{{ (['x' * 1000000] * 100000) | join }}",
    "replace blow-up": "{{ ('a' * 100000) | replace('a', 'b' * 100000) }}",
    "batch fill": "{{ range(3) | batch(10**10, 'x') | list }}",
    "sum of lists": "{{ (range(20000) | map('string') | map('list') | list) | sum(start=[]) }}",
}


@pytest.mark.parametrize("source", RUNAWAY_TEMPLATES.values(), ids=RUNAWAY_TEMPLATES.keys())
def test_a_template_that_would_build_a_huge_value_fails_at_once(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(OperationFailed, match="'evil'") as failure:
        ChatTemplate(source, model="evil").render([USER])
    assert time.monotonic() - started < 30
    assert "chat template" in str(failure.value)


SLOW_TEMPLATES = {
    "nested ranges": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    ),
    "nested loops over one range": (
        "{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}"
    ),
    "nested loops with output": (
        "{% for a in range(100000) %}{% for b in range(100000) %}.{% endfor %}{% endfor %}"
    ),
    "deep recursion with loops": (
        "{% macro f(n) %}{% for i in range(100000) %}{% endfor %}{{ f(n) }}{% endmacro %}"
        "{% for i in range(100000) %}{{ f(1) }}{% endfor %}"
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source", SLOW_TEMPLATES.values(), ids=SLOW_TEMPLATES.keys())
def test_a_template_that_runs_too_long_is_stopped(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(OperationFailed, match="'evil'") as failure:
        ChatTemplate(source, model="evil").render([USER])
    assert time.monotonic() - started < 30
    message = str(failure.value)
    assert "chat template" in message and ("seconds" in message or "too large" in message)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("{{ 1 / 0 }}", "division by zero"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
        ("{{ messages[5]['content'] }}", "undefined"),
        ("{{ 'a' + 1 }}", "TypeError"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
        ("{{ 2.0 ** 10000 }}", "OverflowError"),
    ],
)
def test_a_template_error_is_a_clear_error_naming_the_model(source: str, reason: str) -> None:
    with pytest.raises(OperationFailed, match="'evil'") as failure:
        ChatTemplate(source, model="evil").render([USER])
    message = str(failure.value)
    assert "chat template" in message and reason.lower() in message.lower(), message
    assert "\n" not in message and len(message) < 500


def test_ordinary_templates_are_untouched_by_the_bounds() -> None:
    source = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "<{{ m.role | upper }}>{{ m.content | trim | indent(2) }}"
        "{{ '%-6s|' % m.role }}{{ '{:>4}'.format(loop.index) }}{% endfor %}"
        "{{ ns.n }}{{ messages | map(attribute='role') | join(',') }}"
        "{{ (messages | length) * 3 }}{{ 2 ** 10 }}{{ 'ab' * 3 }}{{ 20240101 | string }}"
        # Undefined values print as nothing; '%' leaves braces alone; sum adds numbers.
        "{{ not_given }}{{ messages[0].name }}{{ '%s {' % '' }}"
        "{{ [1, 2, 3] | sum }}{{ messages | map(attribute='content') | map('length') | sum }}"
    )
    long_text = "word " * 200_000  # a 1 MB message is fine
    text = ChatTemplate(source, model="m").render([USER, ChatMessage("assistant", long_text)])
    assert text.startswith("<USER>Hello")
    assert text.endswith("2user,assistant61024ababab20240101 {6" + str(5 + len(long_text)))
    assert "user  |   1" in text and len(text) > len(long_text)


def _counting_encode(rendered: list[list[ChatMessage]]) -> Callable[[list[ChatMessage]], list[int]]:
    def encode(messages: list[ChatMessage]) -> list[int]:
        rendered.append(messages)
        return [0] * sum(len(m.content.split()) + 1 for m in messages)

    return encode


def test_history_too_long_for_any_window_is_left_out_unrendered() -> None:
    rendered: list[list[ChatMessage]] = []
    huge = ChatMessage("user", "word " * 10_000)  # 50,000 characters: beyond 512 tokens
    history = [
        huge,
        ChatMessage("assistant", "ok"),
        ChatMessage("user", "q"),
        ChatMessage("assistant", "a"),
    ]
    fitted = fit_messages(None, history, USER, _counting_encode(rendered), n_ctx=512, reserve=64)
    assert fitted.messages == [*history[2:], USER] and fitted.dropped == 2
    assert rendered and all(huge not in messages for messages in rendered)


def test_a_prompt_longer_than_any_window_is_refused_unrendered() -> None:
    rendered: list[list[ChatMessage]] = []
    prompt = ChatMessage("user", "x" * (512 * MAX_CHARS_PER_TOKEN + 1))
    with pytest.raises(ContextOverflow, match="characters"):
        fit_messages(None, [], prompt, _counting_encode(rendered), n_ctx=512, reserve=64)
    assert rendered == []


def _with_template(model: Path, source: str) -> Path:
    """The model with its chat template replaced in place (same length: padded with a
    Jinja comment), so the rest of the header and the weights stay valid."""
    data = bytearray(model.read_bytes())
    old = read_gguf_info(model).chat_template
    assert old is not None
    old_raw = old.encode()
    at = data.index(old_raw)
    padding = len(old_raw) - len(source.encode()) - len("{##}")
    assert padding >= 0
    new_raw = (source + "{#" + " " * padding + "#}").encode()
    data[at : at + len(old_raw)] = new_raw
    model.write_bytes(bytes(data))
    return model


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        # Not a constant: llama-cpp-python compiles the file's template too, in a plain
        # sandbox that folds constants, and would build "'x' * 10**10" in the model host.
        ("{{ 'x' * (messages | length * 10**10) }}", "too large"),
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "seconds",
        ),
        ("{{ 1/0 }}", "division by zero"),
    ],
)
def test_chat_with_a_runaway_template_is_one_line_error(
    cli: CLI, model_copy: Path, source: str, reason: str
) -> None:
    evil = _with_template(model_copy, source)
    assert cli("models", "import", str(evil), "--id", "evil").code == 0
    started = time.monotonic()
    result = cli("chat", "hi", "-m", "evil", "--max-tokens", "4", timeout=120)
    assert time.monotonic() - started < 60
    assert_one_line_error(result, 1, "chat template", reason)


# --- training checkpoints -----------------------------------------------------------


def test_every_torch_load_refuses_pickled_code() -> None:
    calls = []
    for path in sorted((REPO_ROOT / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                calls.append((path.name, node))
    assert calls, "torch.load is expected where checkpoints are resumed"
    for name, call in calls:
        weights_only = [k for k in call.keywords if k.arg == "weights_only"]
        assert weights_only, f"{name}:{call.lineno}: torch.load without weights_only=True"
        value = weights_only[0].value
        assert isinstance(value, ast.Constant) and value.value is True, (name, call.lineno)
