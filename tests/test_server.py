"""`bastion serve` through the real `openai` client, over loopback, with real keys and models.

One server for the module (a `bastion serve` process on a free port, the default model, a
collection of one document, three keys); each test asks it something else.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from engine.config import update_config
from tests.conftest import BIN, DEFAULT_MODEL, assert_one_line_error

EMBEDDER = "all-minilm-l6-v2"
MANUAL = (
    "Valve maintenance\n\nThe main valve of the Orca pump needs a torque of 42 newton metres. "
    "Check the gasket every six months and replace it when it shows cracks.\n"
)


@dataclass
class Server:
    url: str
    home: Path
    keys: dict[str, str]
    process: subprocess.Popen[str]

    def client(self, key: str = "alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.keys.get(key, key),
                             max_retries=0, timeout=120)  # fmt: skip

    def post(self, path: str, body: dict, key: str = "alice", **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=120, **kw)

    def audit(self) -> list[dict]:
        path = self.home / "logs" / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bastion(home: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "bastion"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "BASTION_HOME": str(home)},
                          check=False)  # fmt: skip


def start_server(home: Path, *args: str) -> tuple[str, subprocess.Popen[str]]:
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "bastion"), "serve", "--port", str(port), *args],
        env={**os.environ, "BASTION_HOME": str(home)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    scheme = "https" if "--tls-cert" in args else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server ended: {process.stderr.read()}")  # type: ignore[union-attr]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return url, process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not start in 60 s")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("server-home")
    keys = {}
    for name, *limits in (("alice",), ("limited", "--rpm", "2"),
                          ("narrow", "--models", EMBEDDER), ("doomed",)):  # fmt: skip
        made = bastion(home, "keys", "create", name, *limits, "--json")
        assert made.returncode == 0, made.stderr
        keys[name] = json.loads(made.stdout)["key"]
    docs = tmp_path_factory.mktemp("docs") / "valves.txt"
    docs.write_text(MANUAL)
    assert bastion(home, "collections", "create", "manual").returncode == 0
    added = bastion(home, "collections", "add", "manual", str(docs))
    assert added.returncode == 0, added.stderr
    update_config(home, audit_log=True)
    url, process = start_server(home)
    yield Server(url, home, keys, process)
    process.terminate()
    process.wait(timeout=30)


def test_models_need_a_key_and_list_everything_served(server: Server) -> None:
    ids = {m.id for m in server.client().models.list()}
    assert {DEFAULT_MODEL, "rag:manual", EMBEDDER} <= ids
    with pytest.raises(openai.AuthenticationError):
        server.client("bst-not-a-key").models.list()
    bare = httpx.get(server.url + "/v1/models", timeout=30)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}
    assert {m.id for m in server.client("narrow").models.list()} == {EMBEDDER}


def test_streamed_and_whole_answers_agree(server: Server) -> None:
    client = server.client()
    ask = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Name a colour."}],
           "max_tokens": 16, "temperature": 0, "seed": 7}  # fmt: skip
    whole = client.chat.completions.create(**ask)
    text = whole.choices[0].message.content
    assert text and whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    pieces, finish = [], None
    for chunk in client.chat.completions.create(**ask, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert "".join(pieces) == text
    assert finish == whole.choices[0].finish_reason


def test_stop_json_schema_and_legacy_completions(server: Server) -> None:
    client = server.client()
    done = client.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is",
                                     max_tokens=12, temperature=0, stop=["."])  # fmt: skip
    assert "." not in done.choices[0].text and done.choices[0].finish_reason == "stop"
    schema = {"type": "object", "properties": {"name": {"type": "string"},
              "age": {"type": "integer"}}, "required": ["name", "age"]}  # fmt: skip
    answer = client.chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )  # fmt: skip
    person = json.loads(answer.choices[0].message.content)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_echo_scores_each_prompt_token_as_llama_cpp_does(server: Server) -> None:
    import numpy as np

    from engine.models.runtime import plain_llama
    from tests.conftest import default_model_path

    text = "The quick brown fox jumps over the lazy dog, and the dog sleeps."
    tokenized = server.post("/tokenize", {"prompt": text, "add_special_tokens": False})
    tokens = tokenized.json()["tokens"]
    assert tokenized.status_code == 200 and len(tokens) > 10
    done = server.client().completions.create(model=DEFAULT_MODEL, prompt=tokens, echo=True,
                                              logprobs=1, max_tokens=1, temperature=0)  # fmt: skip
    choice = done.choices[0]
    assert choice.logprobs is not None and done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(tokens), 1)
    got = choice.logprobs.token_logprobs
    assert got is not None and len(got) == len(tokens) + 1 and got[0] is None

    # llama-cpp-python's own logits for the same tokens, in this process.
    llm = plain_llama(str(default_model_path()), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logsoftmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    want = [logsoftmax[i - 1, tokens[i]] for i in range(1, len(tokens))]
    assert got[1:-1] == pytest.approx(want, abs=0.02)
    assert sum(got[1:-1]) == pytest.approx(sum(want), abs=0.05)
    # The one token after the prompt is the likeliest, and the top-1 of every place is it or
    # better; a token that is the top-1 has the very same number there (lm-eval's is_greedy).
    greedy = int(logsoftmax[-1].argmax())
    assert choice.logprobs.tokens[-1] == llm.detokenize([greedy]).decode()
    llm.close()
    tops = choice.logprobs.top_logprobs
    assert tops is not None and tops[0] is None
    for i in range(1, len(tokens) + 1):
        (best,) = tops[i].values()
        assert best >= got[i]
        if i < len(tokens) and int(logsoftmax[i - 1].argmax()) == tokens[i]:
            assert best == got[i]
    offsets = choice.logprobs.text_offset
    assert choice.text.startswith(text) and offsets is not None
    pieces = choice.logprobs.tokens
    assert [choice.text[o : o + len(t)] for o, t in zip(offsets, pieces, strict=True)] == pieces


def test_tokenizer_routes_and_scoring_need_a_key_and_refuse_what_they_cant_do(
    server: Server,
) -> None:
    assert httpx.get(server.url + "/tokenizer_info", timeout=30).status_code == 401
    assert server.post("/tokenize", {"prompt": "x"}, key="").status_code == 401
    alice = {"Authorization": f"Bearer {server.keys['alice']}"}
    info = httpx.get(server.url + "/tokenizer_info", headers=alice, timeout=30).json()
    assert info["model"] == DEFAULT_MODEL and info["eos_token"] == "<|im_end|>"
    tokens = server.post("/tokenize", {"prompt": "Valve torque: 42 Nm", "model": DEFAULT_MODEL})
    back = server.post("/detokenize", {"tokens": tokens.json()["tokens"]})
    assert back.json()["prompt"] == "Valve torque: 42 Nm"
    # A key limited to the embedder may not use the chat model's tokenizer either.
    narrow = server.post("/tokenize", {"prompt": "x"}, key="narrow")
    assert narrow.status_code == 403 and narrow.json()["error"]["code"] == "model_not_allowed"
    before = len(server.audit())
    base = {"model": DEFAULT_MODEL, "echo": True, "logprobs": 1}
    for body, param in (
        ({**base, "prompt": "x", "max_tokens": 5}, "max_tokens"),
        ({**base, "prompt": "x", "stream": True}, "stream"),
        ({**base, "prompt": [True, 2]}, "prompt"),
        ({**base, "prompt": "x", "logprobs": 9}, "logprobs"),
        ({"model": DEFAULT_MODEL, "prompt": "x", "logprobs": 1}, "logprobs"),
        ({**base, "prompt": "x", "model": "rag:manual"}, "model"),
    ):
        refused = server.post("/v1/completions", body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, body
    too_long = server.post("/v1/completions", {**base, "prompt": [42] * 5000})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    unknown = server.post("/v1/completions", {**base, "prompt": [10**9]})
    assert unknown.status_code == 400 and "vocabulary" in unknown.json()["error"]["message"]
    # Scoring two prompts in one request, each a choice; then the model still generates.
    both = server.post("/v1/completions", {**base, "prompt": ["Hi there", [42, 43]],
                                            "max_tokens": 0})  # fmt: skip
    assert [len(c["logprobs"]["tokens"]) for c in both.json()["choices"]] == [
        len(server.post("/tokenize", {"prompt": "Hi there"}).json()["tokens"]), 2]  # fmt: skip
    after = server.client().completions.create(model=DEFAULT_MODEL, prompt=[42, 43],
                                               max_tokens=3, temperature=0)  # fmt: skip
    assert after.usage is not None and after.usage.prompt_tokens == 2
    recorded = {(r["endpoint"], r["status"]) for r in server.audit()[before:]}
    assert {("/v1/completions", 400), ("/v1/completions", 200), ("/tokenize", 200)} <= recorded


def test_embeddings_are_unit_vectors_of_the_embedder(server: Server) -> None:
    result = server.client().embeddings.create(model=EMBEDDER, input=["a valve", "a valve", "cats"])
    vectors = [item.embedding for item in result.data]
    assert [len(v) for v in vectors] == [384] * 3
    assert abs(sum(x * x for x in vectors[0]) - 1) < 1e-3
    assert vectors[0] == vectors[1] != vectors[2]
    assert result.usage.prompt_tokens > 0


def test_a_collection_is_a_model_that_cites(server: Server) -> None:
    reply = server.post("/v1/chat/completions", {
        "model": "rag:manual", "max_tokens": 40, "temperature": 0,
        "messages": [{"role": "user", "content": "What torque does the Orca main valve need?"}],
    })  # fmt: skip
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["citations"] and body["citations"][0]["path"].endswith("valves.txt")
    assert body["choices"][0]["message"]["content"]


def test_limits_answer_429_with_retry_after_and_403_for_other_models(server: Server) -> None:
    ask = {"model": EMBEDDER, "input": "x"}
    assert [server.post("/v1/embeddings", ask, "limited").status_code for _ in range(2)] == [
        200, 200]  # fmt: skip
    refused = server.post("/v1/embeddings", ask, "limited")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        server.client("limited").embeddings.create(model=EMBEDDER, input="x")
    with pytest.raises(openai.PermissionDeniedError):
        server.client("narrow").chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


def test_bad_requests_get_openai_errors(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEFAULT_MODEL, temperature=5,
                                       messages=[{"role": "user", "content": "x"}])  # fmt: skip
    big = server.post("/v1/embeddings", {"model": EMBEDDER, "input": "x" * (2 << 20)})
    assert big.status_code == 413 and "error" in big.json()
    # Above the cap, max_tokens is lowered, not refused.
    capped = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=10**6,
        messages=[{"role": "user", "content": "hi"}], stop=["\n", "."])  # fmt: skip
    assert capped.choices[0].finish_reason in ("stop", "length")


def test_a_closed_stream_stops_its_generation_and_is_audited(server: Server) -> None:
    before = len(server.audit())
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {server.keys['alice']}"},
                      json={"model": DEFAULT_MODEL, "stream": True, "max_tokens": 1500,
                            "temperature": 1.0, "seed": 3, "messages": [
                                {"role": "user", "content": "Write a very long story."}]},
                      ) as response:  # fmt: skip
        lines = response.iter_lines()
        seen = [line for _, line in zip(range(8), lines, strict=False)]
        assert any('"content"' in line for line in seen)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        r["status"] == 499 for r in server.audit()[before:]
    ):
        time.sleep(0.2)
    closed = [r for r in server.audit()[before:] if r["status"] == 499]
    assert closed, server.audit()[before:]
    assert 0 < closed[0]["completion_tokens"] < 1500  # stopped, long before its end
    records = server.audit()
    assert {"time", "key", "model", "endpoint", "status", "latency_ms", "prompt_tokens",
            "completion_tokens"} <= set(records[-1])  # fmt: skip
    assert all("prompt" not in r for r in records if r["event"] == "request")  # text is opt-in
    path = server.home / "logs" / "audit.log"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keys_are_kept_as_hashes_and_revoked_at_once(server: Server) -> None:
    database = (server.home / "bastion.db").read_bytes()
    for key in server.keys.values():
        assert key.encode() not in database
    listed = json.loads(bastion(server.home, "keys", "list", "--json").stdout)
    assert {k["name"] for k in listed} >= {"alice", "doomed"}
    assert all(server.keys[k["name"]].startswith(k["prefix"]) for k in listed)
    assert server.client("doomed").models.list()
    assert bastion(server.home, "keys", "revoke", "doomed").returncode == 0
    with pytest.raises(openai.AuthenticationError):
        server.client("doomed").models.list()
    assert_one_line_error(_cli(server.home, "keys", "create", "alice"), 2, "exists")


def _cli(home: Path, *args: str):  # type: ignore[no-untyped-def]
    from tests.conftest import CLIResult

    done = bastion(home, *args)
    return CLIResult(done.returncode, done.stdout, done.stderr)


def test_serve_is_secure_by_default(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert_one_line_error(_cli(home, "serve", "--host", "0.0.0.0", "--no-auth"), 2, "--no-auth")
    assert_one_line_error(_cli(home, "serve", "--host", "0.0.0.0"), 2, "needs API keys")
    assert_one_line_error(_cli(home, "serve", "--tls-cert", str(tmp_path / "c.pem")), 2,
                          "go together")  # fmt: skip


def test_no_auth_on_loopback_warns_and_tls_serves_https(tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    home = tmp_path / "home"
    url, process = start_server(home, "--no-auth")
    try:
        assert server_models(url) >= {DEFAULT_MODEL}
    finally:
        process.terminate()
        assert "warning: --no-auth" in process.communicate(timeout=30)[1]

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))  # fmt: skip
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    assert bastion(home, "keys", "create", "tls").returncode == 0
    url, process = start_server(home, "--tls-cert", str(cert_file), "--tls-key", str(key_file))
    try:
        assert url.startswith("https://")
        health = httpx.get(
            url + "/health", verify=ssl.create_default_context(cafile=str(cert_file)), timeout=30
        )
        assert health.json() == {"status": "ok"}
        assert (
            httpx.get(
                url + "/v1/models",
                verify=ssl.create_default_context(cafile=str(cert_file)),
                timeout=30,
            ).status_code
            == 401
        )
    finally:
        process.terminate()
        process.wait(timeout=30)


def server_models(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
