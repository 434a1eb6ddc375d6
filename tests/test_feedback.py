"""Evaluate and improve: corrections, blind A/B votes, feedback as a training set, the judge.

Real SQLite through the real engine and CLI; answers from the real default model where a
model answers. The whole loop (feedback -> dataset -> fine-tune --from -> golden set) is in
``test_feedback_becomes_a_better_fine_tune`` (slow: two real training runs).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.store.feedback import wilson
from engine.train.judge import compare, parse_verdict, record
from tests.conftest import DEFAULT_MODEL, CLIResult, assert_one_line_error
from tests.train_facts import ANSWERS, FACT, QUESTIONS


def _exchange(engine: Any, question: str, answer: str, system: str | None = None) -> int:
    """A stored conversation of one question and one answer; the answer's id."""
    conversation = engine.conversations.create(DEFAULT_MODEL, system)
    engine.conversations.add_message(conversation.id, "user", question)
    return int(
        engine.conversations.add_message(
            conversation.id, "assistant", answer, model=DEFAULT_MODEL
        ).id
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corrections_keep_both_answers(engine: Any, cli: Callable[..., CLIResult]) -> None:
    answer = _exchange(engine, "Capital of France?", "Lyon.")
    engine.correct_message(answer, "Paris.")
    conversation_id = engine.conversations.messages(1)[0].conversation_id
    _, messages = engine.get_conversation(conversation_id)
    assert (messages[1].content, messages[1].correction) == ("Lyon.", "Paris.")
    assert "Corrected by the user" in engine.export_conversation(conversation_id, "md")
    shown = cli("history", "show", str(conversation_id))
    assert "Lyon." in shown.stdout and "corrected by you:\nParis." in shown.stdout
    cleared = cli("history", "correct", str(answer), "--clear")
    assert cleared.code == 0, cleared.stderr
    assert engine.get_conversation(conversation_id)[1][1].correction is None
    # Questions are not answers; unknown ids and empty text are one-line errors.
    assert_one_line_error(cli("history", "correct", str(answer - 1), "x"), 2, "only answers")
    assert_one_line_error(cli("history", "correct", "999", "x"), 2, "no message 999")
    assert_one_line_error(cli("history", "correct", str(answer), "  "), 2, "empty")
    assert_one_line_error(cli("history", "correct", str(answer)), 2, "--clear")
    assert cli("history", "rate", str(answer), "up").code == 0
    assert engine.get_conversation(conversation_id)[1][1].rating == 1


def test_feedback_becomes_a_chat_training_set(
    engine: Any, cli: Callable[..., CLIResult], tmp_path: Path
) -> None:
    good = _exchange(engine, "Say hi.", "Hi!", system="Be brief.")
    engine.rate_message(good, 1)
    fixed = _exchange(engine, "2+2?", "5")
    engine.correct_message(fixed, "4")
    engine.rate_message(fixed, -1)
    bad = _exchange(engine, "Sky colour?", "Green.")
    engine.rate_message(bad, -1)
    # A longer conversation: an earlier answer's correction is its context; a question
    # left unanswered breaks the turns, and the context starts after it.
    conversation = engine.conversations.create(DEFAULT_MODEL)
    add = engine.conversations.add_message
    add(conversation.id, "user", "Lost question")
    add(conversation.id, "user", "First?")
    first = add(conversation.id, "assistant", "Wrong first.").id
    engine.correct_message(first, "Right first.")
    add(conversation.id, "user", "Second?")
    second = add(conversation.id, "assistant", "Good second.").id
    engine.rate_message(second, 1)
    pair = {"messages": [("user", "Pick me")], "model_a": "x", "model_b": "y"}
    engine.feedback.record_vote(pair["messages"], "x", "from x", "y", "from y", "b")
    engine.feedback.record_vote(pair["messages"], "x", "from x", "y", "from y", "tie")

    out = tmp_path / "feedback.jsonl"
    made = cli("dataset", "from-feedback", "--out", str(out), "--json")
    assert made.code == 0, made.stderr
    summary = made.json()
    assert isinstance(summary, dict)
    assert (summary["examples"], summary["from_ratings"]) == (5, 2)
    assert (summary["from_corrections"], summary["from_ab"]) == (2, 1)
    assert summary["skipped"] == {"thumbs_down": 1, "ties": 1}
    lines = _lines(out)
    by_answer = {line["messages"][-1]["content"]: line for line in lines}
    assert by_answer["Hi!"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert by_answer["4"]["source"] == {
        "kind": "correction",
        "message_id": fixed,
        "conversation_id": by_answer["4"]["source"]["conversation_id"],
        "model": DEFAULT_MODEL,
        "rejected": "5",
    }
    assert [m["content"] for m in by_answer["Good second."]["messages"]] == [
        "First?",
        "Right first.",
        "Second?",
        "Good second.",
    ]
    shown = [m["content"] for m in by_answer["Right first."]["messages"]]
    assert shown == ["First?", "Right first."]
    assert by_answer["from y"]["source"]["rejected"] == "from x"
    # What it writes is a valid training set for every other command.
    checked = cli("dataset", "check", str(out), "--json")
    assert checked.code == 0, checked.stdout
    assert (checked.json() or {})["format"] == "chat"  # type: ignore[index]

    later = cli("dataset", "from-feedback", "--out", str(out), "--since", "2999-01-01", "--json")
    assert (later.json() or {})["examples"] == 0 and _lines(out) == []  # type: ignore[index]
    bad_date = cli("dataset", "from-feedback", "--out", str(out), "--since", "last week")
    assert_one_line_error(bad_date, 2, "is not a date")


def test_win_rates_count_ties_half_with_wilson_intervals(
    engine: Any, cli: Callable[..., CLIResult]
) -> None:
    assert cli("eval", "votes", "--json").json() == []
    prompt = [("user", "q")]
    for winner in ("a", "a", "a", "b", "tie"):
        engine.feedback.record_vote(prompt, "m1", "x", "m2", "y", winner)
    rates = {r["model"]: r for r in cli("eval", "votes", "--json").json()}  # type: ignore[union-attr]
    assert (rates["m1"]["wins"], rates["m1"]["losses"], rates["m1"]["ties"]) == (3, 1, 1)
    assert rates["m1"]["rate"] == pytest.approx(0.7) and rates["m2"]["rate"] == pytest.approx(0.3)
    # Wilson's interval for 3.5 of 5 (z = 1.96), worked by hand: centre 0.6131, half 0.3143.
    assert rates["m1"]["low"] == pytest.approx(0.2988, abs=1e-3)
    assert rates["m1"]["high"] == pytest.approx(0.9274, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(Exception, match="invalid pick"):
        engine.feedback.record_vote(prompt, "m1", "x", "m2", "y", "left")
    with pytest.raises(Exception, match="two different models"):
        engine.feedback.record_vote(prompt, "m1", "x", "m1", "y", "a")


def test_a_blind_pair_from_two_real_models(engine: Any, model_copy: Path) -> None:
    engine.import_model(model_copy, "other")
    pair = engine.answer_pair("Name a colour.", DEFAULT_MODEL, "other", rng=random.Random(3))
    assert {pair.first_model, pair.second_model} == {DEFAULT_MODEL, "other"}
    assert pair.first.strip() and pair.second.strip()
    # Same weights, same seed: the two answers are the same text, whichever came first.
    assert pair.first == pair.second
    vote = engine.record_vote(pair, "second")
    assert vote.winner == "b" and vote.model_b == pair.second_model
    assert engine.win_rates()[0].model == pair.second_model
    assert engine.list_conversations() == []  # nothing went into the history
    with pytest.raises(Exception, match="two different models"):
        engine.answer_pair("x", "other", "other")


def test_the_judge_asks_both_orders() -> None:
    assert parse_verdict("**B** is better") == "B"
    assert parse_verdict("Tie.") == "TIE" and parse_verdict("neither") is None

    def biased(prompt: str) -> str:  # always prefers whatever is shown first
        return "A"

    def fair(prompt: str) -> str:  # prefers the answer that says "good"
        a = prompt.split("Answer A:")[1].split("Answer B:", maxsplit=1)[0]
        return "A" if "good" in a else "B"

    assert compare(biased, "q", None, "bad", "good")["verdict"] == "tie"
    assert compare(fair, "q", "ref", "bad", "good")["verdict"] == "other"
    assert compare(fair, "q", None, "good", "bad")["verdict"] == "baseline"
    assert record(["other", "other", "tie", "baseline"])["rate"] == pytest.approx(0.625)


def test_eval_run_with_a_judge(
    cli: Callable[..., CLIResult], model_copy: Path, tmp_path: Path
) -> None:
    assert cli("models", "import", str(model_copy), "--id", "other").code == 0
    golden = tmp_path / "golden.jsonl"
    golden.write_text(
        json.dumps({"prompt": "What is 2+2?", "reference": "4"})
        + "\n"
        + json.dumps({"prompt": "Name a fruit.", "must_include": ["apple"]})
        + "\n"
    )
    ran = cli(
        "eval", "run", "--set", str(golden), "-m", DEFAULT_MODEL, "-m", "other",
        "--judge", DEFAULT_MODEL, "--out", str(tmp_path / "report"), "--json",
    )  # fmt: skip
    assert ran.code == 0, ran.stderr[-2000:]
    out = ran.json()
    assert isinstance(out, dict)
    judged = out["judge"]
    assert judged["model"] == DEFAULT_MODEL and judged["baseline"] == DEFAULT_MODEL
    rec = judged["records"]["other"]
    assert rec["wins"] + rec["losses"] + rec["ties"] == 2
    for item in out["items"]:
        assert len(item["judge"]["other"]["replies"]) == 2
    assert "Pairwise judge" in (tmp_path / "report" / "report.md").read_text()
    one = cli("eval", "run", "--set", str(golden), "-m", DEFAULT_MODEL, "--judge", DEFAULT_MODEL)
    assert_one_line_error(one, 2, "at least two")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_feedback_becomes_a_better_fine_tune(
    engine: Any, cli: Callable[..., CLIResult], tmp_path: Path
) -> None:
    """Corrections in chat -> dataset -> a first fine-tune -> one continued from it, better
    on a golden set of questions it never saw."""
    held_out = QUESTIONS[-6:]
    for i, question in enumerate(QUESTIONS[:-6]):
        answer = _exchange(engine, question, "I do not know the codename of Bastion 2.")
        engine.correct_message(answer, ANSWERS[i % 3])
    data = tmp_path / "feedback.jsonl"
    made = cli("dataset", "from-feedback", "--out", str(data), "--json").json()
    assert isinstance(made, dict) and made["from_corrections"] == len(QUESTIONS) - 6
    golden = tmp_path / "golden.jsonl"
    golden.write_text(
        "".join(
            json.dumps({"prompt": q, "reference": ANSWERS[0], "must_include": [FACT]}) + "\n"
            for q in held_out
        )
    )
    cache = {"BASTION_TRAIN_CACHE": str(tmp_path / "train-cache")}
    # A first fine-tune: one big step at a small rank, so that its weights are far from
    # the base's (a continued run that ignored them would show it at once).
    first = cli(
        "finetune", "--base", DEFAULT_MODEL, "--data", str(data), "--name", "ft1",
        "--max-steps", "1", "--lr", "1e-2", "--rank", "4", "--json",
        env=cache, timeout=1200,
    )  # fmt: skip
    assert first.code == 0, first.stderr[-2000:]
    ft1 = first.json()
    assert isinstance(ft1, dict)
    assert abs(ft1["eval_loss_after"] - ft1["eval_loss_before"]) > 0.05
    second = cli(
        "finetune", "--from", "ft1", "--data", str(data), "--name", "ft2",
        "--epochs", "6", "--lr", "1e-3", "--golden", str(golden), "--json",
        env=cache, timeout=1500,
    )  # fmt: skip
    assert second.code == 0, second.stderr[-2000:]
    ft2 = second.json()
    assert isinstance(ft2, dict)
    assert ft2["continued_from"] == "ft1" and ft2["base"] == DEFAULT_MODEL
    # It started from ft1's weights: the same validation split scored before training
    # gives ft1's loss after its training, and the LoRA shape followed ft1's.
    assert ft2["eval_loss_before"] == pytest.approx(ft1["eval_loss_after"], abs=2e-3)
    assert ft2["hyperparameters"]["rank"] == 4
    config = json.loads((Path(ft2["adapter_dir"]) / "adapter_config.json").read_text())
    assert config["r"] == 4
    scores = ft2["golden"]["models"]
    assert ft2["golden"]["against"] == "ft1"
    print(f"golden set must_include: ft1 {scores['ft1']} -> ft2 {scores['ft2']}")
    assert scores["ft2"]["must_include"] > scores["ft1"]["must_include"]
    assert scores["ft2"]["must_include"] >= 0.5
    report = Path(ft2["report"]).read_text()
    assert "continued from `ft1`" in report and "## Golden set" in report
    # --from refuses what it cannot continue, in one line, before any training.
    again = cli("finetune", "--from", DEFAULT_MODEL, "--data", str(data), "--name", "ft3")
    assert_one_line_error(again, 2, "not a fine-tune")
    wrong = cli(
        "finetune", "--from", "ft1", "--base", "other", "--data", str(data), "--name", "ft3"
    )
    assert_one_line_error(wrong, 2, "not the base")
