"""Models served elsewhere: an OpenAI-compatible server (vLLM, llama-server, TGI, another
Bastion) registered as a model and used like a local one.

    bastion models add-remote NAME --url URL [--model ID] [--api-key-from-keyring SECRET]

The registry keeps the URL (``.../v1``), the model's id there and the name of the keyring
secret holding its API key (never the key). Each call opens the privacy guard to that URL's
host alone, for that call alone (``guard.allow_network``): an office that moves its models
to a GPU server keeps Bastion's documents, keys and audit on the workstation, and nothing
else of Bastion ever connects anywhere. Answers stream as server-sent events; cancelling
closes the stream, which stops generation on servers that watch for it (vLLM,
llama-server and Bastion all do).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from engine.errors import InvalidInput, NotFound, OperationFailed
from engine.jobs import JobContext
from engine.models.runtime import GenerationDone, SamplingParams, StreamEvent, TokenChunk
from engine.privacy import guard

TIMEOUT_S = 600.0


def check_url(url: str) -> str:
    """``url`` as the base of the OpenAI API (ending in ``/v1``), or InvalidInput."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"{url!r} is not an http(s) URL", hint="e.g. http://gpu-box:8000/v1")
    base = url.strip().rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def host_of(url: str) -> str:
    return str(urlsplit(url).hostname)


class RemoteClient:
    """Calls to one OpenAI-compatible server, each inside its own guard allowance."""

    def __init__(self, url: str, api_key: str | None, what: str) -> None:
        self.url = check_url(url)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._what = what

    def _allowed(self) -> Any:
        return guard.allow_network(f"remote model {self._what}", hosts=[host_of(self.url)])

    def _fail(self, exc: Exception) -> OperationFailed:
        return OperationFailed(
            f"the remote model {self._what} at {self.url} did not answer: {exc}".splitlines()[0],
            hint="check that its server runs and that this machine may reach it",
        )

    def models(self) -> list[dict[str, Any]]:
        """The server's ``/v1/models`` list."""
        import httpx

        try:
            with self._allowed():
                response = httpx.get(self.url + "/models", headers=self._headers, timeout=30)
        except httpx.HTTPError as exc:
            raise self._fail(exc) from exc
        if response.status_code in (401, 403):
            raise InvalidInput(
                f"the server at {self.url} refused the API key ({response.status_code})",
                hint="store its key with `bastion secrets set NAME`, then --api-key-from-keyring",
            )
        if response.status_code != 200:
            raise self._fail(RuntimeError(f"HTTP {response.status_code}"))
        data = response.json().get("data")
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []

    def stream(
        self,
        model: str,
        payload: dict[str, Any],
        sampling: SamplingParams,
        ctx: JobContext,
        started: float,
        *,
        stop: Sequence[str] = (),
    ) -> Iterator[StreamEvent]:
        """Stream an answer: ``payload`` holds ``messages`` (chat) or ``prompt`` (text)."""
        import httpx

        chat = "messages" in payload
        body: dict[str, Any] = {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            **payload,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if stop:
            body["stop"] = list(stop)
        if sampling.json_schema:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": json.loads(sampling.json_schema)},
            }
        endpoint = self.url + ("/chat/completions" if chat else "/completions")
        produced, usage, reason, ttft = 0, None, "stop", None
        try:
            with (
                self._allowed(),
                httpx.stream(
                    "POST", endpoint, json=body, headers=self._headers, timeout=TIMEOUT_S
                ) as response,
            ):
                if response.status_code == 404:
                    raise NotFound(f"the server at {self.url} has no model {model!r}")
                if response.status_code != 200:
                    response.read()
                    raise self._fail(
                        RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                    )
                for line in response.iter_lines():
                    if ctx.cancelled:
                        reason = "cancelled"
                        break  # leaving the block closes the stream: the server stops
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    data = json.loads(line[5:])
                    if "error" in data:
                        raise self._fail(RuntimeError(str(data["error"])[:200]))
                    usage = data.get("usage") or usage
                    for choice in data.get("choices") or []:
                        text = (
                            (choice.get("delta") or {}).get("content")
                            if chat
                            else choice.get("text")
                        )
                        if text:
                            if ttft is None:
                                ttft = time.perf_counter() - started
                            produced += 1
                            yield TokenChunk(text)
                        if choice.get("finish_reason") == "length":
                            reason = "length"
        except httpx.HTTPError as exc:
            raise self._fail(exc) from exc
        prompt_tokens = int(usage.get("prompt_tokens", 0)) if usage else 0
        completion = int(usage.get("completion_tokens", produced)) if usage else produced
        yield GenerationDone(prompt_tokens, completion, ttft, time.perf_counter() - started, reason)
