"""Exports to Ollama and llama-server: the files name the model's own files, and what
they name loads in llama.cpp and answers. (A fine-tune's export, with its adapter, is
checked in tests/test_train_finetune.py on the model that test trains.)"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import DEFAULT_MODEL, assert_one_line_error

# Loads a GGUF (and a LoRA) in llama.cpp with the chat template from the file, answers greedily.
ANSWER = """
import sys
from llama_cpp import Llama
model, lora, question = sys.argv[1], sys.argv[2] or None, sys.argv[3]
llm = Llama(model_path=model, lora_path=lora, n_ctx=512, verbose=False, seed=1)
out = llm.create_chat_completion(
    [{"role": "user", "content": question}], temperature=0.0, max_tokens=40
)
print(out["choices"][0]["message"]["content"])
"""


def answer_with(model: str, lora: str | None, question: str) -> str:
    """What llama.cpp answers with the files an export names."""
    done = subprocess.run(
        [sys.executable, "-c", ANSWER, model, lora or "", question],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# What vLLM would load: the Hugging Face base and the PEFT adapter, here through PEFT itself.
PEFT_ANSWER = """
import sys
from engine.privacy import guard
guard.activate()
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, question, tokenizer_dir = sys.argv[1:5]
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or base)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
ids = tokenizer.apply_chat_template(
    [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
)
if not torch.is_tensor(ids):
    ids = ids["input_ids"]
out = model.generate(ids, max_new_tokens=40, do_sample=False)
print(tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True))
"""


def peft_answer(export: dict[str, Any], question: str) -> str:
    """What the base and the adapter a vLLM export names answer (greedy, through PEFT)."""
    args = shlex.split(export["command"])
    base = args[args.index("serve") + 1]
    adapter = args[args.index("--lora-modules") + 1].split("=", 1)[1]
    tokenizer = args[args.index("--tokenizer") + 1] if "--tokenizer" in args else ""
    done = subprocess.run(
        [sys.executable, "-c", PEFT_ANSWER, base, adapter, question, tokenizer],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def named_files(export: dict[str, Any]) -> tuple[str, str | None]:
    """(model, adapter) that an export names: the Modelfile's FROM/ADAPTER, or -m/--lora."""
    if export["target"] == "ollama":
        text = Path(export["files"][0]).read_text()
        found = re.search(r"^FROM (.+)$", text, re.MULTILINE)
        adapter = re.search(r"^ADAPTER (.+)$", text, re.MULTILINE)
        assert found is not None
        return found.group(1), adapter.group(1) if adapter else None
    args = shlex.split(export["command"])
    lora = args[args.index("--lora") + 1] if "--lora" in args else None
    return args[args.index("-m") + 1], lora


def test_a_plain_model_exports_to_ollama_and_llama_server(cli: Any, tmp_path: Path) -> None:
    ollama = cli("export", DEFAULT_MODEL, "--to", "ollama", "--out", str(tmp_path / "o"), "--json")
    assert ollama.code == 0, ollama.stderr
    exported = ollama.json()
    assert exported["command"] == (
        f"ollama create {DEFAULT_MODEL} -f {tmp_path / 'o' / 'Modelfile'}"
    )
    modelfile = Path(exported["files"][0]).read_text()
    assert "ADAPTER" not in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER num_ctx 4096" in modelfile
    server = cli(
        "export", DEFAULT_MODEL, "--to", "llama-server", "--out", str(tmp_path / "s"), "--json"
    ).json()
    args = shlex.split(server["command"])
    assert args[0] == "llama-server" and "--lora" not in args and "--jinja" in args
    template = Path(args[args.index("--chat-template-file") + 1])
    assert "<|im_start|>" in template.read_text()
    assert (tmp_path / "s" / "llama-server.sh").stat().st_mode & 0o111
    for export in (exported, server):
        model, lora = named_files(export)
        assert lora is None and Path(model).is_file()
        assert answer_with(model, lora, "Say hello.").strip()
    # Default folder inside the home; bad input.
    default = cli("export", DEFAULT_MODEL, "--to", "ollama", "--json").json()
    assert "/exports/smollm2-135m-instruct/ollama/Modelfile" in default["files"][0]
    assert_one_line_error(cli("export", "nope", "--to", "ollama"), 2, "nope")
    bad = cli("export", DEFAULT_MODEL, "--to", "tgi")
    assert bad.code == 2 and "tgi" in bad.stderr
    # vLLM serves Hugging Face weights: only a fine-tune made here (with its PEFT adapter).
    assert_one_line_error(cli("export", DEFAULT_MODEL, "--to", "vllm"), 2, "not a fine-tune")
