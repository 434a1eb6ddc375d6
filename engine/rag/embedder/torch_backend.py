"""The torch backends: the model as sentence-transformers runs it in fp32 (the reference for
every other backend), or in bf16 on CPUs with bf16 in hardware."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.errors import InvalidInput
from engine.rag.embedder.layout import Layout
from engine.rag.embedder.model import TORCH_BF16, TORCH_FP32, Embedder


def quiet_hf_progress() -> None:
    """The engine never draws progress bars; transformers 5 does on every load."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    except ImportError:
        pass


def torch_embedder(
    model_id: str, folder: Path, layout: Layout, backend: str = TORCH_FP32
) -> Embedder:
    """The ``torch-fp32`` (or ``torch-bf16``) embedder of a sentence-transformers folder.

    Raises:
        InvalidInput: the folder cannot be loaded, or does not say its vector size.
    """
    quiet_hf_progress()
    try:
        import torch
        from sentence_transformers import SentenceTransformer

        dtype = torch.bfloat16 if backend == TORCH_BF16 else torch.float32
        model = SentenceTransformer(
            str(folder), device=None, local_files_only=True, model_kwargs={"dtype": dtype}
        )
    except ImportError:
        raise
    except Exception as exc:  # any broken file surfaces as some library error
        raise InvalidInput(
            f"the embedder folder {folder} cannot be loaded: {exc}",
            hint="check that the model files are complete",
        ) from exc

    def encode_batch(texts: list[str]) -> np.ndarray:
        vectors = model.encode(
            texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False
        )
        return np.asarray(vectors.float().cpu().numpy(), dtype=np.float32)

    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(model.tokenizer.backend_tokenizer.to_str())
    counter.no_truncation()
    counter.no_padding()
    dimension = model.get_embedding_dimension() or layout.dimension
    if not dimension:
        raise InvalidInput(f"the embedder folder {folder} does not say its vector size")
    return Embedder(
        model_id=model_id,
        dimension=int(dimension),
        max_tokens=int(model.get_max_seq_length() or layout.max_tokens),
        backend=backend,
        encode_batch=encode_batch,
        counter=counter,
        lowercase=layout.lowercase,
    )
