"""The engine's serving calls: stateless answers, embeddings, evaluation, the server.

A part of the ``Engine`` facade (``Engine`` inherits it), kept in its own module: what
the OpenAI-compatible server (``engine.server``) and ``bastion eval`` use, on top of the
same registry, chat service, model lane and documents as the rest of the facade.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from engine.chat.completion import Completion, ModelGate
from engine.chat.templates import ChatMessage
from engine.errors import InvalidInput
from engine.jobs import JobContext
from engine.models.runtime import SamplingParams

if TYPE_CHECKING:
    from engine.chat.scoring import ScoredPrompt, TokenizerInfo
    from engine.chat.session import ChatService
    from engine.engine import Engine
    from engine.models.lane import ModelLane
    from engine.models.registry import ModelRegistry
    from engine.rag.service import Documents
    from engine.server.runner import ServerHandle
    from engine.train.evalrun import EvalRun
    from engine.train.golden import GoldenSet

# Model ids of the form rag:<collection> answer from that collection's documents.
RAG_PREFIX = "rag:"


class Serving:
    """The serving part of the facade (see the module docstring)."""

    home: Path
    models: ModelRegistry
    documents: Documents
    _chat: ChatService
    _lane: ModelLane
    _gate: ModelGate

    def set_parallel(self, parallel: int) -> None:
        """Run up to ``parallel`` generations together in one llama.cpp batch (the server;
        the model is loaded again for it). 1, the default, runs one at a time."""
        if parallel < 1:
            raise InvalidInput(f"parallel must be at least 1, not {parallel}")
        self._chat.set_parallel(parallel)

    def start_server(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        *,
        auth: bool = True,
        parallel: int = 8,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> ServerHandle:
        """Start the OpenAI-compatible server on a background thread; ``stop()`` ends it.

        Raises:
            InvalidInput: not secure as asked (see ``server.runner.check_bind``);
            EnvironmentFault: the port is taken.
        """
        from engine.server.runner import make_server

        engine = cast("Engine", self)  # the facade this part belongs to
        server = make_server(engine, host, port, auth=auth, tls_cert=tls_cert, tls_key=tls_key)
        self.set_parallel(parallel)
        server.start()
        return server

    def served_models(self) -> list[tuple[str, str]]:
        """``(id, kind)`` of everything the server offers: ``chat`` models (fine-tunes
        among them), each collection as ``rag:<name>``, and ``embedding`` models."""
        from engine.rag.embedder import DEFAULT_EMBEDDER

        served = [(m.id, "chat") for m in self.models.list()]
        collections = [c for c, _counts in self.documents.all()]
        served += [(RAG_PREFIX + c.name, "rag") for c in collections]
        embedders = {DEFAULT_EMBEDDER, *(c.embedder for c in collections)}
        return served + [(e, "embedding") for e in sorted(embedders)]

    def complete(
        self,
        model: str,
        messages: list[ChatMessage],
        sampling: SamplingParams,
        *,
        stop: list[str] | None = None,
        ctx: JobContext | None = None,
        on_text: Callable[[str], None] | None = None,
        k: int = 6,
        collection: str | None = None,
    ) -> Completion:
        """Answer the last user message of ``messages``; nothing goes into the history.

        ``model`` is a model id or ``rag:<collection>`` (answered from that collection's
        documents by the default model, with citations); ``collection`` grounds a model's
        answer the same way. Requests for the loaded model run together; one for another
        model waits until they have ended.
        """
        from engine.chat.completion import complete_messages

        if model.startswith(RAG_PREFIX):
            collection = model.removeprefix(RAG_PREFIX)
            model_id = self.models.default_id()
        else:
            model_id = self.models.get(model).id
        grounding = None
        if collection is not None:
            question = messages[-1].content if messages else ""
            grounding = self.documents.ground(collection, question, k)
        self._gate.enter(model_id)
        try:
            return complete_messages(
                self._chat,
                model_id,
                messages,
                sampling,
                stop=stop or (),
                ctx=ctx,
                on_text=on_text,
                grounding=grounding,
            )
        finally:
            self._gate.leave()

    def complete_text(
        self,
        model: str,
        prompt: str | list[int],
        sampling: SamplingParams,
        *,
        stop: list[str] | None = None,
        ctx: JobContext | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        """Continue ``prompt`` (text, or token ids used as they are) as it is, without a
        chat template; nothing is kept."""
        from engine.chat.completion import complete_text

        model_id = self.models.get(model).id
        self._gate.enter(model_id)
        try:
            return complete_text(
                self._chat, model_id, prompt, sampling, stop=stop or (), ctx=ctx, on_text=on_text
            )
        finally:
            self._gate.leave()

    def score(
        self, model: str, prompts: list[str | list[int]], *, top: int = 1
    ) -> list[ScoredPrompt]:
        """The log-probability of every token of each prompt (text, or token ids used as
        they are), with the ``top`` likeliest tokens at each place (``engine.chat.scoring``).
        Each prompt must fit in the model's context (ContextOverflow otherwise)."""
        from engine.chat.scoring import score_prompt

        with self._using(model) as model_id:
            return [score_prompt(self._chat, model_id, p, top) for p in prompts]

    def tokenize(self, model: str, text: str, *, add_special: bool = True) -> list[int]:
        """``text``'s token ids in ``model``'s vocabulary (special tokens written in the text
        are read as such); with ``add_special``, BOS first where the model adds one."""
        from engine.chat.scoring import adds_bos, local_entry

        with self._using(model) as model_id:
            entry = local_entry(self._chat, model_id)
            return self._lane.tokenize(text, add_special and adds_bos(entry))

    def detokenize(self, model: str, tokens: list[int]) -> str:
        """The text of ``tokens`` in ``model``'s vocabulary (special tokens written out)."""
        from engine.chat.scoring import local_entry

        with self._using(model) as model_id:
            local_entry(self._chat, model_id)
            return self._lane.detokenize(tokens)

    def tokenizer_info(self, model: str) -> TokenizerInfo:
        """``model``'s special tokens, whether it adds BOS, and its context length."""
        from engine.chat.scoring import tokenizer_info

        with self._using(model) as model_id:
            return tokenizer_info(self._chat, model_id)

    @contextlib.contextmanager
    def _using(self, model: str) -> Iterator[str]:
        """Hold ``model`` (its id) loaded in the host while inside (see ``ModelGate``)."""
        model_id = self.models.get(model).id
        self._gate.enter(model_id)
        try:
            yield model_id
        finally:
            self._gate.leave()

    def evaluate(
        self,
        set_path: Path,
        models: list[str],
        *,
        collection: str | None = None,
        out: Path | None = None,
        ctx: JobContext | None = None,
        judge: str | None = None,
    ) -> EvalRun:
        """Score ``models`` on a golden set (``engine.train.golden``) and write the report
        (Markdown and HTML) into ``out``, or ``<home>/evals/<time>/``. Nothing goes into
        the history. Raises InvalidInput for a set with bad lines (all listed by
        ``check_golden_set``). With ``judge`` (a model id), that model also compares each
        model after the first with the first, pairwise (``engine.train.judge``)."""
        import time as clock

        from engine.train.evalrun import run_eval, write_reports
        from engine.train.golden import load_golden_set

        for model in [*models, *([judge] if judge else [])]:
            self.models.get(model)
        if collection is not None:
            self.documents.get(collection)

        def answer(
            model: str, messages: list[ChatMessage], sampling: SamplingParams, job: JobContext
        ) -> tuple[str, list[Any]]:
            done = self.complete(model, messages, sampling, ctx=job, collection=collection)
            return done.text.strip(), [c.to_public() for c in done.citations]

        def ask_judge(prompt: str) -> str:
            assert judge is not None
            greedy = SamplingParams(max_tokens=8, temperature=0.0, seed=0)
            return self.complete(judge, [ChatMessage("user", prompt)], greedy, ctx=ctx).text

        run = run_eval(
            load_golden_set(set_path),
            models,
            answer,
            ctx or JobContext(),
            set_path=str(set_path),
            collection=collection,
            judge=ask_judge if judge else None,
            judge_model=judge,
        )
        folder = out or self.home / "evals" / clock.strftime("%Y%m%d-%H%M%S")
        write_reports(run, folder)
        return run

    def perplexity(self, model_id: str, text_path: Path) -> dict[str, Any]:
        """The model's perplexity on a text file: ``{"model", "tokens", "mean_nll",
        "perplexity"}`` (natural log; every token scored but each window's first)."""
        import math

        from engine.train.golden import read_text_file

        text = read_text_file(text_path)
        entry, _ = self._chat.prepare(model_id)
        if entry.remote:
            raise InvalidInput(f"{entry.id} is a remote model: its server scores text, not Bastion")
        self._gate.enter(entry.id)
        try:
            add_bos = entry.metadata.get("tokenizer.ggml.add_bos_token", True) is not False
            tokens = self._lane.tokenize(text, add_bos)
            if len(tokens) < 2:
                raise InvalidInput(f"{text_path} is too short to score (under two tokens)")
            scored, nll = self._lane.perplexity(tokens)
        finally:
            self._gate.leave()
        return {
            "model": entry.id,
            "file": str(text_path),
            "tokens": scored,
            "mean_nll": nll,
            "perplexity": math.exp(nll),
        }

    def check_golden_set(self, set_path: Path) -> GoldenSet:
        """A golden set's items and bad lines (with their numbers), without answering."""
        from engine.train.golden import load_golden_set

        return load_golden_set(set_path)

    def embed(self, texts: list[str], model: str | None = None) -> tuple[list[list[float]], int]:
        """Unit-length vectors of ``texts`` by an embedder (the default one if None), and
        the number of tokens they held."""
        from engine.rag.embedder import DEFAULT_EMBEDDER

        embedder = self.documents.embedder(
            self.documents.check_embedder_id(model or DEFAULT_EMBEDDER)
        )
        vectors = embedder.encode(texts)
        return vectors.tolist(), sum(embedder.count_tokens(texts))
