"""A tiny random sentence-transformers model written as a folder, for embedder tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def tiny_model(folder: Path, pooling: str = "mean", hidden: int = 32) -> Path:
    """A 2-layer random BERT (``hidden`` wide) as a sentence-transformers folder.

    It borrows the tokenizer of the built-in all-MiniLM-L6-v2 and exports to ONNX in about
    a second; ``hidden`` gives another dimension (and other weights).
    """
    import torch
    from transformers import BertConfig, BertModel

    from engine.rag.embedder import DEFAULT_EMBEDDER, resolve_embedder

    src = resolve_embedder(DEFAULT_EMBEDDER)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
    )
    BertModel(config).save_pretrained(folder)  # type: ignore[no-untyped-call]
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    pool = {
        "word_embedding_dimension": hidden,
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_cls_token": pooling == "cls",
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    return folder
