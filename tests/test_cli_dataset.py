"""``bastion dataset check|prepare`` through the installed command."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import assert_one_line_error

CHECK_KEYS = {"format", "examples", "tokens", "bad_lines", "too_long", "pii"}
PREPARE_KEYS = {
    "examples_in",
    "examples_out",
    "duplicates_removed",
    "redactions",
    "train",
    "validation",
}


def _chat(user: str, answer: str) -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    )


def _good_file(tmp_path: Path) -> Path:
    lines = [
        _chat(f"What is fact number {i}?", f"Fact {i} is that lighthouse {i} has {i + 3} lamps.")
        for i in range(20)
    ]
    lines.append(_chat("Email me at ada.keeper@example.org", "I will write to you, Ada."))
    lines.append(_chat("What is fact number 1?", "Fact 1 is that lighthouse 1 has 4 lamps."))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_check_reports_the_contract_fields(cli, tmp_path: Path) -> None:
    result = cli("dataset", "check", str(_good_file(tmp_path)), "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert set(report) >= CHECK_KEYS
    assert report["format"] == "chat" and report["examples"] == 22
    assert report["bad_lines"] == [] and report["tokens"] > 200
    assert report["pii"].get("EMAIL") == 1


def test_check_exits_2_and_names_every_bad_line(cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                _chat("Hello", "Hi"),
                "{not json",
                json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": ""},
                            {"role": "assistant", "content": "ok"},
                        ]
                    }
                ),
                _chat("Fine", "Good"),
            ]
        )
        + "\n"
    )
    result = cli("dataset", "check", str(path), "--json")
    assert result.code == 2
    lines = [b["line"] for b in result.json()["bad_lines"]]
    assert lines == [2, 3, 4]
    assert result.json()["examples"] == 2


def test_check_user_errors(cli, tmp_path: Path) -> None:
    assert_one_line_error(cli("dataset", "check", str(tmp_path / "none.jsonl")), 2, "no such")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli("dataset", "check", str(empty)).code == 2


def test_prepare_dedupes_redacts_and_splits(cli, tmp_path: Path) -> None:
    source = _good_file(tmp_path)
    out = tmp_path / "prepared.jsonl"
    result = cli(
        "dataset", "prepare", str(source), "--out", str(out), "--val-fraction", "0.2", "--json"
    )
    assert result.code == 0, result.stderr
    report = result.json()
    assert set(report) >= PREPARE_KEYS
    assert report["examples_in"] == 22 and report["duplicates_removed"] >= 1
    assert report["redactions"].get("EMAIL") == 1
    assert report["train"] + report["validation"] == report["examples_out"]
    assert report["validation"] >= 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == report["examples_out"]
    assert {r["split"] for r in rows} == {"train", "validation"}
    text = out.read_text()
    assert "ada.keeper@example.org" not in text and "<EMAIL>" in text
    assert source.read_text().count("ada.keeper@example.org") == 1, "the input is untouched"


def test_prepare_without_redaction_and_bad_fraction(cli, tmp_path: Path) -> None:
    source = _good_file(tmp_path)
    out = tmp_path / "raw.jsonl"
    assert cli("dataset", "prepare", str(source), "--out", str(out), "--no-redact").code == 0
    assert "ada.keeper@example.org" in out.read_text()
    bad = cli("dataset", "prepare", str(source), "--out", str(out), "--val-fraction", "0.9")
    assert bad.code == 2
    assert_one_line_error(cli("dataset", "prepare", str(source), "--out", str(source)), 2, "input")
