"""`bastion eval run`: golden sets, scores with intervals, reports -- real models, real metrics."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from engine.train.golden import load_golden_set, mean_with_interval, normalize, score, token_f1
from tests.conftest import DEFAULT_MODEL, assert_one_line_error, default_model_path
from tests.test_server import MANUAL

GOLDEN = [
    {
        "prompt": "What is the capital of France? Answer in one word.",
        "reference": "Paris",
        "must_include": ["Paris"],
    },
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a primary colour."},
        ],
        "must_include": ["red"],
    },
    {"prompt": "Say the word hello.", "reference": "Hello"},
]


def write_set(path: Path, items: list[Any]) -> Path:
    path.write_text("\n".join(json.dumps(i) if not isinstance(i, str) else i for i in items))
    return path


def test_scores_follow_their_definitions() -> None:
    item = load_golden_set_from(
        [{"prompt": "q", "reference": "The Eiffel Tower", "must_include": ["eiffel", "paris"]}]
    )
    got = score("the eiffel tower.", item)
    assert got["exact_match"] == 1.0 and got["f1"] == 1.0 and got["must_include"] == 0.5
    assert got["rouge_l"] == pytest.approx(1.0) and got["citation"] is None
    assert token_f1("tower in Paris", "The Eiffel Tower") == pytest.approx(
        2 * 0.5 * (1 / 3) / (0.5 + 1 / 3)
    )
    assert normalize("An apple, the pie!") == "apple pie"
    assert 0 < score("The Eiffel", item)["bleu"] < 1  # type: ignore[operator]
    interval = mean_with_interval([0.0, 1.0, 1.0, 1.0])
    assert interval is not None and interval["low"] <= 0.75 <= interval["high"]
    assert mean_with_interval([0.5] * 5) == {"mean": 0.5, "low": 0.5, "high": 0.5}


def load_golden_set_from(items: list[Any], tmp: Path | None = None) -> Any:
    import tempfile

    folder = Path(tempfile.mkdtemp())
    golden = load_golden_set(write_set(folder / "set.jsonl", items))
    shutil.rmtree(folder)
    return golden.items[0]


def test_bad_sets_are_reported_by_line(cli: Any, tmp_path: Path) -> None:
    bad = write_set(
        tmp_path / "bad.jsonl",
        [
            GOLDEN[0],
            "{not json",
            {"reference": "x"},
            {"prompt": "q"},
            {"prompt": "q", "page": 0, "file": "a"},
        ],
    )
    result = cli("eval", "run", "--set", str(bad), "-m", DEFAULT_MODEL, "--json")
    assert result.code == 2
    lines = {b["line"]: b["error"] for b in result.json()["bad_lines"]}
    assert sorted(lines) == [2, 3, 4, 5]
    assert "prompt" in lines[3] and "nothing to score" in lines[4] and "page" in lines[5]
    assert_one_line_error(
        cli("eval", "run", "--set", str(bad), "-m", DEFAULT_MODEL), 2, "4 bad line(s)", "line 2"
    )
    assert_one_line_error(
        cli("eval", "run", "--set", str(tmp_path / "none.jsonl"), "-m", DEFAULT_MODEL),
        2,
        "no such file",
    )
    good = write_set(tmp_path / "good.jsonl", GOLDEN)
    assert_one_line_error(cli("eval", "run", "--set", str(good), "-m", "nope"), 2, "no model")


def test_two_models_on_a_golden_set_with_a_report(cli: Any, tmp_path: Path) -> None:
    copy = tmp_path / "twin.gguf"
    shutil.copy(default_model_path(), copy)
    assert cli("models", "import", str(copy), "--id", "twin").code == 0
    golden = write_set(tmp_path / "golden.jsonl", GOLDEN)
    out = tmp_path / "report"
    result = cli(
        "eval",
        "run",
        "--set",
        str(golden),
        "-m",
        DEFAULT_MODEL,
        "-m",
        "twin",
        "--out",
        str(out),
        "--json",
        timeout=600,
    )
    assert result.code == 0, result.stderr
    data = result.json()
    assert set(data["models"]) == {DEFAULT_MODEL, "twin"}
    ours = data["models"][DEFAULT_MODEL]
    assert {"exact_match", "f1", "rouge_l", "bleu", "must_include"} <= set(ours)
    assert ours["citation"] is None  # no item names a source
    low, high = ours["intervals"]["f1"]["low"], ours["intervals"]["f1"]["high"]
    assert low <= ours["f1"] <= high
    # The same weights answer the same way: greedy and seeded.
    for item in data["items"]:
        answers = item["answers"]
        assert answers[DEFAULT_MODEL]["text"] == answers["twin"]["text"]
    assert data["models"]["twin"] == ours
    assert (out / "report.md").read_text().startswith("# Evaluation of")
    page = (out / "report.html").read_text()
    assert "<svg" in page and "must_include" in page

    again = cli("eval", "run", "--set", str(golden), "-m", DEFAULT_MODEL, "--json", timeout=600)
    assert [i["answers"][DEFAULT_MODEL]["text"] for i in again.json()["items"]] == [
        i["answers"][DEFAULT_MODEL]["text"] for i in data["items"]
    ]


def test_answers_from_a_collection_are_checked_for_their_citations(
    cli: Any, tmp_path: Path
) -> None:
    doc = tmp_path / "valves.txt"
    doc.write_text(MANUAL)
    assert cli("collections", "create", "manual").code == 0
    assert cli("collections", "add", "manual", str(doc)).code == 0
    golden = write_set(
        tmp_path / "rag.jsonl",
        [
            {
                "prompt": "What torque does the Orca main valve need?",
                "file": "valves.txt",
                "must_include": ["42"],
            },
            {"prompt": "How often should the gasket be checked?", "file": "other.txt"},
        ],
    )
    result = cli(
        "eval",
        "run",
        "--set",
        str(golden),
        "-m",
        DEFAULT_MODEL,
        "-c",
        "manual",
        "--out",
        str(tmp_path / "r"),
        "--json",
        timeout=600,
    )
    assert result.code == 0, result.stderr
    items = result.json()["items"]
    assert [i["answers"][DEFAULT_MODEL]["scores"]["citation"] for i in items] == [1.0, 0.0]
    assert result.json()["models"][DEFAULT_MODEL]["citation"] == 0.5


# The mean NLL of a text as llama-cpp-python computes it with all logits kept (a check of
# Bastion's batched scoring).
REFERENCE_NLL = r"""
import sys, numpy as np
from engine.models.runtime import plain_llama
llm = plain_llama(sys.argv[1], n_ctx=4096, logits_all=True, verbose=False)
tokens = llm.tokenize(open(sys.argv[2], encoding="utf-8").read().encode(), add_bos=True,
                      special=True)
