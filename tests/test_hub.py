"""Models from the hub: search and pull through huggingface-hub's real client code against a
hub stand-in on loopback (tests/fake_hub.py): resumable, SHA-256 checked, cache reused."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

import pytest

from engine import Engine
from engine.errors import Cancelled, InvalidInput, NetworkBlocked
from engine.jobs import JobContext, Progress
from engine.models import hub
from tests.conftest import assert_one_line_error
from tests.fake_hub import REPO, FakeHub


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_search_lists_gguf_files_with_size_licence_and_fit(cli: Any, fake_hub: FakeHub) -> None:
    found = cli("models", "search", "tiny", "--json").json()
    assert [r["repo"] for r in found] == [REPO]
    (repo,) = found
    assert repo["license"] == "apache-2.0" and repo["downloads"] == 1234
    files = {f["name"]: f for f in repo["files"]}
    assert set(files) == {"tiny-test.F32.gguf", "tiny-test.Q4_K_M.gguf"}  # no README
    assert files["tiny-test.Q4_K_M.gguf"]["quant"] == "Q4_K_M"
    assert files["tiny-test.F32.gguf"]["fits"] in ("ram", "gpu")
    plain = cli("models", "search", "tiny")
    assert plain.code == 0 and "Q4_K_M" in plain.stdout and "licence apache-2.0" in plain.stdout
    assert cli("models", "search", "nothing-like-this", "--json").json() == []


def test_pull_downloads_checks_and_registers(cli: Any, fake_hub: FakeHub, home: Path) -> None:
    entry = cli("models", "pull", f"{REPO}:F32", "--id", "tiny", "--json").json()
    assert entry["id"] == "tiny" and entry["arch"] == "llama"
    path = Path(entry["path"])
    assert path.parent == home / "models" and path.name == "tiny-test.F32.gguf"
    assert _sha(path) == hashlib.sha256(fake_hub.repos[REPO].files[path.name]).hexdigest()
    assert not list((home / "models").glob(".*.part"))
    assert [m["id"] for m in cli("models", "list", "--json").json()].count("tiny") == 1
    # A quantization the repository lacks, a repository that does not exist, a bad spec.
    assert_one_line_error(cli("models", "pull", f"{REPO}:Q2_K"), 2, "no GGUF file 'Q2_K'")
    assert_one_line_error(cli("models", "pull", "nobody/nothing"), 2, "no repository")
    assert_one_line_error(cli("models", "pull", "not-a-repo"), 2, "OWNER/NAME")


def test_a_dropped_connection_resumes_from_where_it_stopped(
    engine: Engine, fake_hub: FakeHub
) -> None:
    from huggingface_hub import constants

    # The client writes what it read in blocks of DOWNLOAD_CHUNK_SIZE (10 MB): the cut comes
    # after the first block, and only the rest is asked for again.
    fake_hub.cut_after = constants.DOWNLOAD_CHUNK_SIZE + 500_000
    entry = engine.pull_model(f"{REPO}:Q4_K_M", None, JobContext())
    assert fake_hub.ranges == [None, f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"]
    data = fake_hub.repos[REPO].files["tiny-test.Q4_K_M.gguf"]
    assert _sha(Path(entry.path)) == hashlib.sha256(data).hexdigest()


def test_a_cancelled_pull_keeps_its_part_and_the_next_one_resumes(
    engine: Engine, fake_hub: FakeHub
) -> None:
    reports: list[Progress] = []
    job = JobContext(on_progress=reports.append)
    original = job.report

    def cancel_after_first_bytes(done: float, *args: Any, **kwargs: Any) -> None:
        original(done, *args, **kwargs)
        if done > 0:
            job.cancel("test")

    job.report = cancel_after_first_bytes  # type: ignore[method-assign]
    with pytest.raises(Cancelled):
        engine.pull_model(f"{REPO}:Q4_K_M", None, job)
    (part,) = (engine.home / "models").glob(".*.part")
    kept = part.stat().st_size
    assert 0 < kept < len(fake_hub.repos[REPO].files["tiny-test.Q4_K_M.gguf"])
    assert reports and reports[-1].total and "MB/s" in reports[-1].label
    entry = engine.pull_model(f"{REPO}:Q4_K_M", None, JobContext())
    assert fake_hub.ranges[-1] == f"bytes={kept}-"
    assert not part.exists() and Path(entry.path).is_file()


def test_a_corrupted_download_is_refused_and_deleted(
    cli: Any, fake_hub: FakeHub, home: Path
) -> None:
    fake_hub.corrupt = True
    result = cli("models", "pull", f"{REPO}:F32")
    assert_one_line_error(result, 1, "does not match the hub's SHA-256")
    assert "tiny-test.f32" not in [m["id"] for m in cli("models", "list", "--json").json()]
    assert not list((home / "models").glob("*tiny-test*")) and not list(
        (home / "models").glob(".*.part")
    )


def test_a_file_in_the_local_hugging_face_cache_is_not_downloaded_again(
    engine: Engine, fake_hub: FakeHub
) -> None:
    from huggingface_hub import hf_hub_download

    with hub.online("test: fill the cache"):
        hf_hub_download(REPO, "tiny-test.F32.gguf")
    downloads_before = sum("/resolve/" in p and not p.startswith("HEAD") for p in fake_hub.paths)
    entry = engine.pull_model(f"{REPO}:F32", "from-cache", JobContext())
    downloads_after = sum("/resolve/" in p and not p.startswith("HEAD") for p in fake_hub.paths)
    assert downloads_after == downloads_before
    assert Path(entry.path).parent == engine.home / "models"


def test_the_hub_call_opens_the_network_to_the_hubs_hosts_only(fake_hub: FakeHub) -> None:
    from engine.privacy import guard

    guard.activate()
    with hub.online("test"):
        assert "huggingface.co" in hub.hub_hosts() and "127.0.0.1" in hub.hub_hosts()
        with pytest.raises(NetworkBlocked):
            socket.getaddrinfo("example.com", 443)
        with pytest.raises(NetworkBlocked):  # an address no allowed name resolved to
            socket.create_connection(("192.0.2.1", 443), timeout=0.01)
    with pytest.raises(NetworkBlocked):  # and closed again after the call
        socket.getaddrinfo("huggingface.co", 443)


def test_the_token_from_the_keyring_goes_to_the_hub(cli: Any, fake_hub: FakeHub) -> None:
    stored = cli("secrets", "set", "hf-token", input="hf_secret_token_123\n")
    assert stored.code == 0 and "hf_secret_token_123" not in stored.stdout + stored.stderr
    assert fake_hub.tokens == []
    assert cli("models", "search", "tiny", "--json").code == 0
    assert fake_hub.tokens and set(fake_hub.tokens) == {"Bearer hf_secret_token_123"}
    assert cli("secrets", "delete", "hf-token").code == 0
    fake_hub.tokens.clear()
    assert cli("models", "search", "tiny", "--json").code == 0
    assert set(fake_hub.tokens) == {None}
    assert_one_line_error(cli("secrets", "set", "Bad Name", input="x\n"), 2, "not a secret name")


def test_choosing_a_file() -> None:
    files = [
        hub.HubFile("m.Q8_0.gguf", 8, None, "Q8_0"),
        hub.HubFile("m.Q4_K_M.gguf", 4, None, "Q4_K_M"),
        hub.HubFile("m-Q2_K-00001-of-00002.gguf", 1, None, "Q2_K"),
    ]
    assert hub.choose_file("o/m", files, None).name == "m.Q4_K_M.gguf"  # the usual pick
    assert hub.choose_file("o/m", files, "q8_0").name == "m.Q8_0.gguf"
    assert hub.choose_file("o/m", files, "m.Q8_0.gguf").name == "m.Q8_0.gguf"
    with pytest.raises(Exception, match="split GGUF"):
        hub.choose_file("o/m", files, "m-Q2_K-00001-of-00002.gguf")
    assert hub.quant_of("Llama-3.2-1B-Instruct-IQ4_XS.gguf") == "IQ4_XS"
    assert hub.quant_of("model-f16.gguf") == "F16"
    assert hub.parse_spec("a/b:Q4_K_M") == ("a/b", "Q4_K_M")
    with pytest.raises(InvalidInput, match="OWNER/NAME"):
        hub.parse_spec("a:b")
