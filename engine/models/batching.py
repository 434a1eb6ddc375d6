"""Continuous batching in the model host: many generations share one llama.cpp batch.

Why here and this way: the model must stay in the host process (a native crash ends one
answer, never the server), and the host already speaks Bastion's protocol with request
ids, so concurrent requests can be batched where they arrive with llama.cpp's own batch
API (``llama_batch`` / ``llama_decode`` over several sequences of one context, through
llama-cpp-python's low-level bindings), without a second server program to build, ship,
self-test and keep in step with the wheel. llama-server does the same in C++; the
difference per step is a few Python calls per sequence, small against a decode.

How: the context is made with ``n_seq_max`` = the number of parallel sequences and one
KV cache shared by all (``kv_unified``), ``parallel`` x the model's window in size, so
each sequence may grow to a full window. Every step builds one batch: the next token of
every sequence that is generating, then prompt tokens of new sequences up to the batch
size (long prompts over several steps, so they never stall the others), decodes it once,
and samples each generating sequence from its own logits with its own sampler chain
(penalties, top-k, top-p, min-p, temperature, seeded draw; a grammar for a JSON schema).
A sequence joins at any step and leaves as soon as it ends, is cancelled or hits its
limit. Requests beyond ``parallel`` wait their turn.

Prompts share their common beginnings: an ended sequence's cache cells stay with its slot,
and a new prompt takes the free slot whose cells match its longest prefix, or copies the
longest matching prefix from any slot (``llama_memory_seq_cp``: the cells are shared, not
duplicated), so a chat template's system prompt and a conversation's earlier turns are
computed once. A seeded request starts from an empty slot instead, and from an empty
cache when it runs alone: reused cells were computed in another batch shape, whose last
bits differ, and a seed promises the same answer every time.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidInput, OperationFailed
from engine.jobs import JobContext
from engine.models.runtime import GenerationDone, SamplingParams, StreamEvent, TokenChunk

log = logging.getLogger(__name__)

# Tokens the repetition penalty looks back over (llama.cpp's default).
PENALTY_LAST_N = 64


def _common(a: list[int], b: list[int]) -> int:
    """The length of the common beginning of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Sequence:
    tokens: list[int]
    params: SamplingParams
    ctx: JobContext
    started: float
    emit: Callable[[StreamEvent], None]
    budget: int
    fail: Callable[[str], None] = lambda _text: None  # reports an error to the caller
    seq: int = -1
    sampler: Any = None
    fed: int = 0  # prompt tokens in the cache
    next_token: int | None = None  # sampled, to go into the next batch
    produced: int = 0
    ttft: float | None = None
    row: int = -1  # this step: the batch row whose logits to sample, or -1
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def emit_error(self, text: str) -> None:
        self.fail(text)


