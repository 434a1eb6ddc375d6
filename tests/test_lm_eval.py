"""lm-evaluation-harness against `bastion serve`, as the README tells users to run it.

The real `lm_eval` command line with its `local-completions` model (and, for instruct
models, `local-chat-completions` with the chat template), over loopback, with a real key,
on a small task written here (a YAML file and a JSONL dataset): nothing is downloaded.
It runs in a process with Bastion's network guard on, which refuses and records any
connection that is not loopback (a tokenizer fetched from the Hub would be one). The
server's audit log, with the request text on, shows that every prompt came through
Bastion and that lm-eval scored exactly the answers Bastion gave.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import update_config
from tests.conftest import DEFAULT_MODEL
from tests.test_server import bastion, start_server

TASK = "bastion_tiny"
# Continuations even a 135M model may get right; the test does not depend on it.
DOCS = [
    {"question": "1, 2, 3, 4, 5, 6, 7,", "answer": "8"},
    {"question": "Monday, Tuesday, Wednesday,", "answer": "Thursday"},
    {"question": "The capital of France is", "answer": "Paris"},
    {"question": "A, B, C, D, E,", "answer": "F"},
    {"question": "red, red, red, red,", "answer": "red"},
]
# A generate_until task over a local JSON-lines file (`DATA` is replaced by its path).
TASK_YAML = """\
task: bastion_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", ",", "."]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
# `lm_eval ARGS` with Bastion's network guard installed first; exit 3 if it refused anything.
GUARDED_LM_EVAL = """\
import sys
from engine.privacy import guard
guard.activate()
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval", *sys.argv[1:]]
try:
    cli_evaluate()
finally:
    refused = guard.blocked_attempts()
    if refused:
        print("refused connections:", refused, file=sys.stderr)
        sys.exit(3)
"""


# lm-eval's model, Bastion's route, and the rest of the command line (KEY: the key).
# tokenizer_backend=None keeps local-completions from loading a tokenizer named like the
# model from the Hub; =remote uses the server's, and sends the prompts as token ids.
MODELS = {
    "local-completions": ("local-completions",
        "/v1/completions", "tokenizer_backend=None,tokenized_requests=False", []),
    "local-completions-remote-tokenizer": ("local-completions",
        "/v1/completions", "tokenizer_backend=remote,auth_token=KEY", []),
    "local-chat-completions": ("local-chat-completions",
        "/v1/chat/completions", "", ["--apply_chat_template"]),
}  # fmt: skip


