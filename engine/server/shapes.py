"""OpenAI's shapes: request bodies read into Bastion's types, answers and errors written
as OpenAI's clients expect them (whole, or as server-sent events)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse

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

if TYPE_CHECKING:
    from engine.chat.completion import Completion
    from engine.chat.scoring import ScoredPrompt, TokenScore


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


# OpenAI takes up to 4 stop sequences; vLLM and llama-server take more, and some
# lm-evaluation-harness tasks send 5 or more. 16 keeps the stop filter cheap.
MAX_STOPS = 16


def stops_of(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) for s in stops)
        or len(stops) > MAX_STOPS
    ):
        raise ApiError(
            400, f"stop must be a string or a list of up to {MAX_STOPS} strings", param="stop"
        )
    return [s for s in stops if s]


# Prompts one /v1/completions request may score together (lm-eval's batch_size).
MAX_PROMPTS = 64


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(type(t) is int and t >= 0 for t in value)  # not bool, which is an int too
    )


def prompts_of(body: dict[str, Any]) -> list[str | list[int]]:
    """The prompts of a legacy completions body: a string, a list of token ids, or a list
    of either (a batch), as OpenAI takes them."""
    prompt: Any = body.get("prompt")
    if isinstance(prompt, str) or _token_ids(prompt):
        return [prompt]
    if (
        isinstance(prompt, list)
        and 0 < len(prompt) <= MAX_PROMPTS
        and all(isinstance(p, str) or _token_ids(p) for p in prompt)
    ):
        return list(prompt)
    raise ApiError(
        400,
        f"prompt must be a string, a list of token ids, or a list of up to {MAX_PROMPTS} of either",
        param="prompt",
    )


def echo_of(body: dict[str, Any]) -> tuple[int, int | None] | None:
    """For ``echo: true``, the tokens to add after the prompt (0 or 1) and how many
    alternatives ``logprobs`` asks for at each place (None: no logprobs); else None.

    Bastion echoes to score a prompt (``engine.chat.scoring``): it does not generate after
    it, so ``max_tokens`` may be 0 or 1, and the one token is the likeliest (greedy).
    """
    from engine.chat.scoring import MAX_TOP

    logprobs = _number(body, "logprobs", int, 0, MAX_TOP, None)
    if body.get("echo") is not True:
        if logprobs is not None:
            raise ApiError(
                400,
                "logprobs is supported with echo: true (the prompt's own tokens) only",
                param="logprobs",
            )
        return None
    if body.get("stream"):
        raise ApiError(400, "echo can't be streamed", param="stream")
    wanted = body.get("max_completion_tokens", body.get("max_tokens"))
    after = _number({"max_tokens": wanted}, "max_tokens", int, 0, 1 << 30, 0)
    if after > 1:
        raise ApiError(
            400,
            "with echo, max_tokens must be 0 or 1: Bastion scores the prompt and adds at "
            "most its likeliest next token",
            param="max_tokens",
        )
    return after, logprobs


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


# -- answers ----------------------------------------------------------------------------------


def usage_of(done: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _finish_reason(done: Completion) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def whole_answer(rid: str, done: Completion, chat: bool) -> dict[str, Any]:
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
        "usage": usage_of(done),
    }
    if done.citations:
        result["citations"] = [c.to_public() for c in done.citations]
    return result


def scored_answer(
    rid: str, model: str, scored: list[ScoredPrompt], after: int, logprobs: int | None
) -> dict[str, Any]:
    """The legacy completions answer to ``echo``: each prompt (and its likeliest next
    token, with ``after`` 1) in a choice, with OpenAI's ``logprobs`` object if asked."""
    choices = []
    for index, prompt in enumerate(scored):
        tokens: list[TokenScore] = [*prompt.tokens, *([prompt.next_token] if after else [])]
        choice: dict[str, Any] = {
            "index": index,
            "text": "".join(t.text for t in tokens),
            "finish_reason": "length",
            "logprobs": None,
        }
        if logprobs is not None:
            offsets, at = [], 0
            for t in tokens:
                offsets.append(at)
                at += len(t.text)
            choice["logprobs"] = {
                "tokens": [t.text for t in tokens],
                "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [
                    None if t.logprob is None else dict(t.top[:logprobs]) for t in tokens
                ],
                "text_offset": offsets,
            }
        choices.append(choice)
    prompt_tokens = sum(len(p.tokens) for p in scored)
    completion_tokens = after * len(scored)
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


async def events(
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
                extra: dict[str, Any] = {"usage": usage_of(done)}
                if done.citations:
                    extra["citations"] = [c.to_public() for c in done.citations]
                yield chunk({} if chat else "", _finish_reason(done), extra)
                yield "data: [DONE]\n\n"
                break
    finally:
        if not ended:
            job.cancel("the client closed the stream")
