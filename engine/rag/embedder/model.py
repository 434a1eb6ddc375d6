"""A loaded embedder: texts in, L2-normalized vectors out, whichever backend runs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidInput

if TYPE_CHECKING:
    import numpy as np

    BatchEncoder = Callable[[list[str]], np.ndarray]

ONNX_INT8 = "onnx-int8"
TORCH_FP32 = "torch-fp32"
TORCH_BF16 = "torch-bf16"
BACKENDS = (ONNX_INT8, TORCH_BF16, TORCH_FP32)


class Embedder:
    """A loaded embedding model: texts in, L2-normalized float32 vectors out.

    Attributes:
        model_id: the id it was asked for (``all-minilm-l6-v2`` or a folder path).
        dimension: length of every vector.
        max_tokens: texts are cut to this many tokens (special tokens included).
        backend: one of ``BACKENDS``.
    """

    def __init__(
        self,
        *,
        model_id: str,
        dimension: int,
        max_tokens: int,
        backend: str,
        encode_batch: BatchEncoder,
        counter: Any,
        lowercase: bool = False,
    ) -> None:
        self.model_id = model_id
        self.dimension = dimension
        self.max_tokens = max_tokens
        self.backend = backend
        self._encode_batch = encode_batch
        self._counter = counter  # a tokenizers.Tokenizer without truncation or padding
        self._lowercase = lowercase

    def __repr__(self) -> str:
        return f"Embedder({self.model_id!r}, backend={self.backend!r}, dim={self.dimension})"

    def encode(
        self,
        texts: list[str],
        batch_size: int = 64,
        check_cancelled: Callable[[], None] | None = None,
    ) -> np.ndarray:
        """Embed ``texts``.

        Texts are grouped by length so that each batch pads little, then put back in order.

        Args:
            texts: the texts; each is cut to ``max_tokens`` tokens.
            batch_size: texts per model call.
            check_cancelled: called before each batch; raises ``Cancelled`` to stop.

        Returns:
            A C-contiguous float32 array of shape ``(len(texts), dimension)``, rows L2-normalized.
        """
        import numpy as np  # not at import: the engine starts without numpy

        if batch_size < 1:
            raise InvalidInput("batch_size must be at least 1")
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        for start in range(0, len(order), batch_size):
            if check_cancelled is not None:
                check_cancelled()
            idx = order[start : start + batch_size]
            out[idx] = self._encode_batch([texts[i] for i in idx])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.maximum(norms, 1e-12)
        return out

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text without special tokens and without truncation."""
        if not texts:
            return []
        if self._lowercase:
            texts = [t.lower() for t in texts]
        encodings = self._counter.encode_batch_fast(texts, add_special_tokens=False)
        return [len(e.ids) for e in encodings]
