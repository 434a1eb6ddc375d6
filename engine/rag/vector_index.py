"""A collection's FAISS index: chunk ids and their vectors, searched by cosine similarity.

Two kinds, chosen by size. Measured with ``bench/bench_search.py`` on a 2-core EPYC
(shared, loaded), 384-d clustered unit vectors, single queries, k=10, p50 / p95:

=========  =================  ================  =========  ========================
vectors    exact              ivf-sq8           recall@10  build exact / ivf-sq8
=========  =================  ================  =========  ========================
20,000     1.05 / 1.17 ms     0.06 / 0.09 ms    0.991      0.02 s / 1.0 s
50,000     4.20 / 4.51 ms     0.07 / 0.09 ms    0.987      0.09 s / 2.9 s
100,000    6.80 / 10.2 ms     0.12 / 0.19 ms    0.982      0.15 s / 4.5 s
1,000,000  66 / 78 ms         0.35 / 0.46 ms    0.984      5 s / 74 s
=========  =================  ================  =========  ========================

* ``exact`` -- ``IndexIDMap2(IndexFlatIP)``: perfect recall, no training, 1,544 B per
  vector (float32 + id) plus the id map's hash table.
* ``ivf-sq8`` -- ``IndexIVFScalarQuantizer`` (8-bit codes, inner product): ~400 B per
  vector (a quarter). ~2 sqrt(n) lists (a power of two), k-means on a sample of 64 per
  list. ``nprobe`` is calibrated at build time: the smallest power of two whose recall@10
  reaches 0.97 on stored vectors moved to cosine ~0.7 (as far as a question is from its
  passage), doubled as a margin, at least 8. On data with no cluster structure at all
  calibration climbs to every list (a scan of the 8-bit codes: ~4 ms at 50k, recall 0.98).

The approximate kind is faster at every size, but below ``APPROXIMATE_THRESHOLD``
(50,000) the exact one costs under ~5 ms a query -- less than embedding the query --
with perfect recall, and its rebuild from SQLite is instant where training takes
seconds. Past it exact search grows beyond 5-10 ms and 75 MB. An exact index that grows
past the threshold by ``add`` turns approximate. Vectors are stored normalized, so inner
product is cosine.

Files: ``index.faiss`` and the sidecar ``index.json`` (kind, dimension, count, nprobe,
size and SHA-256 of the index file, plus the caller's ``meta``: generation, embedder).
Both are written atomically (temporary file, fsync, read back and compared, rename), and
they are a cache: ``save`` returns False rather than raising when the disk refuses them,
and ``load`` returns None rather than raising for anything missing, damaged or
inconsistent; the caller rebuilds from SQLite.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXACT = "exact"
IVF_SQ8 = "ivf-sq8"
APPROXIMATE_THRESHOLD = 50_000
INDEX_FILE = "index.faiss"
SIDECAR_FILE = "index.json"
FORMAT = 1
# Calibration of nprobe: the recall wanted on perturbed copies of stored vectors, and
# how many such queries are measured (against exact search over every vector).
TARGET_RECALL = 0.97
_CALIBRATION_QUERIES = 128
# Noise of norm 1 leaves a query at cosine ~0.7 to the vector it came from: about as far
# as a typed question is from the passage that answers it.
_CALIBRATION_NOISE = 1.0
# Never fewer lists than this: on well-separated data calibration can pick 1, and the
# extra lists cost microseconds.
_MIN_NPROBE = 8
# Up to this many queries are searched on the calling thread alone. FAISS splits even one
# query across OpenMP threads; when another process keeps a core busy (llama.cpp, the
# indexer), the team waits for a time slice: exact search at 20k vectors took 24 ms with
# 2 threads on a loaded 2-core machine and 0.9 ms with 1.
_SERIAL_QUERIES = 4
_RESERVED = frozenset(
    {"format", "kind", "dimension", "count", "nprobe", "index_bytes", "index_sha256"}
)


class VectorIndex:
    """Chunk ids (int64) with unit vectors; nearest neighbours by inner product.

    Safe to search from several threads while another adds or removes (one lock).
    """

    def __init__(
        self,
        index: Any,
        kind: str,
        dimension: int,
        *,
        approximate_threshold: int = APPROXIMATE_THRESHOLD,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self._index = index
        self.kind = kind
        self.dimension = dimension
        self.approximate_threshold = approximate_threshold
        self.meta: dict[str, Any] = dict(meta or {})
        self._lock = threading.RLock()

    # -- building ---------------------------------------------------------------------

    @classmethod
    def empty(
        cls, dimension: int, *, approximate_threshold: int = APPROXIMATE_THRESHOLD
    ) -> VectorIndex:
        """An exact index with nothing in it."""
        import faiss

        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        return cls(index, EXACT, dimension, approximate_threshold=approximate_threshold)

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        vectors: np.ndarray,
        dimension: int,
        *,
        approximate_threshold: int = APPROXIMATE_THRESHOLD,
    ) -> VectorIndex:
        """An index over ``ids`` and ``vectors``, exact or approximate by size.

        Args:
            ids: int64 chunk ids, one per row of ``vectors``, without duplicates.
            vectors: float rows of length ``dimension`` (normalized here if they are not).
            dimension: the embedder's dimension (``vectors`` may be empty).
            approximate_threshold: from this many vectors on, build the approximate kind.
        """
        ids, vectors = _check(ids, vectors, dimension)
        if len(ids) >= approximate_threshold:
            index = _train_ivf(vectors, ids)
            return cls(index, IVF_SQ8, dimension, approximate_threshold=approximate_threshold)
        built = cls.empty(dimension, approximate_threshold=approximate_threshold)
        if len(ids):
            built._index.add_with_ids(vectors, ids)
        return built

    # -- changing ---------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (or replace) vectors; an exact index past the threshold becomes approximate."""
        ids, vectors = _check(ids, vectors, self.dimension)
        if not len(ids):
            return
        with self._lock:
            self._remove(ids)
            if self.kind == EXACT and self._index.ntotal + len(ids) >= self.approximate_threshold:
                old_ids, old_vectors = self._exact_contents()
                all_ids = np.concatenate([old_ids, ids])
                self._index = _train_ivf(np.concatenate([old_vectors, vectors]), all_ids)
                self.kind = IVF_SQ8
                log.info("vector index grew to %d vectors: now approximate", len(all_ids))
                return
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (unknown ones are ignored); returns how many were removed."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        with self._lock:
            return self._remove(ids)

    def _remove(self, ids: np.ndarray) -> int:
        import faiss

        if not len(ids) or self._index.ntotal == 0:
            return 0
        return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    # -- searching --------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def nprobe(self) -> int | None:
        """Lists visited per query (approximate kind only)."""
        return int(self._index.nprobe) if self.kind == IVF_SQ8 else None

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` nearest ids to one query vector, best first, as (id, cosine)."""
        query = np.asarray(query, dtype=np.float32)
        if query.ndim == 2 and query.shape[0] == 1:
            query = query[0]
        if query.ndim != 1:
            raise ValueError("search takes one vector; use search_batch for several")
        return self.search_batch(query[None, :], k)[0]

    def search_batch(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """``search`` for each row of ``queries`` (shape ``(n, dimension)``)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise ValueError(f"queries must have shape (n, {self.dimension})")
        with self._lock:
            if self._index.ntotal == 0:
                return [[] for _ in range(len(queries))]
            with _serial(len(queries) <= _SERIAL_QUERIES):
                scores, found = self._index.search(queries, min(k, self._index.ntotal))
        return [
            [(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
            for row_ids, row_scores in zip(found, scores, strict=True)
        ]

    def ids(self) -> np.ndarray:
        """Every stored id (in no particular order): to compare with SQLite."""
        import faiss

        with self._lock:
            if self.kind == EXACT:
                return faiss.vector_to_array(self._index.id_map).astype(np.int64)
            lists = self._index.invlists
            parts = []
            for number in range(lists.nlist):
                size = lists.list_size(number)
                if size:
                    pointer = lists.get_ids(number)
                    parts.append(faiss.rev_swig_ptr(pointer, size).copy())
                    lists.release_ids(number, pointer)
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _exact_contents(self) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        flat: Any = faiss.downcast_index(self._index.index)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), len(ids) * self.dimension)
        return ids, np.array(vectors, dtype=np.float32).reshape(len(ids), self.dimension)

    # -- files ------------------------------------------------------------------------

    def save(self, folder: Path, meta: Mapping[str, Any] | None = None) -> bool:
        """Write ``index.faiss`` and ``index.json`` into ``folder``, each atomically.

        The files are a cache: a disk that refuses them (full, over quota, read-only) is
        logged and the index in memory goes on serving; the cache already on disk is left
        as it was, never replaced by a short file.

        Args:
            folder: the collection's folder (created if missing).
            meta: what the caller needs to trust the cache later, e.g. ``generation`` and
                ``embedder``; stored in the sidecar and given back as ``meta`` by ``load``.

        Returns:
            True when both files were written, False when the disk refused them.
        """
        if meta is not None:
            clash = _RESERVED & set(meta)
            if clash:
                raise ValueError(f"meta keys {sorted(clash)} are reserved")
            self.meta = dict(meta)
        written: list[Path] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with self._lock:
                index_tmp, size, digest = _write_checked(folder, INDEX_FILE, self._serialize)
                written.append(index_tmp)
                sidecar = {
                    "format": FORMAT,
                    "kind": self.kind,
                    "dimension": self.dimension,
                    "count": len(self),
                    "nprobe": self.nprobe,
                    **self.meta,
                    "index_bytes": size,
                    "index_sha256": digest,
                }
            encoded = json.dumps(sidecar, indent=1).encode()
            sidecar_tmp, _, _ = _write_checked(folder, SIDECAR_FILE, lambda sink: sink(encoded))
            written.append(sidecar_tmp)
            # Both files are complete on disk before either replaces the cache. The sidecar
            # goes last: an index file without its matching sidecar (a crash between the two
            # renames) fails the checksum in load and is rebuilt, never trusted.
            os.replace(index_tmp, folder / INDEX_FILE)
            os.replace(sidecar_tmp, folder / SIDECAR_FILE)
        except BaseException as exc:
            for tmp in written:
                tmp.unlink(missing_ok=True)
            if not isinstance(exc, OSError):
                raise
            log.warning(
                "could not save the vector index cache in %s (%s): searches use the index "
                "in memory, and it is rebuilt from the database next time",
                folder,
                exc.strerror or exc,
            )
            return False
        return True

    def _serialize(self, sink: Callable[[bytes], int]) -> None:
        """Stream the index through ``sink``: FAISS's own file writer loses write errors."""
        import faiss

        # faiss.write_index(index, path) writes through a stdio FILE and ignores the error
        # of the final flush in fclose: a full disk left a short (even 0-byte) file with no
        # error. A Python callback writes through Python's file object, which raises.
        writer = faiss.PyCallbackIOWriter(sink)  # type: ignore[attr-defined]  # not in the stubs
        faiss.write_index(self._index, writer)

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        dimension: int | None = None,
        approximate_threshold: int = APPROXIMATE_THRESHOLD,
    ) -> VectorIndex | None:
        """The index saved in ``folder``, or None if missing, damaged or inconsistent.

        Args:
            folder: where ``save`` wrote it.
            dimension: when given, an index of another dimension also gives None.
            approximate_threshold: carried over to the loaded index.
        """
        import faiss

        try:
            sidecar = json.loads((folder / SIDECAR_FILE).read_text(encoding="utf-8"))
            data = (folder / INDEX_FILE).read_bytes()
        except (OSError, ValueError) as exc:
            log.info("no usable vector index in %s: %s", folder, exc)
            return None
        why = _sidecar_problem(sidecar, data, dimension)
        if why is None:
            try:
                index: Any = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
            except RuntimeError as exc:
                why = f"FAISS cannot read it ({exc})"
            else:
                kind = IVF_SQ8 if isinstance(index, faiss.IndexIVF) else EXACT
                if index.d != sidecar["dimension"] or index.ntotal != sidecar["count"]:
                    why = "the index does not match its sidecar"
                elif kind != sidecar["kind"]:
                    why = f"the index is {kind}, the sidecar says {sidecar['kind']}"
        if why is not None:
            log.warning("ignoring the vector index in %s: %s", folder, why)
            return None
        if kind == IVF_SQ8 and sidecar.get("nprobe"):
            index.nprobe = int(sidecar["nprobe"])
        meta = {k: v for k, v in sidecar.items() if k not in _RESERVED}
        return cls(
            index, kind, int(index.d), approximate_threshold=approximate_threshold, meta=meta
        )


@contextmanager
def _serial(serial: bool) -> Iterator[None]:
    """One OpenMP thread for FAISS calls made from this thread (the setting is per thread)."""
    if not serial:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _write_checked(
    folder: Path, name: str, produce: Callable[[Callable[[bytes], int]], object]
) -> tuple[Path, int, str]:
    """Write what ``produce`` hands its sink to a temporary file beside ``name``, fsynced.

    The file is read back and must match, in size and SHA-256, what was handed over.

    Returns:
        The temporary file (to be renamed into place), its size and its SHA-256.

    Raises:
        OSError: the disk refused a write, or the file does not read back as written.
    """
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:

            def sink(chunk: bytes) -> int:
                nonlocal size
                fh.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                return len(chunk)

            produce(sink)
            fh.flush()
            os.fsync(fh.fileno())
        with tmp.open("rb") as back:
            on_disk = hashlib.file_digest(back, "sha256").hexdigest()
        if tmp.stat().st_size != size or on_disk != digest.hexdigest():
            raise OSError(errno.EIO, f"{tmp.name} does not read back as written")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, size, on_disk


def _sidecar_problem(sidecar: Any, data: bytes, dimension: int | None) -> str | None:
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        return "unknown sidecar format"
    if sidecar.get("kind") not in (EXACT, IVF_SQ8):
        return f"unknown kind {sidecar.get('kind')!r}"
    if not isinstance(sidecar.get("dimension"), int) or not isinstance(sidecar.get("count"), int):
        return "the sidecar lacks dimension or count"
    if dimension is not None and sidecar["dimension"] != dimension:
        return f"dimension {sidecar['dimension']}, expected {dimension}"
    if sidecar.get("index_bytes") != len(data):
        return "the index file has the wrong size"
    if sidecar.get("index_sha256") != hashlib.sha256(data).hexdigest():
        return "the index file fails its checksum"
    return None


def _check(ids: np.ndarray, vectors: np.ndarray, dimension: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids as int64 and vectors as C-contiguous unit float32 rows, or ValueError."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) == 0:
        return ids, np.zeros((0, dimension), dtype=np.float32)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape != (len(ids), dimension):
        raise ValueError(
            f"expected {len(ids)} vectors of dimension {dimension}, got {vectors.shape}"
        )
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must not repeat")
    norms = np.linalg.norm(vectors, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        # A copy: never scale the caller's array behind its back.
        vectors = vectors / np.maximum(norms, 1e-12)[:, None]
    return ids, vectors


def _train_ivf(vectors: np.ndarray, ids: np.ndarray) -> Any:
    """An IVF-SQ8 index over the vectors, trained on a sample, nprobe calibrated."""
    import faiss

    n, dimension = vectors.shape
    # ~2 sqrt(n) lists (a power of two), but at least 40 training points per list so
    # k-means has enough to work with (FAISS warns below 39).
    nlist = 2 ** round(math.log2(max(2.0, 2 * math.sqrt(n))))
    while nlist > 1 and nlist * 40 > n:
        nlist //= 2
    rng = np.random.default_rng(0)
    sample_size = min(n, 64 * nlist)
    sample = vectors[np.sort(rng.choice(n, sample_size, replace=False))]
    quantizer = faiss.IndexFlatIP(dimension)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, dimension, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.spherical = True  # centroids on the unit sphere, like the vectors
    index.train(sample)
    index.add_with_ids(vectors, ids)
    index.nprobe = _calibrate_nprobe(index, vectors, ids, rng)
    log.info("trained an IVF-SQ8 index: %d vectors, %d lists, nprobe %d", n, nlist, index.nprobe)
    return index


def _calibrate_nprobe(
    index: Any, vectors: np.ndarray, ids: np.ndarray, rng: np.random.Generator
) -> int:
    import faiss

    n = len(vectors)
    picked = vectors[rng.choice(n, min(n, _CALIBRATION_QUERIES), replace=False)]
    noise = rng.standard_normal(picked.shape).astype(np.float32)
    noise *= _CALIBRATION_NOISE / np.linalg.norm(noise, axis=1, keepdims=True)
    queries = picked + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = min(10, n)
    _, positions = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    truth = ids[positions]
    chosen, previous = index.nlist, -1.0
    nprobe = 1
    while nprobe <= index.nlist:
        index.nprobe = nprobe
        _, found = index.search(queries, k)
        recall = float(
            np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])
        )
        # Stop at the target, or where more lists stop helping (the SQ8 codes then limit).
        if recall >= TARGET_RECALL or recall - previous < 0.002:
            chosen = nprobe
            break
        previous = recall
        nprobe *= 2
    return int(min(index.nlist, max(_MIN_NPROBE, chosen * 2)))