class BatchEngine:
    """Runs the generations of one loaded model together. Use from one thread."""

    def __init__(self, loaded: Any, parallel: int) -> None:
        import llama_cpp

        self._ll = llama_cpp
        self._loaded = loaded
        self._ctx = loaded.llm._ctx.ctx
        self._vocab = loaded.llm._model.vocab
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.parallel = parallel
        self.window = loaded.n_ctx  # the most tokens one sequence may hold
        self._n_batch = int(llama_cpp.llama_n_batch(self._ctx))
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, parallel)
        self._free = list(range(parallel))
        self._cached: dict[int, list[int]] = {}  # a free slot's tokens still in the cache
        self.reused = 0  # prompt tokens taken from the cache instead of computed
        self._running: list[_Sequence] = []
        self._waiting: deque[_Sequence] = deque()

    @property
    def active(self) -> bool:
        return bool(self._running or self._waiting)

    def add(
        self,
        tokens: list[int],
        params: SamplingParams,
        ctx: JobContext,
        started: float,
        emit: Callable[[StreamEvent], None],
        fail: Callable[[str], None],
    ) -> None:
        """Queue a generation after ``tokens``; its events go to ``emit``, an error that
        ends it early (a failed batch) to ``fail``."""
        sequence = _Sequence(
            list(tokens),
            params,
            ctx,
            started,
            emit,
            budget=min(params.max_tokens, self.window - len(tokens)),
            fail=fail,
        )
        if not tokens:
            raise InvalidInput("the prompt has no tokens")
        if sequence.budget <= 0:
            self._end(sequence, "context")
            return
        sequence.sampler = self._sampler(params)  # a bad schema fails here, before queueing
        self._waiting.append(sequence)

    def _in_cache(self, sequence: _Sequence) -> list[int]:
        """The tokens of ``sequence`` whose cells are in the cache now."""
        held = sequence.fed if sequence.next_token is None else len(sequence.tokens) - 1
        return sequence.tokens[:held]

    def _admit(self, sequence: _Sequence) -> None:
        """Give ``sequence`` a slot, with as much of its prompt as the cache holds already."""
        prompt = sequence.tokens
        reuse = sequence.params.seed is None
        if not reuse and not self._running:
            # Alone, a seeded answer is computed on an empty cache: the same cells, the same
            # shapes, the same answer every time (beside others, their batch decides).
            self.forget()
        seq = max(self._free, key=lambda s: _common(self._cached.get(s, []), prompt) * reuse)
        self._free.remove(seq)
        best, source = (_common(self._cached.get(seq, []), prompt), seq) if reuse else (0, seq)
        if reuse:
            for other in self._running:
                found = _common(self._in_cache(other), prompt)
                if found > best:
                    best, source = found, other.seq
        best = min(best, len(prompt) - 1)  # the last prompt token goes in again: its logits
        ll, memory = self._ll, self._memory
        if source == seq and best > 0 and ll.llama_memory_seq_rm(memory, seq, best, -1):
            pass
        else:
            ll.llama_memory_seq_rm(memory, seq, -1, -1)
            if source != seq and best > 0:
                ll.llama_memory_seq_cp(memory, source, seq, 0, best)
            else:
                best = 0
        self._cached.pop(seq, None)
        sequence.seq, sequence.fed = seq, best
        self.reused += best
        self._running.append(sequence)

    def step(self) -> None:
        """Admit waiting sequences, decode one batch, sample, and end what has ended."""
        while self._waiting and self._free:
            self._admit(self._waiting.popleft())
        for sequence in list(self._running):
            if sequence.ctx.cancelled:
                self._end(sequence, "cancelled")
        if not self._running:
            return
        batch = self._batch
        n = 0

        def put(token: int, pos: int, seq: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = logits
            n += 1

        for sequence in self._running:  # one token each for those generating
            sequence.row = -1
            if sequence.next_token is not None:
                sequence.row = n
                put(sequence.next_token, len(sequence.tokens) - 1, sequence.seq, True)
        for sequence in self._running:  # then prompts, in the room left
            left = len(sequence.tokens) - sequence.fed
            if sequence.next_token is not None or left == 0 or n >= self._n_batch:
                continue
            take = min(left, self._n_batch - n)
            for i in range(sequence.fed, sequence.fed + take):
                last = i == len(sequence.tokens) - 1
                if last:
                    sequence.row = n
                put(sequence.tokens[i], i, sequence.seq, last)
            sequence.fed += take
        batch.n_tokens = n
        status = self._ll.llama_decode(self._ctx, batch)
        if status != 0:
            raise OperationFailed(f"llama.cpp could not decode a batch (status {status})")
        now = time.perf_counter()
        for sequence in list(self._running):
            if sequence.row >= 0:
                self._sample(sequence, now)

    def _sample(self, sequence: _Sequence, now: float) -> None:
        ll = self._ll
        token = int(ll.llama_sampler_sample(sequence.sampler, self._ctx, sequence.row))
        if sequence.ttft is None:
            sequence.ttft = now - sequence.started
        if ll.llama_vocab_is_eog(self._vocab, token):
            self._end(sequence, "stop")
            return
        sequence.produced += 1
        piece = sequence.decoder.decode(self._loaded.llm.detokenize([token]))
        if piece:
            sequence.emit(TokenChunk(piece))
        sequence.tokens.append(token)
        sequence.fed = len(sequence.tokens)  # the new token goes in with the next batch
        sequence.next_token = token
        if sequence.ctx.cancelled:
            self._end(sequence, "cancelled")
        elif sequence.produced >= sequence.budget:
            limit = sequence.produced >= sequence.params.max_tokens
            self._end(sequence, "length" if limit else "context")

    def _end(self, sequence: _Sequence, reason: str) -> None:
        tail = sequence.decoder.decode(b"", final=True)
        if tail:
            sequence.emit(TokenChunk(tail))
        prompt = len(sequence.tokens) - sequence.produced
        sequence.emit(
            GenerationDone(
                prompt,
                sequence.produced,
                sequence.ttft,
                time.perf_counter() - sequence.started,
                reason,
            )
        )
        self._release(sequence)

    def _release(self, sequence: _Sequence) -> None:
        if sequence.sampler is not None:
            self._ll.llama_sampler_free(sequence.sampler)
            sequence.sampler = None
        if sequence in self._running:
            self._running.remove(sequence)
        if sequence.seq >= 0:
            # Its cells stay: the next prompt that begins the same way starts from them.
            self._cached[sequence.seq] = self._in_cache(sequence)
            self._free.append(sequence.seq)
            sequence.seq = -1

    def fail_all(self, fail: Callable[[_Sequence], None]) -> None:
        """End every sequence with ``fail`` (a decode error): nothing is left half-done."""
        for sequence in [*self._running, *self._waiting]:
            fail(sequence)
            self._release(sequence)
        self._waiting.clear()
        self._ll.llama_memory_clear(self._memory, True)  # whatever it held is suspect now
        self._cached.clear()

    def close(self) -> None:
        self.fail_all(lambda s: s.emit_error("the model was unloaded"))
        if self._batch is not None:
            self._ll.llama_batch_free(self._batch)
            self._batch = None

    def forget(self) -> None:
        """Drop the cells the free slots keep (another user of the cache needs it empty)."""
        for seq in list(self._cached):
            self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._cached.clear()

    def _sampler(self, params: SamplingParams) -> Any:
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = ll.llama_sampler_chain_add
        if params.json_schema:
            from llama_cpp.llama_grammar import json_schema_to_gbnf

            try:
                grammar = json_schema_to_gbnf(params.json_schema)
            except Exception as exc:  # the converter's own errors, whatever their type
                ll.llama_sampler_free(chain)
                raise InvalidInput(
                    f"the JSON schema can't be turned into a grammar: {exc}".splitlines()[0][:300]
                ) from exc
            add(chain, ll.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root"))
        if params.repeat_penalty != 1.0:
            add(
                chain,
                ll.llama_sampler_init_penalties(
                    ll.llama_vocab_n_tokens(self._vocab),
                    PENALTY_LAST_N,
                    params.repeat_penalty,
                    0.0,
                    0.0,
                ),
            )
        if params.temperature <= 0:
            add(chain, ll.llama_sampler_init_greedy())
            return chain
        add(chain, ll.llama_sampler_init_top_k(params.top_k))
        add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
        add(chain, ll.llama_sampler_init_min_p(params.min_p, 1))
        add(chain, ll.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        add(chain, ll.llama_sampler_init_dist(ctypes.c_uint32(seed & 0xFFFFFFFF).value))
        return chain
