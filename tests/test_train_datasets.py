"""Training-set reading: format detection, every kind of bad line, token counts, summary."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.errors import InvalidInput, NotFound
from engine.train.datasets import (
    TOO_LONG_POLICY,
    DatasetReport,
    Example,
    example_text,
    read_dataset,
)

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}
SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "user", "value": "How are you?"},
        {"from": "assistant", "value": "Fine."},
    ]
}
ALPACA = {"instruction": "Translate to German", "input": "good morning", "output": "Guten Morgen"}
TEXT = {"text": "Once upon a time there was a workstation."}


def write_jsonl(path: Path, rows: Sequence[object]) -> Path:
    """Rows as JSON lines; a str row is written as it is (malformed or blank lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def errors_by_line(report: DatasetReport) -> dict[int, str]:
    return {bad.line: bad.error for bad in report.bad_lines}


@pytest.mark.parametrize(
    ("row", "fmt", "turns"),
    [
        (
            CHAT,
            "chat",
            (("system", "Be brief."), ("user", "Capital of France?"), ("assistant", "Paris.")),
        ),
        (
            SHAREGPT,
            "sharegpt",
            (
                ("user", "Hi"),
                ("assistant", "Hello!"),
                ("user", "How are you?"),
                ("assistant", "Fine."),
            ),
        ),
        (
            ALPACA,
            "alpaca",
            (("user", "Translate to German\n\ngood morning"), ("assistant", "Guten Morgen")),
        ),
        (TEXT, "text", (("text", "Once upon a time there was a workstation."),)),
    ],
)
def test_each_format_is_detected_and_normalized(
    tmp_path: Path, row: dict[str, object], fmt: str, turns: tuple[tuple[str, str], ...]
) -> None:
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", [row, row]))
    assert report.format == fmt
    assert report.bad_lines == []
    assert [e.line for e in report.examples] == [1, 2]
    assert report.examples[0] == Example(turns, 1, fmt)


def test_alpaca_without_input_is_the_instruction_alone(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Hi", "output": "x"},
    ]
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.turns[0] for e in report.examples] == [("user", "Say hi"), ("user", "Hi")]


def test_format_override_changes_how_lines_are_read(tmp_path: Path) -> None:
    row = {"instruction": "Summarize", "output": "Short.", "text": "Raw article text."}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    assert read_dataset(path).format == "alpaca"
    forced = read_dataset(path, fmt="text")
    assert forced.format == "text"
    assert forced.examples[0].turns == (("text", "Raw article text."),)
    # Forcing a format the lines are not in reports every line, saying it was asked for.
    wrong = read_dataset(write_jsonl(tmp_path / "c.jsonl", [CHAT, CHAT]), fmt="sharegpt")
    assert wrong.examples == []
    assert errors_by_line(wrong) == {
        1: "mixed formats: this line is chat but sharegpt was asked for for the file",
        2: "mixed formats: this line is chat but sharegpt was asked for for the file",
    }


def test_unknown_format_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown dataset format 'csv'"):
        read_dataset(write_jsonl(tmp_path / "d.jsonl", [TEXT]), fmt="csv")


def test_every_bad_line_is_reported_with_its_number_and_reason(tmp_path: Path) -> None:
    def chat(*pairs: tuple[str, str]) -> dict[str, object]:
        return {"messages": [{"role": r, "content": c} for r, c in pairs]}

    rows: list[object] = [
        CHAT,  # 1 good
        '{"messages": [',  # 2 malformed
        "[1, 2]",  # 3 not an object
        "   ",  # 4 blank: ignored
        {"messages": [{"role": "user"}]},  # 5 missing content
        chat(("user", "hi"), ("tool", "x")),  # 6 wrong role
        chat(("user", "  "), ("assistant", "x")),  # 7 empty text
        chat(("system", "s"), ("user", "hi")),  # 8 no assistant
        chat(("user", "a"), ("user", "b"), ("assistant", "c")),  # 9 not alternating
        SHAREGPT,  # 10 mixed formats
        chat(("user", "q"), ("assistant", "a"), ("user", "more?")),  # 11 good (ends on user)
        chat(("assistant", "a"), ("user", "q")),  # 12 starts with the assistant
        chat(("user", "q"), ("system", "s"), ("assistant", "a")),  # 13 system not first
        {"foo": 1},  # 14 no known fields
        {"messages": "hello"},  # 15 not a list
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        chat(("user", "q"), ("assistant", "a")),  # 17 good
    ]
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    assert report.format == "chat"
    assert [e.line for e in report.examples] == [1, 11, 17]
    errors = errors_by_line(report)
    assert sorted(errors) == [2, 3, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16]
    expected = {
        2: "malformed JSON",
        3: "not a JSON object (found an array)",
        5: "message 1: missing field(s) 'content'",
        6: "message 2: unknown role 'tool'",
        7: "empty text: message 1 (user) has no content",
        8: "no assistant turn",
        9: "roles do not alternate: messages 1 and 2 are both from the user",
        10: "mixed formats: this line is sharegpt but chat was detected",
        12: "must start with the user",
        13: "message 2: a system message is allowed only as the first message",
        14: "missing field 'messages'",
        15: "'messages' is not a list",
        16: "message 1 (user): 'content' is not a string",
    }
    for line, needle in expected.items():
        assert needle in errors[line], (line, errors[line])


