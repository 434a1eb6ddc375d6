"""Counting tokens with a model's own vocabulary, without loading its weights."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what llama.cpp writes straight to file descriptor 2 while a vocabulary loads.

    A vocabulary-only load still creates a context, and llama.cpp warns about its size on
    stderr, past Python's logging; the CLI's stderr must carry only Bastion's own lines.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.cache
def _vocabulary(path: str) -> object:
    from llama_cpp import Llama

    with _LOCK, _quiet_native_stderr():
        vocab = Llama(model_path=path, vocab_only=True, verbose=False)
    # Freed before the interpreter tears its modules down: freed later, llama-cpp-python's
    # finalizer finds its bindings gone and prints a TypeError on the way out.
    atexit.register(vocab.close)
    return vocab


def token_counter(model_path: str) -> Callable[[list[str]], list[int]]:
    """A batch token counter using the GGUF model's tokenizer (loaded once per process)."""
    vocab = _vocabulary(model_path)

    def count(texts: list[str]) -> list[int]:
        tokenize = vocab.tokenize  # type: ignore[attr-defined]
        return [len(tokenize(t.encode("utf-8"), add_bos=False, special=True)) for t in texts]

    return count


class Vocabulary:
    """A GGUF model's tokenizer alone: text to token ids exactly as llama.cpp prompts it."""

    def __init__(self, model_path: str) -> None:
        self._vocab: Any = _vocabulary(model_path)

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_end|>``) are parsed."""
        return list(self._vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def token_text(self, token_id: int) -> str:
        piece = self._vocab.detokenize([token_id], special=True)
        return str(piece.decode("utf-8", errors="replace"))

    @property
    def bos_id(self) -> int:
        return int(self._vocab.token_bos())

    @property
    def eos_id(self) -> int:
        return int(self._vocab.token_eos())

    @property
    def size(self) -> int:
        return int(self._vocab.n_vocab())
