"""Exports of a model to the runtimes users also run: Ollama, llama-server, vLLM, a GGUF.

A fine-tune in Bastion is a base GGUF plus a GGUF LoRA adapter; Ollama and llama-server
take that pair as it is, so for them nothing is converted or copied: the files written
name the model's own files by absolute path.

* ``ollama``: a ``Modelfile`` (``FROM`` the base, ``ADAPTER`` the LoRA, the chat template
  as a Go template where the model's own is ChatML -- Ollama reads other families'
  templates from the GGUF itself -- and Bastion's sampling defaults as ``PARAMETER``s);
  ``ollama create NAME -f Modelfile`` imports it.
* ``llama-server``: ``llama-server.sh``, the command line with ``--lora`` and the model's
  chat template (``chat_template.jinja``, read from the GGUF) with ``--jinja``.
* ``vllm`` (fine-tunes only): vLLM serves Hugging Face weights, not GGUF, so the PEFT
  adapter of the run (safetensors) is copied into ``adapter/``, pointed at the run's
  Hugging Face base (the folder it was trained from, or the GGUF base's dequantized copy
  in the training cache, with the GGUF's tokenizer saved beside it for ``--tokenizer``),
  and ``vllm-serve.sh`` serves the base with the adapter as a LoRA module under the
  fine-tune's name.
* ``gguf`` (fine-tunes only): ``<model id>.gguf``, the adapter merged into the base's
  weights (``models.merge``: adapted weights in F16, every other tensor and all metadata
  -- tokenizer, chat template -- as in the base), for tools that load one GGUF file and
  take no adapter (GPT4All, LM Studio, ``llama-cli -m``); the command is
  ``llama-server -m FILE --jinja`` (the chat template is in the file). A plain model is
  refused with the path of its GGUF rather than copied: that file is already what the
  user asked for, and a copy would only double the disk it takes.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidInput
from engine.models.gguf_info import read_gguf_info
from engine.models.registry import ModelEntry
from engine.models.runtime import SamplingParams
from engine.paths import atomic_write_bytes

if TYPE_CHECKING:
    from engine.jobs import JobContext
    from engine.train.spec import RunSpec

TARGETS = ("ollama", "llama-server", "vllm", "gguf")
DEFAULT_CONTEXT = 4096
# Ollama's Go template for ChatML (the family of SmolLM2, Qwen and others), system included.
_CHATML_GO = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class Export:
    """What an export wrote, and the command that uses it."""

    target: str
    model: str
    files: list[str] = field(default_factory=list)
    command: str = ""

    def to_public(self) -> dict[str, Any]:
        return {"target": self.target, "model": self.model, "files": self.files,
                "command": self.command}  # fmt: skip


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))
    return str(path)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def export(
    entry: ModelEntry,
    target: str,
    out: Path,
    *,
    base: ModelEntry | None = None,
    run: RunSpec | None = None,
    ctx: JobContext | None = None,
) -> Export:
    """Write ``target``'s files for ``entry`` into ``out``.

    Args:
        entry: the model (a fine-tune carries ``base`` and ``adapter``).
        target: one of ``TARGETS``.
        out: the folder to write into (made if missing).
        base: the base model's entry, for a fine-tune.
        run: the fine-tune's training run (for ``vllm``).
        ctx: progress and cancel (for ``gguf``, the one target that takes a while).
    """
    if target not in TARGETS:
        raise InvalidInput(f"unknown export target {target!r}", hint=f"use one of {TARGETS}")
    if target == "vllm":
        return _vllm(entry, run, out.resolve())
    model_file = Path(base.path if base is not None else entry.path).resolve()
    adapter = Path(entry.adapter).resolve() if entry.adapter else None
    info = read_gguf_info(model_file)
    context = entry.settings.context or min(info.context_length or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    sampling = SamplingParams()
    out = out.resolve()
    if target == "gguf":
        return _merged_gguf(entry, base, out, context, ctx)
    if target == "ollama":
        lines = [f"# {entry.id}, exported by Bastion", f"FROM {model_file}"]
        if adapter is not None:
            lines.append(f"ADAPTER {adapter}")
        stops = []
        if info.chat_template and "<|im_start|>" in info.chat_template:
            lines.append(f'TEMPLATE """{_CHATML_GO}"""')
            stops = ["<|im_end|>", "<|im_start|>"]
        lines += [
            f"PARAMETER num_ctx {context}",
            f"PARAMETER temperature {sampling.temperature}",
            f"PARAMETER top_p {sampling.top_p}",
            f"PARAMETER top_k {sampling.top_k}",
            f"PARAMETER min_p {sampling.min_p}",
            f"PARAMETER repeat_penalty {sampling.repeat_penalty}",
            *(f"PARAMETER stop {_quoted(s)}" for s in stops),
        ]
        modelfile = _write(out / "Modelfile", "\n".join(lines) + "\n")
        command = f"ollama create {shlex.quote(entry.id)} -f {shlex.quote(modelfile)}"
        return Export(target, entry.id, [modelfile], command)
    args = ["llama-server", "-m", str(model_file)]
    files = []
    if adapter is not None:
        args += ["--lora", str(adapter)]
    if info.chat_template:
        template = _write(out / "chat_template.jinja", info.chat_template)
        files.append(template)
        args += ["--jinja", "--chat-template-file", template]
    args += ["-c", str(context), "--host", "127.0.0.1", "--port", "8080"]
    command = shlex.join(args)
    script = out / "llama-server.sh"
    _write(script, f'#!/bin/sh\n# {entry.id}, exported by Bastion\nexec {command} "$@"\n')
    script.chmod(0o755)
    return Export(target, entry.id, [str(script), *files], command)


def _merged_gguf(
    entry: ModelEntry, base: ModelEntry | None, out: Path, context: int, ctx: JobContext | None
) -> Export:
    from engine.models.merge import merge_lora

    if base is None or not entry.adapter:
        raise InvalidInput(
            f"{entry.id} is not a fine-tune; its GGUF is already {entry.path}",
            hint="use that file as it is",
        )
    merged = out / f"{entry.id}.gguf"
    merge_lora(Path(base.path), Path(entry.adapter), merged, name=entry.id, ctx=ctx)
    args = ["llama-server", "-m", str(merged), "--jinja", "-c", str(context),
            "--host", "127.0.0.1", "--port", "8080"]  # fmt: skip
    return Export("gguf", entry.id, [str(merged)], shlex.join(args))


def _vllm(entry: ModelEntry, run: RunSpec | None, out: Path) -> Export:
    from engine.train.backends import hf_folder_for_gguf

    if run is None or not entry.adapter:
        raise InvalidInput(
            f"{entry.id} is not a fine-tune made here: vLLM serves Hugging Face weights",
            hint="export a fine-tune, or give vLLM the model's original Hugging Face id",
        )
    adapter = run.path("adapter")
    if not (adapter / "adapter_config.json").is_file():
        raise InvalidInput(f"the run of {entry.id} kept no PEFT adapter ({adapter})")
    if run.base_kind == "hf":
        base_folder = Path(run.base_path)
    else:
        base_folder = hf_folder_for_gguf(
            Path(run.base_path), Path(run.cache_dir), lambda *a, **k: None
        )
    target = out / "adapter"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(adapter, target)
    config_file = target / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(base_folder.resolve())
    _write(config_file, json.dumps(config, indent=2) + "\n")
    rank = int(config.get("r") or 16)
    args = [
        "vllm", "serve", str(base_folder.resolve()), "--enable-lora",
        "--lora-modules", f"{entry.id}={target}", "--max-lora-rank", str(max(rank, 8)),
    ]  # fmt: skip
    if not _has_tokenizer(base_folder):  # a dequantized GGUF: its tokenizer is in the GGUF
        tokenizer = out / "tokenizer"
        _tokenizer_from_gguf(Path(run.base_path), tokenizer)
        args += ["--tokenizer", str(tokenizer)]
    args += ["--host", "127.0.0.1", "--port", "8000"]
    command = shlex.join(args)
    script = out / "vllm-serve.sh"
    _write(script, f'#!/bin/sh\n# {entry.id}, exported by Bastion\nexec {command} "$@"\n')
    script.chmod(0o755)
    files = [str(script), *(str(p) for p in sorted(target.iterdir()))]
    return Export("vllm", entry.id, files, command)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def _tokenizer_from_gguf(gguf_file: Path, out: Path) -> None:
    """The GGUF's tokenizer (and chat template) as a Hugging Face tokenizer folder."""
    from transformers import AutoTokenizer

    from engine.rag.embedder.torch_backend import quiet_hf_progress

    quiet_hf_progress()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer.save_pretrained(str(out))
