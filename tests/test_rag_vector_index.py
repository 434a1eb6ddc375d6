"""The vector index: exact and approximate search, removal, growth, and its files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.rag.vector_index import (
    EXACT,
    INDEX_FILE,
    IVF_SQ8,
    SIDECAR_FILE,
    VectorIndex,
)

DIM = 64


def unit(rows: np.ndarray) -> np.ndarray:
    return np.asarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), dtype=np.float32)


def clustered(n: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Unit vectors around ``clusters`` centres: the shape of text embeddings, roughly."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    return unit(centres[rng.integers(0, clusters, n)] + 0.9 * rng.standard_normal((n, DIM)))


def brute_force(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return [int(ids[i]) for i in np.argsort(-(vectors @ query))[:k]]


def found(hits: list[tuple[int, float]]) -> list[int]:
    return [i for i, _ in hits]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    vectors = clustered(6000)
    ids = np.arange(6000, dtype=np.int64) * 7 + 100  # ids are SQLite ids, not positions
    return ids, vectors


@pytest.fixture(scope="module")
def approximate(data: tuple[np.ndarray, np.ndarray]) -> VectorIndex:
    ids, vectors = data
    return VectorIndex.build(ids, vectors, DIM, approximate_threshold=1000)


def test_exact_search_finds_the_true_neighbours(data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = data
    index = VectorIndex.build(ids[:500], vectors[:500], DIM)
    assert index.kind == EXACT and len(index) == 500 and index.nprobe is None
    rng = np.random.default_rng(3)
    for query in unit(rng.standard_normal((5, DIM))):
        hits = index.search(query, 10)
        assert found(hits) == brute_force(vectors[:500], ids[:500], query, 10)
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] == pytest.approx(float(np.max(vectors[:500] @ query)), abs=1e-5)
    # A stored vector finds itself first, with cosine 1.
    top = index.search(vectors[42], 1)[0]
    assert top[0] == ids[42] and top[1] == pytest.approx(1.0, abs=1e-5)


def test_search_edge_cases() -> None:
    empty = VectorIndex.build(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), DIM)
    assert len(empty) == 0 and empty.search(np.ones(DIM, np.float32), 5) == []
    vectors = clustered(3)
    index = VectorIndex.build(np.array([5, 6, 7]), vectors * 3.0, DIM)  # not normalized
    hits = index.search(vectors[0], 10)
    assert len(hits) == 3  # k larger than the index: what there is
    assert hits[0][0] == 5 and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    batch = index.search_batch(vectors, 2)
    assert [h[0][0] for h in batch] == [5, 6, 7]
    with pytest.raises(ValueError):
        index.search(np.ones(DIM + 1, np.float32), 1)
    with pytest.raises(ValueError):
        index.search(vectors, 1)  # several queries go through search_batch
    with pytest.raises(ValueError):
        index.search(vectors[0], 0)
    with pytest.raises(ValueError):
        VectorIndex.build(np.array([1, 2]), vectors, DIM)
    with pytest.raises(ValueError, match="repeat"):
        VectorIndex.build(np.array([1, 2, 1]), vectors, DIM)


def test_approximate_index_above_the_threshold_keeps_recall(
    data: tuple[np.ndarray, np.ndarray], approximate: VectorIndex
) -> None:
    ids, vectors = data
    assert approximate.kind == IVF_SQ8 and len(approximate) == len(ids)
    assert approximate.nprobe is not None and approximate.nprobe >= 1
    rng = np.random.default_rng(9)
    queries = unit(vectors[rng.integers(0, len(ids), 100)] + 0.05 * rng.standard_normal((100, DIM)))
    results = approximate.search_batch(queries, 10)
    recall = np.mean(
        [
            len(set(found(hits)) & set(brute_force(vectors, ids, q, 10))) / 10
            for q, hits in zip(queries, results, strict=True)
        ]
    )
    assert recall >= 0.9, recall
    assert sorted(approximate.ids().tolist()) == sorted(ids.tolist())


@pytest.mark.parametrize("threshold", [10**6, 1000], ids=["exact", "approximate"])
def test_remove_and_replace(data: tuple[np.ndarray, np.ndarray], threshold: int) -> None:
    ids, vectors = data
    index = VectorIndex.build(ids[:3000], vectors[:3000], DIM, approximate_threshold=threshold)
    gone = ids[:50]
    assert index.remove(np.concatenate([gone, [999_999_999]])) == 50  # unknown ids ignored
    assert len(index) == 2950
    for i in range(5):
        assert not set(found(index.search(vectors[i], 20))) & set(gone.tolist())
    assert index.remove(gone) == 0
    # Adding an id that is there replaces its vector instead of storing it twice.
    index.add(ids[100:101], vectors[7:8])
    assert len(index) == 2950
    assert index.search(vectors[7], 1)[0][0] == ids[100]
    assert sorted(index.ids().tolist()) == sorted(ids[50:3000].tolist())


def test_an_exact_index_turns_approximate_when_it_grows(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    ids, vectors = data
    index = VectorIndex.build(ids[:900], vectors[:900], DIM, approximate_threshold=2000)
    index.add(ids[900:1500], vectors[900:1500])
    assert index.kind == EXACT
    index.add(ids[1500:2500], vectors[1500:2500])
    assert index.kind == IVF_SQ8 and len(index) == 2500
    assert index.search(vectors[10], 1)[0][0] == ids[10]  # old vectors came along
    assert index.search(vectors[2400], 1)[0][0] == ids[2400]


@pytest.mark.parametrize("threshold", [10**6, 1000], ids=["exact", "approximate"])
def test_save_and_load_round_trip(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], threshold: int
) -> None:
    ids, vectors = data
    index = VectorIndex.build(ids[:2000], vectors[:2000], DIM, approximate_threshold=threshold)
    index.save(tmp_path / "c1", meta={"generation": 12, "embedder": "all-minilm-l6-v2"})
    sidecar = json.loads((tmp_path / "c1" / SIDECAR_FILE).read_text())
    assert sidecar["kind"] == index.kind and sidecar["dimension"] == DIM
    assert sidecar["count"] == 2000 and sidecar["generation"] == 12
    assert sidecar["embedder"] == "all-minilm-l6-v2"
    assert not [p for p in (tmp_path / "c1").iterdir() if p.name.startswith(".")]  # no temp left
    loaded = VectorIndex.load(tmp_path / "c1", dimension=DIM)
    assert loaded is not None
    assert (loaded.kind, len(loaded), loaded.nprobe) == (index.kind, 2000, index.nprobe)
    assert loaded.meta == {"generation": 12, "embedder": "all-minilm-l6-v2"}
    queries = vectors[:20]
    assert loaded.search_batch(queries, 5) == index.search_batch(queries, 5)
    with pytest.raises(ValueError, match="reserved"):
        index.save(tmp_path / "c2", meta={"count": 3})


def test_load_returns_none_for_missing_or_damaged_files(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, vectors = data
    assert VectorIndex.load(tmp_path / "never-saved") is None
    folder = tmp_path / "c"
    VectorIndex.build(ids[:300], vectors[:300], DIM).save(folder, meta={"generation": 1})
    index_file, sidecar_file = folder / INDEX_FILE, folder / SIDECAR_FILE
    good_index, good_sidecar = index_file.read_bytes(), sidecar_file.read_text()

    index_file.write_bytes(good_index[: len(good_index) // 2])  # truncated
    assert VectorIndex.load(folder) is None

    # Garbage whose sidecar even matches its size and checksum: FAISS refuses it.
    import hashlib

    garbage = b"\x00garbage" * 100
    index_file.write_bytes(garbage)
    sidecar = json.loads(good_sidecar)
    sidecar["index_bytes"] = len(garbage)
    sidecar["index_sha256"] = hashlib.sha256(garbage).hexdigest()
    sidecar_file.write_text(json.dumps(sidecar))
    assert VectorIndex.load(folder) is None

    index_file.write_bytes(good_index)
    sidecar_file.write_text("{not json")
    assert VectorIndex.load(folder) is None
    sidecar_file.unlink()
    assert VectorIndex.load(folder) is None

    sidecar_file.write_text(good_sidecar)
    assert VectorIndex.load(folder) is not None  # the untouched pair loads


def test_load_returns_none_when_the_sidecar_disagrees(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, vectors = data
    folder = tmp_path / "c"
    VectorIndex.build(ids[:300], vectors[:300], DIM).save(folder, meta={"generation": 1})
    sidecar_file = folder / SIDECAR_FILE
    good = json.loads(sidecar_file.read_text())
    assert VectorIndex.load(folder, dimension=DIM + 1) is None  # another embedder's size
    for key, value in (("dimension", DIM * 2), ("count", 301), ("kind", IVF_SQ8)):
        sidecar_file.write_text(json.dumps({**good, key: value}))
        assert VectorIndex.load(folder) is None, key
