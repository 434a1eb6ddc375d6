"""The embedder: offline loading, int8 export and its cache, fallbacks, clear errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engine.errors import Cancelled, InvalidInput, NotFound, OperationFailed
from engine.rag import embedder as emb
from engine.rag.embedder import (
    DEFAULT_EMBEDDER,
    Embedder,
    choice,
    clear_embedder_cache,
    get_embedder,
    loader,
    onnx_backend,
    resolve_embedder,
)
from engine.rag.embedder.cache import INT8_FILE, STATUS_FILE
from tests.tiny_embedder import tiny_model

ROOT = Path(__file__).resolve().parent.parent

OFFLINE_SCRIPT = """
import json, sys
from pathlib import Path
from engine.privacy import guard
guard.activate()
from engine.rag.embedder import get_embedder
e = get_embedder(cache_dir=Path(sys.argv[1]), backend=sys.argv[2])
v = e.encode(["an offline check", "a second, longer sentence to embed in the same batch"])
print(json.dumps({"backend": e.backend, "dimension": e.dimension,
                  "norms": [float(x) for x in (v * v).sum(axis=1)],
                  "blocked": len(guard.blocked_attempts())}))
"""

# Not the probe set the export is checked on: the check must hold on other text too.
VARIED = [
    "Where can I find the warranty terms for my washing machine?",
    "The board approved a dividend of 0.45 EUR per share for fiscal year 2023.",
    "Mitochondria are the site of oxidative phosphorylation in eukaryotic cells.",
    "for i in range(10): print(i ** 2)",
    "Bitte senden Sie die unterschriebene Vollmacht bis Freitag zurück.",
    "invoice",
    "The defendant's motion to dismiss was denied because the complaint stated a plausible "
    "claim, and discovery will proceed on the schedule set at the initial conference, with "
    "depositions of both engineers expected before the end of the quarter and expert "
    "reports due thirty days after that.",
    "Mount the drive read-only, then copy the logs from /var/log to the backup server.",
]


@pytest.fixture(scope="module", autouse=True)
def _clean_process_cache() -> Iterator[None]:
    clear_embedder_cache()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(emb.BACKEND_ENV, raising=False)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield
    clear_embedder_cache()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """The default embedder exported to int8 in a fresh process with the network guard on."""
    cache = tmp_path_factory.mktemp("embedders")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", emb.BACKEND_ENV: ""}
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(cache), "onnx-int8"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cache, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def int8(exported: tuple[Path, dict[str, object]]) -> Embedder:
    return get_embedder(cache_dir=exported[0], backend="onnx-int8")


@pytest.fixture(scope="module")
def fp32(exported: tuple[Path, dict[str, object]]) -> Embedder:
    return get_embedder(cache_dir=exported[0], backend="torch-fp32")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(np.sum(a * b, axis=1))


# -- the default embedder -----------------------------------------------------------------


def test_default_exports_and_embeds_offline_in_a_fresh_process(
    exported: tuple[Path, dict[str, object]],
) -> None:
    cache, result = exported
    assert result["backend"] == "onnx-int8"
    assert result["dimension"] == 384
    assert result["blocked"] == 0  # nothing even tried to connect
    assert np.allclose(result["norms"], 1.0, atol=1e-5)  # type: ignore[arg-type]
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    status = json.loads((folder / STATUS_FILE).read_text())
    assert status["ok"] and status["min_cosine"] >= onnx_backend.MIN_PROBE_COSINE
    assert not list(folder.glob(".export-*"))  # the temporary work folder is gone


def test_default_embedder_vectors_are_unit_length_and_semantic(int8: Embedder) -> None:
    assert (int8.model_id, int8.dimension, int8.max_tokens) == (DEFAULT_EMBEDDER, 384, 256)
    vectors = int8.encode(
        [
            "A cat is sleeping on the sofa.",
            "The kitten naps on the couch.",
            "Interest rates rose by half a percentage point.",
        ]
    )
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert vectors.flags["C_CONTIGUOUS"]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated + 0.3, (similar, unrelated)
    assert int8.encode([]).shape == (0, 384)


def test_int8_agrees_with_fp32_on_varied_text(int8: Embedder, fp32: Embedder) -> None:
    assert (int8.backend, fp32.backend) == ("onnx-int8", "torch-fp32")
    cosines = _cos(int8.encode(VARIED), fp32.encode(VARIED))
    assert cosines.min() >= 0.98, cosines
    # Alone (as a query is embedded), each text holds too. int8 activations are scaled per
    # batch, so the same text differs slightly between batches; fp32 is the fixed point.
    one_by_one = np.stack([int8.encode([t])[0] for t in VARIED])
    assert _cos(one_by_one, fp32.encode(VARIED)).min() >= 0.98


def test_export_is_reused_by_a_later_load(
    exported: tuple[Path, dict[str, object]], int8: Embedder
) -> None:
    cache = exported[0]
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    clear_embedder_cache()
    again = get_embedder(cache_dir=cache, backend="onnx-int8")
    assert again is not int8 and again.backend == "onnx-int8"
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_the_process_cache_returns_the_same_object(
    exported: tuple[Path, dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "_cuda_available", lambda: False)
    clear_embedder_cache()
    first = get_embedder(cache_dir=exported[0])
    # auto takes the backend measured fastest here (and recorded): whichever it is, the
    # same object serves both ways of asking for it.
    assert first.backend == emb.recorded_backend(emb.DEFAULT_EMBEDDER, exported[0]).backend
    assert get_embedder(cache_dir=exported[0]) is first
    assert get_embedder(cache_dir=exported[0], backend=first.backend) is first


def test_auto_measures_the_backends_once_records_the_fastest_faithful_and_reuses_it(
    exported: tuple[Path, dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "_cuda_available", lambda: False)
    cache = exported[0]
    (cache / choice.CHOICE_FILE).unlink(missing_ok=True)
    clear_embedder_cache()
    chosen = get_embedder(cache_dir=cache)
    record = emb.recorded_backend(DEFAULT_EMBEDDER, cache)
    assert record is not None and record.backend == chosen.backend
    trials = {t.backend: t for t in record.trials}
    bf16 = choice.has_fast_bf16(choice.cpu_flags())
    assert set(trials) == {"torch-fp32", "onnx-int8", *(["torch-bf16"] if bf16 else [])}
    assert all(t.texts_per_second and t.texts_per_second > 0 for t in trials.values())
    assert trials["onnx-int8"].ok and (trials["onnx-int8"].min_cosine or 0) >= 0.98
    fastest = max((t for t in trials.values() if t.ok), key=lambda t: t.texts_per_second or 0)
    assert record.backend == fastest.backend
    assert record.cpu == choice.cpu_name()
    # Later processes read the record: nothing is measured again.
    clear_embedder_cache()

    def measured_again(*args: object) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(choice, "measure", measured_again)
    assert get_embedder(cache_dir=cache).backend == record.backend


def test_the_backends_are_timed_on_texts_as_long_as_the_chunks(int8: Embedder) -> None:
    # Attention grows with the square of the length, so which backend is fastest can change
    # between short texts and chunks (on a Xeon with AMX: equal at 90 word pieces, int8 at
    # half of bf16 on real chunks); the timed texts are near the chunker's size.
    from engine.rag.chunking import DEFAULT_MAX_TOKENS

    counts = int8.count_tokens(choice.workload())
    assert min(counts) >= 0.75 * DEFAULT_MAX_TOKENS and max(counts) <= DEFAULT_MAX_TOKENS


def test_a_backend_that_drifts_from_fp32_is_never_chosen(
    fp32: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real model whose vectors are slightly rotated: fast, but not faithful.
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.35, (fp32.dimension, fp32.dimension)).astype(np.float32)
    rotation = np.eye(fp32.dimension, dtype=np.float32) + noise / np.sqrt(fp32.dimension)

    def drifting_batch(texts: list[str]) -> np.ndarray:
        return np.asarray(fp32.encode(texts) @ rotation, dtype=np.float32)

    drifting = Embedder(
        model_id=fp32.model_id,
        dimension=fp32.dimension,
        max_tokens=fp32.max_tokens,
        backend="onnx-int8",
        encode_batch=drifting_batch,
        counter=fp32._counter,
    )
    loads = {"torch-fp32": fp32, "onnx-int8": drifting}
    record = choice.measure(DEFAULT_EMBEDDER, ["onnx-int8"], loads.__getitem__)
    assert record.backend == "torch-fp32"
    (trial,) = [t for t in record.trials if t.backend == "onnx-int8"]
    assert not trial.ok and (trial.min_cosine or 1.0) < choice.MIN_COSINE
    assert "unfaithful" in record.summary()


def test_the_environment_forces_a_backend(
    exported: tuple[Path, dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(emb.BACKEND_ENV, "torch-fp32")
    forced = get_embedder(cache_dir=exported[0])
    assert forced.backend == "torch-fp32"
    assert get_embedder(cache_dir=exported[0], backend="torch-fp32") is forced
    # An explicit argument wins over the environment.
    assert get_embedder(cache_dir=exported[0], backend="onnx-int8").backend == "onnx-int8"
    monkeypatch.setenv(emb.BACKEND_ENV, "int4")
    with pytest.raises(InvalidInput, match=emb.BACKEND_ENV):
        get_embedder(cache_dir=exported[0])
    with pytest.raises(InvalidInput, match="backend"):
        get_embedder(cache_dir=exported[0], backend="fp8")


def test_count_tokens_matches_the_tokenizer(int8: Embedder, fp32: Embedder) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_embedder(DEFAULT_EMBEDDER)))
    texts = [*VARIED, "", "word " * 400]  # the long one: counts are never truncated
    expected = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert int8.count_tokens(texts) == expected
    assert fp32.count_tokens(texts) == expected
    assert expected[-1] == 400
    assert int8.count_tokens([]) == []


def test_encode_stops_when_cancelled(int8: Embedder) -> None:
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        int8.encode(["one", "two", "three", "four"], batch_size=2, check_cancelled=check)
    assert len(calls) == 2
    with pytest.raises(InvalidInput):
        int8.encode(["x"], batch_size=0)


# -- other folders, fallbacks and errors ---------------------------------------------------


def test_a_missing_or_unknown_embedder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="unknown embedder"):
        get_embedder(str(tmp_path / "nowhere"), cache_dir=tmp_path)
    with pytest.raises(NotFound):
        get_embedder("no-such-model-id", cache_dir=tmp_path)


def test_a_folder_that_is_no_model_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="not a sentence-transformers model folder"):
        get_embedder(str(tmp_path / "empty"), cache_dir=tmp_path)


def test_a_broken_model_folder_gives_a_clear_error(tmp_path: Path) -> None:
    folder = tiny_model(tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidInput, match="cannot be loaded") as info:
        get_embedder(str(folder), cache_dir=tmp_path / "cache")
    assert str(folder) in str(info.value)


def test_a_local_folder_is_exported_and_loaded_by_path(tmp_path: Path) -> None:
    folder = tiny_model(tmp_path / "tiny")
    embedder = get_embedder(str(folder), cache_dir=tmp_path / "cache", backend="onnx-int8")
    assert (embedder.model_id, embedder.dimension, embedder.max_tokens) == (str(folder), 32, 64)
    vectors = embedder.encode(["short", "a longer text " * 20])
    reference = get_embedder(str(folder), backend="torch-fp32").encode(
        ["short", "a longer text " * 20]
    )
    assert _cos(vectors, reference).min() > 0.98


def test_an_unsupported_layout_falls_back_to_torch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "_cuda_available", lambda: False)
    folder = tiny_model(tmp_path / "maxpool", pooling="max")
    with caplog.at_level(logging.WARNING, logger="engine.rag.embedder"):
        embedder = get_embedder(str(folder), cache_dir=tmp_path / "cache")
    assert embedder.backend in ("torch-fp32", "torch-bf16")
    assert "pooling" in caplog.text and "cannot run as onnx-int8" in caplog.text
    with pytest.raises(OperationFailed, match="onnx-int8"):
        get_embedder(str(folder), cache_dir=tmp_path / "cache", backend="onnx-int8")


def test_a_failed_quality_check_is_remembered_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loader, "_cuda_available", lambda: False)
    monkeypatch.setattr(onnx_backend, "MIN_PROBE_COSINE", 1.01)  # no export can pass this
    monkeypatch.setattr(choice, "cpu_flags", set)  # no bf16 candidate: fp32 is what is left
    folder = tiny_model(tmp_path / "tiny")
    with caplog.at_level(logging.WARNING, logger="engine.rag.embedder"):
        embedder = get_embedder(str(folder), cache_dir=tmp_path / "cache")
    assert embedder.backend == "torch-fp32"
    assert "min cosine" in caplog.text
    (status_file,) = (tmp_path / "cache").glob(f"*/{STATUS_FILE}")
    assert json.loads(status_file.read_text())["ok"] is False
    stamp = status_file.stat().st_mtime_ns
    clear_embedder_cache()
    assert get_embedder(str(folder), cache_dir=tmp_path / "cache").backend == "torch-fp32"
    assert status_file.stat().st_mtime_ns == stamp  # remembered: no second export
    # Forcing int8 still works: the user asked for it knowingly.
    forced = get_embedder(str(folder), cache_dir=tmp_path / "cache", backend="onnx-int8")
    assert forced.backend == "onnx-int8" and (status_file.parent / INT8_FILE).is_file()
