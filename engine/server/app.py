"""The OpenAI-compatible HTTP API over one ``Engine`` (FastAPI; ``bastion serve`` runs it).

Routes: ``GET /health`` (no key), ``GET /v1/models``, ``POST /v1/chat/completions``
(streamed as server-sent events or not), ``POST /v1/completions`` (with ``echo`` and
``logprobs``: the prompt's tokens scored), ``POST /v1/embeddings``, and vLLM's tokenizer
routes ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize`` (what
lm-evaluation-harness's log-likelihood tasks need). Every call but ``/health`` needs
``Authorization: Bearer <key>`` unless the server runs with ``--no-auth`` on loopback.
Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
status that fits the engine's exception.

Engine calls block, so each runs on a worker thread; a client that goes away (a closed
stream, a dropped connection while waiting) cancels its generation at once. Models of the
form ``rag:<collection>`` answer from the collection's documents: the text carries
``[n]`` markers and the response an extra ``citations`` list.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.errors import BastionError
from engine.jobs import JobContext
from engine.privacy.audit import AuditLog
from engine.server.keys import ApiKey
from engine.server.limits import Limiter
from engine.server.shapes import (
    ApiError,
    echo_of,
    events,
    from_engine_error,
    messages_of,
    prompts_of,
    sampling_of,
    scored_answer,
    stops_of,
    whole_answer,
)

if TYPE_CHECKING:
    from engine.chat.completion import Completion
    from engine.engine import Engine

# The key name recorded for requests of a server started with --no-auth.
NO_AUTH_KEY = "(no auth)"


@dataclass
class ServerOptions:
    auth: bool = True
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 2048
    concurrent_per_key: int = 4


@dataclass
class ServerStats:
    """What the desktop's Server page shows: requests now and so far, and 429s."""

    running: int = 0
    served: int = 0
    refused: int = 0
    recent: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.served += 1
            self.recent = [entry, *self.recent[:49]]


# -- the app -------------------------------------------------------------------------------


