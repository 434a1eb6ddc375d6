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
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.chat.templates import ChatMessage
from engine.errors import (
    BastionError,
    ContextOverflow,
    EnvironmentFault,
    InvalidInput,
    ModelCrashed,
    NotFound,
)
from engine.jobs import JobContext
from engine.models.runtime import SamplingParams
from engine.privacy.audit import AuditLog
from engine.server.keys import ApiKey
from engine.server.limits import Limiter

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


class ApiError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.code, self.param, self.headers = code, param, headers or {}

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def from_engine_error(exc: BastionError) -> ApiError:
    """The API error for an engine exception."""
    message = exc.message + (f" ({exc.hint})" if getattr(exc, "hint", None) else "")
    if isinstance(exc, NotFound):
        return ApiError(404, message, code="not_found")
    if isinstance(exc, ContextOverflow):
        return ApiError(400, message, code="context_length_exceeded")
    if isinstance(exc, InvalidInput):
        return ApiError(400, message)
    if isinstance(exc, ModelCrashed):
        return ApiError(502, message, "server_error", code="model_crashed")
    if isinstance(exc, EnvironmentFault):
        return ApiError(503, message, "server_error")
    return ApiError(500, message, "server_error")


# -- request bodies ------------------------------------------------------------------------


def _number(
    body: dict[str, Any], name: str, kind: type, low: float, high: float, default: Any
) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number", param=name)
    if kind is int and value != int(value):
        raise ApiError(400, f"{name} must be a whole number", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}", param=name)
    return kind(value)


def sampling_of(body: dict[str, Any], cap: int) -> SamplingParams:
    """Sampling from an OpenAI body; ``max_tokens`` above ``cap`` is lowered to it."""
    defaults = SamplingParams()
    wanted = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": wanted}, "max_tokens", int, 1, 1 << 30, cap)
    schema = None
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise ApiError(400, "response_format must be an object", param="response_format")
        kind = response_format.get("type")
        if kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ApiError(
                    400,
                    "response_format.json_schema.schema must be an object",
                    param="response_format",
                )
            schema = json.dumps(spec["schema"])
        elif kind == "json_object":
            schema = json.dumps({"type": "object"})
        elif kind not in (None, "text"):
            raise ApiError(400, f"unknown response_format type {kind!r}", param="response_format")
    return SamplingParams(
        max_tokens=min(max_tokens, cap),
        temperature=_number(body, "temperature", float, 0, 2, defaults.temperature),
        top_p=_number(body, "top_p", float, 0, 1, defaults.top_p),
        seed=_number(body, "seed", int, -(1 << 63), (1 << 63) - 1, None),
        json_schema=schema,
    )


def stops_of(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    return [s for s in stops if s]


def _content(value: Any) -> str:
    """A message's content: a string, or the text parts of a list of parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, "only text content parts are supported", param="messages")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    if value is None:
        return ""
    raise ApiError(400, "message content must be a string or a list of parts", param="messages")


def messages_of(body: dict[str, Any]) -> list[ChatMessage]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    messages = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise ApiError(400, "each message needs a role", param="messages")
        role = "system" if item["role"] == "developer" else item["role"]
        messages.append(ChatMessage(role, _content(item.get("content"))))
    return messages


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
            return JSONResponse(_full(rid, done, chat))
        return StreamingResponse(
            _events(
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


def _usage(done: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _finish_reason(done: Completion) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _full(rid: str, done: Completion, chat: bool) -> dict[str, Any]:
    created = int(time.time())
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": _finish_reason(done),
            "message": {"role": "assistant", "content": done.text},
        }
        kind = "chat.completion"
    else:
        choice = {
            "index": 0,
            "finish_reason": _finish_reason(done),
            "text": done.text,
            "logprobs": None,
        }
        kind = "text_completion"
    result = {
        "id": rid,
        "object": kind,
        "created": created,
        "model": done.model,
        "choices": [choice],
        "usage": _usage(done),
    }
    if done.citations:
        result["citations"] = [c.to_public() for c in done.citations]
    return result


async def _events(
    work: Callable[[JobContext, Callable[[str], None]], Completion],
    rid: str,
    model: str,
    chat: bool,
    finish: Callable[[int, Completion | None], None],
) -> AsyncIterator[str]:
    """Server-sent events of one generation; closing the stream cancels it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    job = JobContext()

    def on_text(text: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ("text", text))

    def run() -> None:
        # Recorded here, when the generation has really ended: a stream the client closed
        # is counted (status 499) with the tokens made before the cancel reached the model.
        try:
            done = work(job, on_text)
        except BaseException as exc:  # reported in the stream, whatever it was
            error = from_engine_error(exc) if isinstance(exc, BastionError) else None
            finish(499 if job.cancelled else error.status if error else 500, None)
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
        else:
            finish(499 if job.cancelled else 200, done)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", done))

    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        delta: dict[str, Any] | str,
        finish_reason: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish_reason, "logprobs": None}
        data = {
            "id": rid,
            "object": kind,
            "created": created,
            "model": model,
            "choices": [choice],
            **(extra or {}),
        }
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    thread = threading.Thread(target=run, name=f"bastion-{rid}", daemon=True)
    thread.start()
    ended = False
    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        while True:
            what, value = await queue.get()
            if what == "text":
                yield chunk({"content": value} if chat else value)
            elif what == "error":
                error = (
                    from_engine_error(value)
                    if isinstance(value, BastionError)
                    else ApiError(500, "the server failed", "server_error")
                )
                ended = True
                body = {"error": {"message": error.message, "type": error.kind, "code": error.code}}
                yield f"data: {json.dumps(body)}\n\n"
                break
            else:
                done = value
                ended = True
                extra: dict[str, Any] = {"usage": _usage(done)}
                if done.citations:
                    extra["citations"] = [c.to_public() for c in done.citations]
                yield chunk({} if chat else "", _finish_reason(done), extra)
                yield "data: [DONE]\n\n"
                break
    finally:
        if not ended:
            job.cancel("the client closed the stream")
