"""The int8 export cache: a folder per model and recipe, checked once, reused by every process."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from engine.paths import atomic_write_bytes
from engine.rag.embedder.export import export_fp32_onnx, quantize

if TYPE_CHECKING:
    import numpy as np

    # The reference (sentence-transformers fp32) and the candidate (the ONNX models in a
    # folder) are passed in by the ONNX backend, which owns loading; this module never
    # imports it, so there is no cycle.
    ReferenceEncoder = Callable[[list[str]], np.ndarray]
    CandidateEncoder = Callable[[Path, list[str]], np.ndarray]

log = logging.getLogger(__name__)

# Part of the cache key: bump it whenever the export recipe changes, so old exports are
# not reused.
EXPORT_RECIPE = "eager-opset17-dynamic-qint8-per-channel-fp32-short-v1"
INT8_FILE = "model-int8.onnx"
FP32_FILE = "model-fp32.onnx"
STATUS_FILE = "status.json"

_STALE_EXPORT_SECONDS = 3600
# An export needs this many times the model's weights free, plus the spare (see export_room).
EXPORT_ROOM_FACTOR = 3
EXPORT_ROOM_SPARE = 16 * 2**20


class NoOnnx(Exception):
    """The int8 ONNX path cannot serve this model; the message says why."""


class NoRoom(NoOnnx):
    """The export cannot be written now (a full disk, an unwritable cache).

    The machine's fault, not the model's: nothing about it is remembered, and a later
    process tries again.
    """


def cached_export(
    model_id: str,
    folder: Path,
    transformer_dir: Path,
    cache_dir: Path,
    *,
    reference: ReferenceEncoder,
    candidate: CandidateEncoder,
    probe: Sequence[str],
    min_cosine: float,
) -> tuple[Path, dict[str, Any]]:
    """The cache folder of ``folder``'s ONNX models and their status, exported if needed.

    A failed export or check is remembered (not retried by every process); a passed one
    whose files went missing is done again.

    Raises:
        NoOnnx: the export cannot run here (a missing library, an unwritable cache) or
            the model cannot be exported.
    """
    target = cache_dir / _model_digest(folder)
    status = _read_status(target / STATUS_FILE)
    present = (target / INT8_FILE).is_file() and (target / FP32_FILE).is_file()
    if status is None or (status["ok"] and not present):
        status = _export(
            model_id,
            folder,
            transformer_dir,
            target,
            reference=reference,
            candidate=candidate,
            probe=probe,
            min_cosine=min_cosine,
        )
    return target, status


def export_pending(folder: Path, cache_dir: Path) -> bool:
    """Whether ``cached_export`` would have to export (nothing decided or files missing)."""
    target = cache_dir / _model_digest(folder)
    status = _read_status(target / STATUS_FILE)
    present = (target / INT8_FILE).is_file() and (target / FP32_FILE).is_file()
    return status is None or (bool(status["ok"]) and not present)


def forget_export(target: Path) -> None:
    """Drop the status of a damaged export so that the next process exports again."""
    (target / STATUS_FILE).unlink(missing_ok=True)


def default_cache_dir() -> Path:
    """The user cache folder for exports, used when the caller names none."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("bastion", appauthor=False)) / "embedders"


