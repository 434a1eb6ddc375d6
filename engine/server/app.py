"""The OpenAI-compatible HTTP API over one ``Engine`` (FastAPI; ``bastion serve`` runs it).

Routes: ``GET /health`` (no key), ``GET /v1/models``, ``POST /v1/chat/completions``
(streamed as server-sent events or not), ``POST /v1/completions``, ``POST /v1/embeddings``.
Every ``/v1`` call needs ``Authorization: Bearer <key>`` unless the server runs with
``--no-auth`` on loopback. Errors are OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``, with the status that fits the engine's exception.

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
    events,
    from_engine_error,
    messages_of,
    sampling_of,
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
        model = check_model(key, body.get("model"), ("chat", "rag"))
        sampling = sampling_of(body, options.max_tokens_cap)
        stop = stops_of(body)
        if chat:
            messages = messages_of(body)
            prompt_text = messages[-1].content
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or (model.startswith("rag:")):
                raise ApiError(
                    400, "prompt must be a string (and the model not a collection)", param="prompt"
                )
            prompt_text = prompt
        name = admit(key)
        started = time.perf_counter()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]

        def work(job: JobContext, on_text: Callable[[str], None] | None = None) -> Completion:
            if chat:
                return engine.complete(
                    model, messages, sampling, stop=stop, ctx=job, on_text=on_text
                )
            return engine.complete_text(
                model, prompt_text, sampling, stop=stop, ctx=job, on_text=on_text
            )

        if not body.get("stream"):
            try:
                done = await run_blocking(request, work)
            except BastionError as exc:
                error = from_engine_error(exc)
                finish(name, endpoint, model, error.status, started, prompt=prompt_text)
                raise error from None
            status = 499 if done.finish_reason == "cancelled" else 200
            finish(name, endpoint, model, status, started, done, prompt_text)
            return JSONResponse(whole_answer(rid, done, chat))
        return StreamingResponse(
            events(
                work,
                rid,
                model,
                chat,
                lambda status, done: finish(
                    name, endpoint, model, status, started, done, prompt_text
                ),
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

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