def run_lm_eval(
    model: list[str], tasks: str, folder: Path, out: Path, key: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """lm-eval's real CLI under Bastion's network guard: ``model`` is the model type, its
    model_args, then any further flags; the task files are in ``folder``."""
    model_type, model_args, *flags = model
    return subprocess.run(
        [sys.executable, "-c", GUARDED_LM_EVAL, "--model", model_type,
         "--model_args", model_args, *flags, "--tasks", tasks,
         "--include_path", str(folder), "--output_path", str(out), "--log_samples"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
        # The key as lm-eval's OpenAI-style models read it; datasets' cache in tmp_path.
        env={**os.environ, "OPENAI_API_KEY": key, "HF_HOME": str(tmp_path / "hf")},
    )  # fmt: skip


@pytest.mark.parametrize("case", MODELS)
def test_lm_eval_scores_a_local_task_through_the_server(case: str, tmp_path: Path) -> None:
    lm_eval_model, endpoint, extra_args, extra_flags = MODELS[case]
    home = tmp_path / "home"
    made = bastion(home, "keys", "create", "lm-eval", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    update_config(home, audit_log=True, audit_server_text=True)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "tiny.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.replace("DATA", str(data)))
    out = tmp_path / "results"

    url, server = start_server(home)
    try:
        model_args = ",".join(filter(None, [f"model={DEFAULT_MODEL}",
                                            f"base_url={url}{endpoint}",
                                            extra_args.replace("KEY", key)]))  # fmt: skip
        done = run_lm_eval(
            [lm_eval_model, model_args, *extra_flags], TASK, tasks, out, key, tmp_path
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert done.returncode == 0, done.stderr[-4000:]

    (results_file,) = out.rglob("results_*.json")
    score = json.loads(results_file.read_text())["results"][TASK]["exact_match,strip"]
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    (samples_file,) = out.rglob(f"samples_{TASK}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted(s["doc"]["question"] for s in samples) == sorted(d["question"] for d in DOCS)

    audit = [json.loads(line) for line in (home / "logs" / "audit.log").read_text().splitlines()]
    everything = [r for r in audit if r["event"] == "request"]
    assert {(r["key"], r["status"], r["model"]) for r in everything} == {
        ("lm-eval", 200, DEFAULT_MODEL)}  # fmt: skip
    requests = [r for r in everything if r["endpoint"] == endpoint]  # not the tokenizer's
    answers = {r["prompt"]: r["answer"] for r in requests}  # chat: the last user message
    assert len(requests) == len(answers) == len(DOCS)  # one request per document, no retries
    assert all(r["completion_tokens"] > 0 for r in requests)
    for sample in samples:
        # lm-eval scored the very text Bastion answered (stop sequences already cut off).
        assert sample["resps"] == [[answers[sample["doc"]["question"]]]]
        assert not {"\n", ",", "."} & set(sample["resps"][0][0])
    right = [answers[d["question"]].strip() == d["answer"] for d in DOCS]
    assert score == pytest.approx(sum(right) / len(DOCS))


# Log-likelihood tasks: a multiple_choice one (as arc_easy, hellaswag, mmlu are) and a
# loglikelihood_rolling one (as wikitext is), each over a local JSON-lines file.
# lm-eval puts a space between the question and each choice (target_delimiter).
CHOICE_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "banana", "seven"], "answer": 0},
    {"question": "1, 2, 3, 4,", "choices": ["purple", "5", "dog"], "answer": 1},
    {"question": "Monday, Tuesday,", "choices": ["Wednesday", "June", "cat"], "answer": 0},
    {"question": "The opposite of hot is", "choices": ["table", "cold"], "answer": 1},
]
ROLLING_DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."},
    {"text": "Water boils at one hundred degrees Celsius at sea level."},
]
CHOICE_YAML = """\
task: bastion_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
ROLLING_YAML = """\
task: bastion_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def test_lm_eval_scores_log_likelihood_tasks_with_the_servers_tokenizer(tmp_path: Path) -> None:
    home = tmp_path / "home"
    made = bastion(home, "keys", "create", "lm-eval", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    update_config(home, audit_log=True)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, yaml, docs in (("bastion_choice", CHOICE_YAML, CHOICE_DOCS),
                             ("bastion_rolling", ROLLING_YAML, ROLLING_DOCS)):  # fmt: skip
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (tasks / f"{name}.yaml").write_text(yaml.replace("DATA", str(data)))
    out = tmp_path / "results"

    url, server = start_server(home)
    try:
        # As the README says: the server's tokenizer (vLLM's routes), reached with the key.
        model_args = (f"model={DEFAULT_MODEL},base_url={url}/v1/completions,"
                      f"tokenizer_backend=remote,auth_token={key},num_concurrent=2")  # fmt: skip
        done = run_lm_eval(
            ["local-completions", model_args],
            "bastion_choice,bastion_rolling",
            tasks,
            out,
            key,
            tmp_path,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert done.returncode == 0, done.stderr[-4000:]

    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    acc = results["bastion_choice"]["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    perplexity = results["bastion_rolling"]["word_perplexity,none"]
    assert isinstance(perplexity, float) and 1.0 < perplexity < 1e6

    (choices_file,) = out.rglob("samples_bastion_choice_*.jsonl")
    samples = [json.loads(line) for line in choices_file.read_text().splitlines()]
    assert len(samples) == len(CHOICE_DOCS)
    for sample in samples:
        # One (log-likelihood, is_greedy) per choice: real numbers, not placeholders.
        scores = [float(resp[0][0]) for resp in sample["resps"]]
        assert len(scores) == len(sample["doc"]["choices"])
        assert all(isinstance(s, float) and s < 0 for s in scores)
        assert sample["acc"] == float(max(range(len(scores)), key=scores.__getitem__)
                                      == sample["doc"]["answer"])  # fmt: skip

    audit = [json.loads(line) for line in (home / "logs" / "audit.log").read_text().splitlines()]
    requests = [r for r in audit if r["event"] == "request"]
    assert {r["key"] for r in requests} == {"lm-eval"} and {r["status"] for r in requests} == {200}
    endpoints = {r["endpoint"] for r in requests}
    assert {"/tokenizer_info", "/tokenize", "/v1/completions"} <= endpoints
    scored = [r for r in requests if r["endpoint"] == "/v1/completions"]
    # Each choice and each rolling window scored once (lm-eval sends one prompt a request).
    assert len(scored) == sum(len(d["choices"]) for d in CHOICE_DOCS) + len(ROLLING_DOCS)