def test_alpaca_sharegpt_and_text_bad_lines(tmp_path: Path) -> None:
    alpaca = read_dataset(
        write_jsonl(
            tmp_path / "a.jsonl",
            [
                ALPACA,
                {"instruction": "x"},
                {"instruction": " ", "output": "y"},
                {"instruction": "x", "input": 5, "output": "y"},
            ],
        )
    )
    assert alpaca.format == "alpaca"
    assert errors_by_line(alpaca) == {
        2: "missing field(s) 'output'",
        3: "empty text: 'instruction' is empty",
        4: "'input' is not a string",
    }
    sharegpt = read_dataset(
        write_jsonl(
            tmp_path / "s.jsonl",
            [SHAREGPT, {"conversations": [{"from": "bot", "value": "x"}]}],
        )
    )
    assert "turn 1: unknown role 'bot'" in errors_by_line(sharegpt)[2]
    text = read_dataset(write_jsonl(tmp_path / "t.jsonl", [TEXT, {"text": ""}, {"text": 1}]))
    assert errors_by_line(text) == {2: "empty text: 'text' is empty", 3: "'text' is not a string"}
    assert len(text.examples) == 1


def test_majority_decides_the_format(tmp_path: Path) -> None:
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", [TEXT, CHAT, CHAT, CHAT]))
    assert report.format == "chat"
    assert [e.line for e in report.examples] == [2, 3, 4]
    assert errors_by_line(report) == {
        1: "mixed formats: this line is text but chat was detected for the file"
    }


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset_is_reported_not_raised(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    report = read_dataset(path)
    assert report.examples == []
    assert report.bad_lines == []
    assert report.format == "unknown"
    public = report.to_public({})
    assert public["examples"] == 0
    assert public["tokens"] == 0


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such dataset file"):
        read_dataset(tmp_path / "nope.jsonl")


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InvalidInput, match=r"not UTF-8 text \(line 2"):
        read_dataset(path)


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(TEXT).encode() + b"\n")
    assert len(read_dataset(path).examples) == 1


def test_tokens_are_counted_with_the_given_counter_in_batches(tmp_path: Path) -> None:
    rows = [{"text": " ".join(["w"] * n)} for n in (1, 5, 10, 20, 2000)]
    calls: list[int] = []

    def words(texts: list[str]) -> list[int]:
        calls.append(len(texts))
        return [len(t.split()) for t in texts]

    report = read_dataset(
        write_jsonl(tmp_path / "d.jsonl", rows), count_tokens=words, max_tokens=15
    )
    assert report.tokens == 2036
    assert not report.tokens_estimated
    assert calls == [5]
    assert report.too_long == 2
    assert (report.length.min, report.length.p50, report.length.p90, report.length.max) == (
        1,
        10,
        2000,
        2000,
    )
    public = report.to_public({"EMAIL": 2})
    assert public["pii"] == {"EMAIL": 2}
    assert public["too_long_policy"] == TOO_LONG_POLICY
    assert public["length"] == {"min": 1, "p50": 10, "p90": 2000, "max": 2000}
    assert {"format", "examples", "tokens", "bad_lines", "too_long", "pii"} <= set(public)
    assert public["max_tokens"] == 15


def test_tokens_are_estimated_without_a_counter(tmp_path: Path) -> None:
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", [CHAT, TEXT]), max_tokens=10)
    assert report.tokens_estimated
    expected = [math.ceil(len(example_text(e)) / 4) for e in report.examples]
    assert report.tokens == sum(expected)
    assert report.too_long == sum(1 for n in expected if n > 10)
    assert report.to_public({})["tokens_estimated"] is True


def test_example_text_joins_turns_with_roles() -> None:
    chat = Example((("user", "Hi"), ("assistant", "Hello")), 1, "chat")
    assert example_text(chat) == "user: Hi\nassistant: Hello"
    assert example_text(Example((("text", "raw"),), 1, "text")) == "raw"


def test_counter_returning_the_wrong_number_of_counts_is_a_bug(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="returned 0 counts for 1 texts"):
        read_dataset(write_jsonl(tmp_path / "d.jsonl", [TEXT]), count_tokens=lambda _: [])