def create_app(engine: Engine, options: ServerOptions | None = None) -> FastAPI:
    """The ASGI app serving ``engine``."""
    options = options or ServerOptions()
    app = FastAPI(title="Bastion", version="1", docs_url=None, redoc_url=None)
    limiter = Limiter(concurrent=options.concurrent_per_key)
    # Blocking engine calls: a thread each, as many as requests may run (asyncio's default
    # pool has cores + 4 threads, fewer than the answers a batch generates together).
    workers = ThreadPoolExecutor(max_workers=64, thread_name_prefix="bastion-request")
    stats = ServerStats()
    audit = AuditLog(engine.home)
    app.state.engine, app.state.options, app.state.limiter = engine, options, limiter
    app.state.stats = stats

    @app.middleware("http")
    async def limit_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > options.max_body_bytes:
            return ApiError(
                413, f"the request body is over {options.max_body_bytes} bytes"
            ).response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(BastionError)
    async def engine_error(_request: Request, exc: BastionError) -> JSONResponse:
        return from_engine_error(exc).response()

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > options.max_body_bytes:
            raise ApiError(413, f"the request body is over {options.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def authorize(request: Request) -> ApiKey | None:
        """The caller's key (None with --no-auth); 401 without a valid one."""
        if not options.auth:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        entry = engine.api_keys.verify(key.strip()) if scheme.lower() == "bearer" else None
        if entry is None:
            raise ApiError(
                401,
                "a valid API key is needed: Authorization: Bearer <key>",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return entry

    def served() -> dict[str, str]:
        return dict(engine.served_models())

    def check_model(key: ApiKey | None, model: Any, kinds: tuple[str, ...]) -> str:
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required", param="model")
        kind = served().get(model)
        if kind is None or kind not in kinds:
            raise ApiError(
                404,
                f"the model {model!r} does not exist here",
                param="model",
                code="model_not_found",
            )
        if key is not None and not key.allows(model):
            raise ApiError(
                403,
                f"this key may not use the model {model!r}",
                param="model",
                code="model_not_allowed",
            )
        return model

    def admit(key: ApiKey | None) -> str:
        name = key.name if key is not None else NO_AUTH_KEY
        refusal = limiter.admit(name, key.rpm if key else None, key.tpm if key else None)
        if refusal is not None:
            stats.refused += 1
            raise ApiError(
                429,
                refusal.message,
                "rate_limit_exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(refusal.retry_after_s)},
            )
        with stats.lock:
            stats.running += 1
        return name

    def finish(
        name: str,
        endpoint: str,
        model: str,
        status: int,
        started: float,
        done: Completion | None = None,
        prompt: str | None = None,
        usage: tuple[int, int] = (0, 0),
    ) -> None:
        prompt_tokens, completion_tokens = usage
        if done is not None:
            prompt_tokens, completion_tokens = done.prompt_tokens, done.completion_tokens
        limiter.done(name, prompt_tokens + completion_tokens)
        latency = (time.perf_counter() - started) * 1000
        with stats.lock:
            stats.running -= 1
        stats.note(
            {
                "time": time.time(),
                "key": name,
                "model": model,
                "endpoint": endpoint,
                "status": status,
                "latency_ms": round(latency),
            }
        )
        audit.record_request(
            key=name,
            model=model,
            endpoint=endpoint,
            status=status,
            latency_ms=latency,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            prompt=prompt,
            answer=done.text if done is not None else None,
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        key = authorize(request)
        created = int(time.time())
        data = [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "bastion",
                "kind": kind,
            }
            for model, kind in engine.served_models()
            if key is None or key.allows(model)
        ]
        return {"object": "list", "data": data}

    async def run_blocking(request: Request, work: Callable[[JobContext], Any]) -> Any:
        """Run ``work`` on a thread; cancel it if the client goes away meanwhile."""
        job = JobContext()
        task = asyncio.get_running_loop().run_in_executor(workers, work, job)
        while not task.done():
            await asyncio.wait({task}, timeout=0.1)
            if not task.done() and await request.is_disconnected():
                job.cancel("the client went away")
        return task.result()

    async def generate(request: Request, endpoint: str, chat: bool) -> Response:
        key = authorize(request)
        body = await body_of(request)
        if not chat and (echo := echo_of(body)) is not None:
            return await score(request, key, body, *echo)
        model = check_model(key, body.get("model"), ("chat", "rag"))
        sampling = sampling_of(body, options.max_tokens_cap)
        stop = stops_of(body)
        # The prompt as the audit log keeps it; token ids are decoded in ``work``.
        audit_prompt: list[str | None] = [None]
        if chat:
            messages = messages_of(body)
            audit_prompt[0] = messages[-1].content
        else:
            prompts = prompts_of(body)
            if len(prompts) != 1 or model.startswith("rag:"):
                raise ApiError(
                    400,
                    "a generation takes one prompt (lm-eval: batch_size=1), and the model "
                    "can't be a collection",
                    param="prompt",
                )
            prompt = prompts[0]
            audit_prompt[0] = prompt if isinstance(prompt, str) else None
        name = admit(key)
        started = time.perf_counter()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]

        def work(job: JobContext, on_text: Callable[[str], None] | None = None) -> Completion:
            if chat:
                return engine.complete(
                    model, messages, sampling, stop=stop, ctx=job, on_text=on_text
                )
            if not isinstance(prompt, str):
                audit_prompt[0] = engine.detokenize(model, prompt)
            return engine.complete_text(
                model, prompt, sampling, stop=stop, ctx=job, on_text=on_text
            )

        if not body.get("stream"):
            try:
                done = await run_blocking(request, work)
            except BastionError as exc:
                error = from_engine_error(exc)
                finish(name, endpoint, model, error.status, started, prompt=audit_prompt[0])
                raise error from None
            status = 499 if done.finish_reason == "cancelled" else 200
            finish(name, endpoint, model, status, started, done, audit_prompt[0])
            return JSONResponse(whole_answer(rid, done, chat))
        return StreamingResponse(
            events(
                work,
                rid,
                model,
                chat,
                lambda status, done: finish(
                    name, endpoint, model, status, started, done, audit_prompt[0]
                ),
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def score(
        request: Request, key: ApiKey | None, body: dict[str, Any], after: int, top: int | None
    ) -> Response:
        """``/v1/completions`` with ``echo``: the prompts' tokens with their log-probabilities
        (``engine.chat.scoring``), as lm-eval's log-likelihood tasks ask."""
        endpoint = "/v1/completions"
        if str(body.get("model", "")).startswith("rag:"):
            raise ApiError(400, "a collection can't score a prompt; name a model", param="model")
        model = check_model(key, body.get("model"), ("chat",))
        prompts = prompts_of(body)
        name = admit(key)
        started = time.perf_counter()
        try:
            scored = await run_blocking(
                request, lambda _job: engine.score(model, prompts, top=top or 0)
            )
        except BastionError as exc:
            error = from_engine_error(exc)
            texts = [p for p in prompts if isinstance(p, str)]
            finish(name, endpoint, model, error.status, started, prompt="\n".join(texts) or None)
            raise error from None
        answer = scored_answer("cmpl-" + uuid.uuid4().hex[:24], model, scored, after, top)
        usage = answer["usage"]
        finish(name, endpoint, model, 200, started, prompt="\n".join(p.text for p in scored),
               usage=(usage["prompt_tokens"], usage["completion_tokens"]))  # fmt: skip
        return JSONResponse(answer)

    # -- the tokenizer, as vLLM serves it (lm-eval's tokenizer_backend=remote reads it) -------

    def tokenizer_model(key: ApiKey | None, model: Any) -> str:
        """The model named, else the only chat model the key may use, else the default."""
        if model is None:
            allowed = [m for m, kind in engine.served_models()
                       if kind == "chat" and (key is None or key.allows(m))]  # fmt: skip
            model = allowed[0] if len(allowed) == 1 else engine.models.default_id()
        return check_model(key, model, ("chat",))

    async def vocabulary(
        key: ApiKey | None, endpoint: str, model: str, call: Callable[[], Any], text: str | None
    ) -> Any:
        name = admit(key)
        started = time.perf_counter()
        try:
            value = await asyncio.get_running_loop().run_in_executor(workers, call)
        except BastionError as exc:
            error = from_engine_error(exc)
            finish(name, endpoint, model, error.status, started, prompt=text)
            raise error from None
        finish(name, endpoint, model, 200, started, prompt=text)
        return value

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request, model: str | None = None) -> dict[str, Any]:
        key = authorize(request)
        model = tokenizer_model(key, model)
        info = await vocabulary(key, "/tokenizer_info", model,
                                lambda: engine.tokenizer_info(model), None)  # fmt: skip
        return {
            "model": info.model,
            "bos_token": info.bos_token,
            "eos_token": info.eos_token,
            "pad_token": None,
            "add_bos_token": info.add_bos_token,
            "model_max_length": info.context_length,
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        key = authorize(request)
        body = await body_of(request)
        text = body.get("prompt")
        if not isinstance(text, str):
            raise ApiError(400, "prompt must be a string", param="prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise ApiError(
                400, "add_special_tokens must be true or false", param="add_special_tokens"
            )
        model = tokenizer_model(key, body.get("model"))
        tokens = await vocabulary(
            key, "/tokenize", model, lambda: engine.tokenize(model, text, add_special=special), text
        )
        return {"model": model, "count": len(tokens), "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        key = authorize(request)
        body = await body_of(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int and t >= 0 for t in tokens):
            raise ApiError(400, "tokens must be a list of token ids", param="tokens")
        model = tokenizer_model(key, body.get("model"))
        text = await vocabulary(key, "/detokenize", model,
                                lambda: engine.detokenize(model, tokens), None)  # fmt: skip
        return {"model": model, "prompt": text}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "/v1/chat/completions", chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "/v1/completions", chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        key = authorize(request)
        body = await body_of(request)
        model = check_model(key, body.get("model"), ("embedding",))
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(
                400, "input must be a string or a non-empty list of strings", param="input"
            )
        if len(texts) > 2048:
            raise ApiError(400, "input holds more than 2048 texts", param="input")
        name = admit(key)
        started = time.perf_counter()
        try:
            vectors, tokens = await asyncio.get_running_loop().run_in_executor(
                workers, engine.embed, texts, model
            )
        except BastionError as exc:
            error = from_engine_error(exc)
            finish(name, "/v1/embeddings", model, error.status, started)
            raise error from None
        finish(name, "/v1/embeddings", model, 200, started, usage=(tokens, 0))
        return {
            "object": "list",
            "model": model,
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return app