def _export(
    model_id: str,
    folder: Path,
    transformer_dir: Path,
    target: Path,
    *,
    reference: ReferenceEncoder,
    candidate: CandidateEncoder,
    probe: Sequence[str],
    min_cosine: float,
) -> dict[str, Any]:
    """Export, quantize and check the int8 model into ``target``; returns its status.

    Every step writes into a private temporary folder and the results are renamed into
    place, so two processes exporting at once both succeed and leave one good copy.
    """
    import numpy as np

    need = export_room(transformer_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
        _check_room(target, need)
        _remove_stale_exports(target)
        work = Path(tempfile.mkdtemp(dir=target, prefix=".export-"))
    except OSError as exc:  # an unwritable cache folder
        raise _unwritable(target, exc) from exc
    started = time.monotonic()
    try:
        try:
            export_fp32_onnx(transformer_dir, work / FP32_FILE)
            quantize(work / FP32_FILE, work / INT8_FILE)
        except ImportError as exc:
            raise NoOnnx(f"{exc.name or 'a library'} is needed to export to ONNX") from exc
        except OSError as exc:  # disk full, unwritable cache: not the model's fault
            raise _unwritable(target, exc) from exc
        except Exception as exc:
            # ONNX's shape inference writes its copies from C++ and does not notice a full
            # disk: the truncated copy then fails to parse ("Wire format was corrupt"). Such
            # a failure is the machine's, and must not be remembered as the model's.
            _check_room(target, need)
            _remember(target, {"ok": False, "reason": f"the ONNX export failed: {exc}"}, exc)
        texts = list(probe)
        fp32 = reference(texts)
        int8 = candidate(work, texts)
        cosine = float(np.min(np.sum(fp32 * int8, axis=1)))
        ok = cosine >= min_cosine
        for name in (FP32_FILE, INT8_FILE):
            _fsync_file(work / name)
            os.replace(work / name, target / name)
        status = {
            "ok": ok,
            "min_cosine": round(cosine, 5),
            "reason": "" if ok else f"int8 min cosine {cosine:.4f} < {min_cosine} to fp32",
            "recipe": EXPORT_RECIPE,
            "model": str(folder),
            "seconds": round(time.monotonic() - started, 1),
        }
        try:
            atomic_write_bytes(target / STATUS_FILE, json.dumps(status, indent=1).encode())
        except OSError as exc:  # the models are in place: the next process checks them again
            raise _unwritable(target, exc) from exc
        log.info("exported embedder %s to int8 ONNX: %s", model_id, status)
        return status
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_room(transformer_dir: Path) -> int:
    """Bytes an export of the model in ``transformer_dir`` needs free while it runs.

    The fp32 copy, the quantizer's shape-inference copy of it and the int8 model are all
    on disk at once: about three times the weights, and some room for the rest.
    """
    weights = sum(
        path.stat().st_size
        for path in transformer_dir.iterdir()
        if path.suffix in (".safetensors", ".bin") and path.is_file()
    )
    return EXPORT_ROOM_FACTOR * weights + EXPORT_ROOM_SPARE


def _unwritable(target: Path, exc: OSError) -> NoRoom:
    return NoRoom(f"cannot write the int8 export in {target}: {exc}")


def _check_room(target: Path, need: int) -> None:
    """Raise ``NoRoom`` when ``target``'s disk has less than ``need`` free."""
    free = shutil.disk_usage(target).free
    if free < need:
        raise NoRoom(
            f"cannot write the int8 export in {target}: the disk has {free / 2**20:.0f} MB "
            f"free and the export needs about {need / 2**20:.0f} MB"
        )


def _remember(target: Path, status: dict[str, Any], cause: Exception) -> NoReturn:
    """Record a failed export so that later processes do not repeat it, and raise it."""
    try:
        atomic_write_bytes(target / STATUS_FILE, json.dumps(status).encode())
    except OSError as exc:
        raise NoRoom(f"{status['reason']} (and cannot record it: {exc})") from cause
    raise NoOnnx(status["reason"]) from cause


def _model_digest(folder: Path) -> str:
    """Content hash of the model files plus the export recipe: the cache folder's name."""
    digest = hashlib.sha256(EXPORT_RECIPE.encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        # Docs and the ONNX/OpenVINO copies some repositories ship do not change the model.
        if rel.parts[0] in ("onnx", "openvino") or rel.name.startswith(".") or rel.suffix == ".md":
            continue
        digest.update(str(rel).encode() + b"\0")
        with path.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:32]


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and "ok" in status else None


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _remove_stale_exports(target: Path) -> None:
    """Temporary folders left by killed exports (an hour old: no live export is that slow)."""
    for stale in target.glob(".export-*"):
        try:
            if time.time() - stale.stat().st_mtime > _STALE_EXPORT_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
