"""Exports to Ollama and llama-server: the files name the model's own files, and what
they name loads in llama.cpp and answers; a fine-tune merged into one GGUF answers as
llama.cpp answers with the base and the adapter. (The exports of a trained fine-tune,
the merged GGUF included, are checked in tests/test_train_finetune.py on the model that
test trains: the merge answers with the trained fact.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import DEFAULT_MODEL, assert_one_line_error, default_model_path

# Loads a GGUF (and a LoRA) in llama.cpp with the chat template from the file, answers greedily.
ANSWER = """
import sys
from engine.models.runtime import plain_llama
model, lora, question = sys.argv[1], sys.argv[2] or None, sys.argv[3]
llm = plain_llama(model, lora_path=lora, n_ctx=512, verbose=False, seed=1)
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
    # A merged GGUF of a plain model would be a copy of the file it already has.
    plain = cli("export", DEFAULT_MODEL, "--to", "gguf", "--out", str(tmp_path / "g"))
    path = str(default_model_path())
    assert_one_line_error(
        plain, 2, f"{DEFAULT_MODEL} is not a fine-tune; its GGUF is already {path}"
    )
    assert not (tmp_path / "g").exists()


# -- the merged GGUF (--to gguf) ---------------------------------------------------------

# SmolLM2-135M: 30 blocks, 9 query heads and 3 key/value heads of 64; (out, in) of each layer.
_LAYERS = {
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536),
}  # fmt: skip
_RANK, _ALPHA = 8, 16.0


def write_adapter(path: Path, *, blocks: range = range(30), arch: str = "llama",
                  b_std: float = 0.05, **changed: tuple[int, ...]) -> Path:  # fmt: skip
    """A LoRA for the default model on every layer of ``blocks``, written by Bastion's own
    exporter (``write_gguf_lora``, as a fine-tune's is): random, seeded weights, so no
    training is needed to get an adapter that changes the answers. ``changed`` replaces
    a weight's shape (``{"0.q_proj.A": (8, 100)}``) to make an adapter that does not fit."""
    from engine.train.arch import ARCHITECTURES
    from engine.train.export import write_gguf_lora

    rng = np.random.default_rng(0)
    state = {}
    for block in blocks:
        for layer, (rows, cols) in _LAYERS.items():
            key = f"base_model.model.model.layers.{block}.{layer}"
            short = f"{block}.{layer.split('.')[1]}"
            a_shape = changed.get(f"{short}.A", (_RANK, cols))
            b_shape = changed.get(f"{short}.B", (rows, _RANK))
            state[f"{key}.lora_A.weight"] = rng.normal(0, cols**-0.5, a_shape).astype(np.float32)
            state[f"{key}.lora_B.weight"] = rng.normal(0, b_std, b_shape).astype(np.float32)
    spec = next(a for a in ARCHITECTURES if a.gguf_arch == arch)
    write_gguf_lora(state, spec, alpha=_ALPHA, n_head=9, n_head_kv=3, out=path, name=path.stem)
    return path


# Scores over a fixed prompt and greedy tokens after it, for each (model, adapter) asked.
COMPARE = r"""
import json, sys
import numpy as np
from engine.models.runtime import plain_llama
out, question, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
found = {}
for label, (model, lora) in runs.items():
    llm = plain_llama(model, lora_path=lora, n_ctx=512, verbose=False, seed=1,
                      logits_all=True)
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    prompt = llm.tokenize(text.encode(), special=True)
    llm.eval(prompt)
    np.save(f"{out}/{label}.npy", np.array(llm.scores[: len(prompt)]))
    llm.reset()
    stop = {llm.token_eos(), *llm.tokenize(b"<|im_end|>", add_bos=False, special=True)}
    tokens, steps = [], []
    def keep(_ids, logits):  # what the model scored before each greedy choice
        steps.append(np.array(logits, dtype=np.float32))
        return logits
    for token in llm.generate(prompt, temp=0.0, top_k=1, logits_processor=[keep]):
        if token in stop or len(tokens) == 48:
            break
        tokens.append(token)
    np.save(f"{out}/{label}.steps.npy", np.array(steps[: len(tokens) + 1]))
    text = llm.detokenize(tokens).decode(errors="replace")
    found[label] = {"tokens": tokens, "end": int(token), "text": text}
    del llm
print(json.dumps(found))
"""


