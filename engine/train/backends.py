"""Training backends: choosing one, and loading the base model with LoRA layers for it.

- ``peft``: transformers + PEFT on any torch device (CUDA, Apple MPS, CPU), full-precision
  base weights. Runs everywhere; the CPU path is the one tested on every machine.
- ``unsloth``: Unsloth's QLoRA (4-bit base, its fused kernels) on NVIDIA GPUs; it needs
  the optional ``gpu`` extra. ``auto`` picks it when both a CUDA device and the package
  are present, and says why it picked what it did.

A GGUF base is loaded through transformers' GGUF support, which dequantizes it; that is
slow (the metadata walk alone takes seconds), so the result is kept once as a Hugging
Face folder under the cache, keyed by the file's path, size and modification time.

This module runs inside the training child process only: it imports torch at the top of
its functions, never at import time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput
from engine.protocol import Event
from engine.train.arch import TARGET_MODULES

Emit = Callable[..., None]


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "peft" or "unsloth"
    device: str  # "cuda", "mps" or "cpu"
    reason: str


def choose(requested: str) -> BackendChoice:
    """The backend and device to train on, and why; ``InvalidInput`` if one asked for can't run."""
    import torch

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else None
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "unsloth":
        if not cuda:
            raise InvalidInput(
                "the unsloth backend needs an NVIDIA GPU with CUDA, and none is usable here",
                hint="use --backend peft (or auto)",
            )
        if not has_unsloth:
            raise InvalidInput(
                "the unsloth backend is not installed",
                hint="set up with the gpu extra: python3 installer/bootstrap.py setup --gpu",
            )
        return BackendChoice("unsloth", "cuda", f"asked for; GPU {gpu}")
    if requested not in ("auto", "peft"):
        raise InvalidInput(f"unknown backend {requested!r}: use auto, unsloth or peft")
    device = "cuda" if cuda else "mps" if _mps() else "cpu"
    if requested == "peft":
        return BackendChoice("peft", device, f"asked for; training on {gpu or device}")
    if cuda and has_unsloth:
        return BackendChoice("unsloth", "cuda", f"NVIDIA GPU {gpu} and Unsloth are present")
    if cuda:
        return BackendChoice(
            "peft", "cuda", f"NVIDIA GPU {gpu} but Unsloth is not installed (the gpu extra)"
        )
    if device == "mps":
        return BackendChoice("peft", "mps", "Apple GPU (Metal); Unsloth needs NVIDIA")
    return BackendChoice("peft", "cpu", "no NVIDIA GPU: PEFT on the CPU")


def _mps() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def hf_folder_for_gguf(gguf_path: Path, cache_root: Path, emit: Emit) -> Path:
    """A Hugging Face folder with the dequantized weights of ``gguf_path`` (made once)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(
        f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    ).hexdigest()[:20]
    folder = cache_root / "train-bases" / key
    # The tokenizer too: Unsloth (and any tool given the folder) loads it from there.
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    emit(Event.STATUS, message="dequantizing the GGUF base model (once; it is kept in the cache)")
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The weights are plain float32 now; transformers still marks the model as "GGUF
    # quantized" and would refuse to save it, so that mark is taken off first.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "bastion-source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load(
    choice: BackendChoice,
    folder: Path,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    max_length: int,
    seed: int,
    gradient_checkpointing: bool,
) -> Any:
    """The base model from ``folder`` with fresh LoRA layers on every linear projection."""
    if choice.name == "unsloth":
        return _load_unsloth(folder, rank, alpha, dropout, max_length, seed)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.float32
    if choice.device == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, local_files_only=True
    )
    model = model.to(choice.device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates int, uses a float
        lora_dropout=dropout,
        target_modules=list(TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _load_unsloth(
    folder: Path, rank: int, alpha: float, dropout: float, max_length: int, seed: int
) -> Any:
    # Unsloth patches transformers when imported, so it comes first in this process.
    from unsloth import FastLanguageModel

    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(folder),
        max_seq_length=max_length,
        load_in_4bit=True,
        dtype=None,
        local_files_only=True,
    )
    return FastLanguageModel.get_peft_model(
        model,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(TARGET_MODULES),
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=seed,
    )