llm.eval(tokens)
logits = np.array(llm.scores[: len(tokens) - 1], dtype=np.float64)
top = logits.max(axis=1)
lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
print(float((lse - logits[np.arange(len(tokens) - 1), tokens[1:]]).mean()), len(tokens) - 1)
"""


def test_perplexity_matches_llama_cpp_with_every_logit(cli: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    text = tmp_path / "manual.txt"
    text.write_text(MANUAL * 3)
    result = cli("eval", "perplexity", "-m", DEFAULT_MODEL, "--text", str(text), "--json")
    assert result.code == 0, result.stderr
    ours = result.json()
    done = subprocess.run(
        [sys.executable, "-c", REFERENCE_NLL, str(default_model_path()), str(text)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    nll, count = done.stdout.split()
    assert ours["tokens"] == int(count)
    assert ours["mean_nll"] == pytest.approx(float(nll), abs=0.02)
    assert 1 < ours["perplexity"] < 100

    noise = tmp_path / "noise.txt"
    rng = random.Random(0)  # letters in no order: nothing to predict
    noise.write_text(
        " ".join("".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(5)) for _ in range(60))
    )
    noisy = cli("eval", "perplexity", "-m", DEFAULT_MODEL, "--text", str(noise), "--json")
    assert noisy.json()["perplexity"] > ours["perplexity"]
    assert_one_line_error(
        cli("eval", "perplexity", "-m", DEFAULT_MODEL, "--text", str(tmp_path / "missing.txt")),
        2,
        "no such file",
    )
