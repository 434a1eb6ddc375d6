"""Dataset preparation: duplicates, redaction and its report, a stable split, the written file."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from engine.errors import Cancelled, InvalidInput
from engine.jobs import JobContext, Progress
from engine.train.datasets import DatasetReport, read_dataset
from engine.train.prepare import (
    _bands_for,
    jaccard,
    normalize,
    prepare,
    report_path_for,
    shingles,
)

WORDS = [chr(c) + chr(d) for c in range(97, 123) for d in range(97, 100)]  # "aa" … "zc"


def sentence(rng: random.Random, n: int = 30) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n))


def chat(question: str, answer: str) -> dict[str, object]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def dataset(
    tmp_path: Path, rows: Sequence[Mapping[str, object]], name: str = "in.jsonl"
) -> DatasetReport:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return read_dataset(path)


def read_out(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_exact_and_near_duplicates_are_removed_and_the_first_is_kept(tmp_path: Path) -> None:
    rng = random.Random(1)
    base = sentence(rng)
    near = base.rsplit(" ", 1)[0] + " different"  # one word of thirty changed
    half = " ".join(base.split()[:15] + sentence(rng, 15).split())  # shares half its words
    rows = [
        chat("Question one?", base),
        chat("question   ONE?", base.upper()),  # exact after case and whitespace
        chat("Question one?", near),
        chat("Question one?", half),
        chat("Something else entirely", "Yes."),
    ]
    result = prepare(dataset(tmp_path, rows), tmp_path / "out.jsonl", val_fraction=0)
    assert result.exact_duplicates_removed == 1
    assert result.near_duplicates_removed == 1
    assert result.duplicates_removed == 2
    assert (result.examples_in, result.examples_out) == (5, 3)
    answers = [r["messages"][1]["content"] for r in read_out(tmp_path / "out.jsonl")]  # type: ignore[index]
    assert answers == [base, half, "Yes."]


def test_near_duplicates_are_found_among_many_texts(tmp_path: Path) -> None:
    rng = random.Random(2)
    originals = [sentence(rng, 40) for _ in range(300)]
    planted = [t.rsplit(" ", 1)[0] + " changed" for t in originals[:25]]  # 1 of 38 shingles
    rows = [{"text": t} for t in originals + planted]
    result = prepare(dataset(tmp_path, rows), tmp_path / "out.jsonl")
    assert result.near_duplicates_removed == 25
    assert result.examples_out == 300


def test_shingles_and_jaccard() -> None:
    a = shingles(normalize("the quick brown fox jumps"))
    assert len(a) == 3
    assert jaccard(a, shingles("the quick brown fox sleeps")) == pytest.approx(2 / 4)
    assert shingles("hi there") == shingles(normalize("HI, there"))
    assert shingles("") == frozenset()
    rows, bands = _bands_for(0.9, 128)
    assert rows * bands <= 128
    assert 1 - (1 - 0.9**rows) ** bands >= 0.995


def test_split_is_deterministic_sized_and_marked(tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = [chat(f"q{i}", sentence(rng, 12)) for i in range(400)]
    report = dataset(tmp_path, rows)
    first = prepare(report, tmp_path / "a.jsonl", val_fraction=0.1, seed=7)
    again = prepare(report, tmp_path / "b.jsonl", val_fraction=0.1, seed=7)
    assert again == replace(
        first, out_path=tmp_path / "b.jsonl", report_path=tmp_path / "b.jsonl.redactions.json"
    )
    other = prepare(report, tmp_path / "c.jsonl", val_fraction=0.1, seed=8)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert first.train + first.validation == 400
    assert 20 <= first.validation <= 60
    lines = read_out(tmp_path / "a.jsonl")
    assert [r["split"] for r in lines].count("validation") == first.validation
    assert {r["split"] for r in lines} == {"train", "validation"}
    assert [r["messages"] for r in lines] == [r["messages"] for r in rows]  # order kept
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()
    assert other.train + other.validation == 400


def test_an_example_keeps_its_side_when_others_are_added(tmp_path: Path) -> None:
    rng = random.Random(4)
    rows = [chat(f"q{i}", sentence(rng, 12)) for i in range(100)]
    small = prepare(dataset(tmp_path, rows[:50], "s.jsonl"), tmp_path / "s.out", val_fraction=0.2)
    big = prepare(dataset(tmp_path, rows, "b.jsonl"), tmp_path / "b.out", val_fraction=0.2)
    assert small.validation >= 1
    assert big.validation >= 1
    small_split = [r["split"] for r in read_out(tmp_path / "s.out")]
    big_split = [r["split"] for r in read_out(tmp_path / "b.out")][:50]
    assert small_split == big_split


def test_tiny_sets_get_one_validation_example(tmp_path: Path) -> None:
    two = prepare(
        dataset(tmp_path, [chat("a", "b"), chat("c", "d")]), tmp_path / "o.jsonl", val_fraction=0.01
    )
    assert (two.train, two.validation) == (1, 1)
    none = prepare(
        dataset(tmp_path, [chat("a", "b"), chat("c", "d")], "n.jsonl"),
        tmp_path / "n.out",
        val_fraction=0,
    )
    assert (none.train, none.validation) == (2, 0)
    one = prepare(dataset(tmp_path, [chat("a", "b")], "1.jsonl"), tmp_path / "1.out")
    assert (one.train, one.validation) == (1, 0)


def test_redaction_and_its_report(tmp_path: Path) -> None:
    rows = [
        chat("My mail is jane@example.com", "Noted, jane@example.com and +44 20 7946 0958."),
        chat("Card 4111 1111 1111 1111 please", "Done."),
        chat("Nothing personal here", "Good."),
    ]
    out = tmp_path / "out.jsonl"
    result = prepare(dataset(tmp_path, rows), out)
    assert result.redactions == {"CARD": 1, "EMAIL": 2, "PHONE": 1}
    written = out.read_text(encoding="utf-8")
    assert "jane@example.com" not in written
    assert "4111" not in written
    first = read_out(out)[0]["messages"]
    assert first == [
        {"role": "user", "content": "My mail is <EMAIL>"},
        {"role": "assistant", "content": "Noted, <EMAIL> and <PHONE>."},
    ]
    review = json.loads(report_path_for(out).read_text(encoding="utf-8"))
    assert review["counts"] == {"CARD": 1, "EMAIL": 2, "PHONE": 1}
    assert review["person_names_redacted"] is False
    assert [s["before"] for s in review["sample"]] == [
        "My mail is jane@example.com",
        "Noted, jane@example.com and +44 20 7946 0958.",
        "Card 4111 1111 1111 1111 please",
    ]
    assert review["sample"][2] == {
        "line": 2,
        "before": "Card 4111 1111 1111 1111 please",
        "after": "Card <CARD> please",
    }
    public = result.to_public()
    assert {"examples_in", "examples_out", "duplicates_removed", "redactions"} <= set(public)
    assert {"train", "validation", "near_duplicates_removed", "exact_duplicates_removed"} <= set(
        public
    )
    assert public["report_path"] == str(tmp_path / "out.jsonl.redactions.json")
    assert public["person_names_redacted"] is False


def test_the_sample_is_capped(tmp_path: Path) -> None:
    rows = [chat(f"write to user{i}@example.com", f"ok {i}") for i in range(30)]
    result = prepare(dataset(tmp_path, rows), tmp_path / "o.jsonl")
    assert result.redactions == {"EMAIL": 30}
    assert len(result.sample) == 20


def test_redacted_duplicates_count_once(tmp_path: Path) -> None:
    rows = [chat("mail a@example.com", "ok"), chat("mail b@example.org", "ok")]
    result = prepare(dataset(tmp_path, rows), tmp_path / "o.jsonl")
    assert result.exact_duplicates_removed == 1
    assert result.redactions == {"EMAIL": 1}


def test_no_redact_keeps_the_text(tmp_path: Path) -> None:
    rows = [chat("My mail is jane@example.com", "ok"), chat("other", "fine")]
    out = tmp_path / "o.jsonl"
    result = prepare(dataset(tmp_path, rows), out, redact_pii=False)
    assert result.redactions == {}
    assert "jane@example.com" in out.read_text(encoding="utf-8")
    review = json.loads(report_path_for(out).read_text(encoding="utf-8"))
    assert review["redacted"] is False
    assert review["sample"] == []


def test_other_formats_are_written_as_chat_or_text(tmp_path: Path) -> None:
    alpaca = dataset(tmp_path, [{"instruction": "Hi", "output": "Hello"}], "a.jsonl")
    prepare(alpaca, tmp_path / "a.out")
    assert read_out(tmp_path / "a.out") == [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ],
            "split": "train",
        }
    ]
    text = dataset(tmp_path, [{"text": "Plain text é"}], "t.jsonl")
    prepare(text, tmp_path / "t.out")
    assert read_out(tmp_path / "t.out") == [{"text": "Plain text é", "split": "train"}]


def test_the_input_is_never_overwritten(tmp_path: Path) -> None:
    report = dataset(tmp_path, [chat("a", "b"), chat("c", "d")])
    before = report.path.read_bytes()
    with pytest.raises(InvalidInput, match="input file"):
        prepare(report, report.path)
    link = tmp_path / "link.jsonl"
    link.symlink_to(report.path)
    with pytest.raises(InvalidInput, match="input file"):
        prepare(report, link)
    assert report.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "link.jsonl"]


@pytest.mark.parametrize("fraction", [-0.1, 0.51, 1.0])
def test_val_fraction_out_of_range(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(InvalidInput, match="validation fraction"):
        prepare(dataset(tmp_path, [chat("a", "b")]), tmp_path / "o.jsonl", val_fraction=fraction)


def test_bad_threshold_and_empty_dataset(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="near-duplicate threshold"):
        prepare(
            dataset(tmp_path, [chat("a", "b")]),
            tmp_path / "o.jsonl",
            near_duplicate_threshold=0,
        )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match="the dataset has no examples"):
        prepare(read_dataset(empty), tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_progress_and_cancel(tmp_path: Path) -> None:
    report = dataset(tmp_path, [chat(f"q{i}", f"a{i}") for i in range(10)])
    seen: list[Progress] = []
    prepare(report, tmp_path / "o.jsonl", ctx=JobContext(on_progress=seen.append))
    assert seen
    assert seen[-1].done == seen[-1].total == 10
    ctx = JobContext()
    ctx.cancel()
    with pytest.raises(Cancelled):
        prepare(report, tmp_path / "c.jsonl", ctx=ctx)
    assert not (tmp_path / "c.jsonl").exists()