def compare(runs: dict[str, tuple[str, str | None]], question: str, out: Path
            ) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """({label: {"tokens", "text", "steps"}}, {label: prompt scores}) from llama.cpp."""
    out.mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", COMPARE, str(out), question, json.dumps(runs)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    texts = json.loads(done.stdout)
    for label in runs:  # the scores before each generated token, and before the stop
        texts[label]["steps"] = np.load(out / f"{label}.steps.npy")
    return texts, {label: np.load(out / f"{label}.npy") for label in runs}


def test_a_fine_tune_merged_into_one_gguf_answers_as_base_and_adapter_do(
    cli: Any, engine: Any, tmp_path: Path
) -> None:
    import gguf

    adapter = write_adapter(tmp_path / "randy-lora.gguf")
    engine.models.register_adapter_model("randy", DEFAULT_MODEL, adapter)
    out = tmp_path / "merged"
    result = cli("export", "randy", "--to", "gguf", "--out", str(out), "--json")
    assert result.code == 0, result.stderr
    exported = result.json()
    merged = str(out / "randy.gguf")
    assert exported["files"] == [merged] and sorted(os.listdir(out)) == ["randy.gguf"]
    model, lora = named_files(exported)
    assert model == merged and lora is None
    args = shlex.split(exported["command"])
    assert args[:3] == ["llama-server", "-m", merged] and "--jinja" in args

    # The file: the base's metadata and tensors, the adapted weights as F16 sums.
    base_file, merged_file = gguf.GGUFReader(default_model_path()), gguf.GGUFReader(merged)

    def field(reader: Any, key: str) -> Any:
        return reader.get_field(key).contents()

    assert field(merged_file, "general.name") == "randy"
    assert field(merged_file, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    kept = ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
            "tokenizer.chat_template", "tokenizer.ggml.eos_token_id",
            "llama.block_count")  # fmt: skip
    for key in kept:
        assert field(merged_file, key) == field(base_file, key), key
    assert len(merged_file.tensors) == len(base_file.tensors)
    adapted = 0
    for old, new in zip(base_file.tensors, merged_file.tensors, strict=True):
        assert new.name == old.name and list(new.shape) == list(old.shape)
        if old.name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight",
                              "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
                              "ffn_down.weight")):  # fmt: skip
            adapted += 1
            assert new.tensor_type == gguf.GGMLQuantizationType.F16, new.name
        else:
            assert new.tensor_type == old.tensor_type, new.name
            assert np.array_equal(new.data, old.data), new.name
    assert adapted == 30 * len(_LAYERS)

    # What llama.cpp makes of it. Merged and runtime LoRA are the same sum computed in two
    # ways: base + adapter multiplies Q4_1 weights with activations rounded to 8 bits and
    # adds the LoRA in F32; the merged file multiplies F16 weights with F16 activations. So
    # the scores differ by rounding, as much as the base alone differs from its own F16
    # copy (measured: RMS 0.2-0.3 over the prompt), which is far less than the adapter
    # changes them (RMS 3.9): the test asserts under a fifth of it. Greedy text can part
    # where two tokens nearly tie (on an open story prompt the base and its F16 copy part
    # after 2 tokens); on this prompt the first near tie comes late (token 21 or later).
    question = "Name three primary colors."
    base_path = str(default_model_path())
    texts, scores = compare(
        {"base": (base_path, None), "adapter": (base_path, str(adapter)), "merged": (merged, None)},
        question, tmp_path / "scores",
    )  # fmt: skip
    # Token for token, or parting only where base + adapter nearly ties: its lead of its
    # own token over the merged model's is under 0.5, twice the rounding (measured on a
    # portable AVX2 build: they part at token 21, where the top three are within 0.19 and
    # the adapter leads by 0.14). A merge that lost the adapter parts at the first token.
    # (Each side's tokens end with the one it stopped at.)
    a, m = ([*side["tokens"], side["end"]] for side in (texts["adapter"], texts["merged"]))
    part = next((i for i, (x, y) in enumerate(zip(a, m, strict=False)) if x != y), None)
    if part is not None:
        steps = texts["adapter"]["steps"][part]
        lead = float(steps[a[part]] - steps[m[part]])
        assert part >= 8 and lead < 0.5, (part, lead, {k: v["text"] for k, v in texts.items()})
    assert len(texts["adapter"]["tokens"]) >= 20
    assert texts["base"]["tokens"][:5] != texts["adapter"]["tokens"][:5], texts

    def rms(x: Any, y: Any) -> float:
        return float(np.sqrt(np.mean((x - y) ** 2)))

    rounding = rms(scores["merged"], scores["adapter"])
    effect = rms(scores["base"], scores["adapter"])
    assert rounding < effect / 5, (rounding, effect)
    # The next-token choice over the prompt agrees wherever base + adapter is not near a
    # tie: a lead of 1.0 is four times the rounding (the one measured miss leads by 0.21).
    same = scores["merged"].argmax(1) == scores["adapter"].argmax(1)
    top2 = np.sort(scores["adapter"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1.0
    assert clear.sum() >= 3 and same[clear].all(), (same, clear)
    print(
        f"merged vs base + adapter: {len(a) if part is None else part} greedy tokens the same, "
        f"prompt scores RMS {rounding:.3f} (the adapter's effect: {effect:.3f}), top-1 "
        f"{same.sum()}/{len(same)} ({same[clear].sum()}/{clear.sum()} clear)"
    )


@pytest.mark.parametrize(
    ("adapter", "code", "needle"),
    [
        ({"blocks": range(29, 31)}, 2, "the base has no tensor blk.30."),
        ({"blocks": range(1), "0.q_proj.A": (8, 100)}, 2, "blk.0.attn_q.weight is 576 x 576"),
        ({"blocks": range(1), "arch": "qwen2"}, 2, "for architecture 'qwen2'"),
        ({"blocks": range(1), "0.k_proj.A": (4, 576)}, 2, "blk.0.attn_k.weight"),
        ({"blocks": range(1), "b_std": 1e6}, 1, "beyond f16's range"),
        (None, 2, "not a readable gguf"),
        ("embeddings", 2, "adapts the token embeddings"),
    ],
    ids=[
        "unknown-tensor", "wrong-shape", "other-arch", "rank-mismatch", "overflow", "corrupt",
        "embeddings",
    ],
)  # fmt: skip
def test_an_adapter_that_does_not_fit_its_base_is_refused_and_nothing_is_left(
    cli: Any, engine: Any, tmp_path: Path, adapter: dict[str, Any] | str | None, code: int,
    needle: str,
) -> None:  # fmt: skip
    import gguf

    path = tmp_path / "bad-lora.gguf"
    if adapter is None:  # a torn download: the header of a real adapter, cut short
        whole = write_adapter(tmp_path / "whole.gguf", blocks=range(1)).read_bytes()
        path.write_bytes(whole[:200])
    elif adapter == "embeddings":  # as llama.cpp's convert_lora_to_gguf writes one
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
        writer.add_tensor("token_embd.weight.lora_a", np.zeros((49152, 8), np.float32))
        writer.add_tensor("token_embd.weight.lora_b", np.zeros((576, 8), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    else:
        assert isinstance(adapter, dict)
        write_adapter(path, **adapter)
    engine.models.register_adapter_model("bad", DEFAULT_MODEL, path)
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_error(cli("export", "bad", "--to", "gguf", "--out", str(out)), code, needle)
    assert os.listdir(out) == []


def test_a_merge_reports_each_tensor_and_a_cancel_leaves_nothing(
    engine: Any, tmp_path: Path
) -> None:
    from engine.errors import Cancelled
    from engine.jobs import JobContext, Progress

    adapter = write_adapter(tmp_path / "lora.gguf", blocks=range(2))
    engine.models.register_adapter_model("randy", DEFAULT_MODEL, adapter)
    seen: list[Progress] = []

    def on_progress(p: Progress) -> None:
        seen.append(p)
        if p.done == 100:
            job.cancel()

    job = JobContext(on_progress=on_progress)
    with pytest.raises(Cancelled):
        engine.export_model("randy", "gguf", tmp_path / "out", job)
    assert [p.done for p in seen] == list(range(1, 101))
    assert {p.total for p in seen} == {272}  # SmolLM2-135M's tensors
    assert seen[0].label == "token_embd.weight"
    assert os.listdir(tmp_path / "out") == []
