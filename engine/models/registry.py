"""The model registry: which GGUF models Bastion knows, with their metadata and settings."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.errors import (
    AlreadyExists,
    EnvironmentFault,
    InvalidInput,
    InvalidModelFile,
    NotFound,
)
from engine.models.gguf_info import GGUFInfo, read_gguf_info
from engine.paths import builtin_models_dirs, fsync_folder, resources_dir
from engine.store.db import Database
from engine.units import human_size

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SETTINGS_KEYS = ("gpu_layers", "context", "threads")


@dataclass(frozen=True)
class ModelSettings:
    """Per-model overrides; None means 'decide automatically'."""

    gpu_layers: int | None = None
    context: int | None = None
    threads: int | None = None


@dataclass(frozen=True)
class ModelEntry:
    """A registered model. ``base``/``adapter`` are set for fine-tunes only."""

    id: str
    path: str
    arch: str
    quant: str
    params: int
    context_length: int | None
    size_bytes: int
    chat_template: str | None
    base: str | None
    adapter: str | None
    builtin: bool
    settings: ModelSettings
    created_at: str
    metadata: dict[str, Any] = field(repr=False, default_factory=dict)
    # A model served elsewhere: {"url", "model", "key_secret"} (engine.models.remote).
    remote: dict[str, Any] | None = None

    def to_public(self) -> dict[str, Any]:
        """The contract's fields for ``models list --json``, plus a few more."""
        return {
            "id": self.id,
            "path": self.path,
            "arch": self.arch,
            "quant": self.quant,
            "params": self.params,
            "context_length": self.context_length,
            "size_bytes": self.size_bytes,
            "base": self.base,
            "adapter": self.adapter,
            "builtin": self.builtin,
            "has_chat_template": self.chat_template is not None,
            "settings": asdict(self.settings),
            "remote": {"url": self.remote["url"], "model": self.remote["model"]}
            if self.remote
            else None,
        }


def derive_id(path: Path) -> str:
    """A model id from a file name: ``SmolLM2-135M.Q4_1.gguf`` -> ``smollm2-135m.q4_1``."""
    stem = path.name.removesuffix(".gguf").removesuffix(".GGUF").lower()
    slug = re.sub(r"[^a-z0-9._]+", "-", stem).strip("-._")
    return slug[:64] or "model"


def validate_id(model_id: str) -> str:
    if not _ID_RE.match(model_id):
        raise InvalidInput(
            f"invalid model id {model_id!r}",
            hint="use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter "
            "or digit",
        )
    return model_id


def _copy_into(source: Path, folder: Path) -> Path:
    """Copy ``source`` into ``folder`` under its own name, whole or not at all.

    The copy goes to a temporary file that is fsynced before it takes its name, so a
    crash or a full disk never leaves a torn model where a good one is expected; the name
    is taken with a hard link, which fails instead of replacing a file that a concurrent
    import put there first.

    Raises:
        AlreadyExists: ``folder`` holds a file of that name already.
        EnvironmentFault: the disk is full, or the folder cannot be written.
    """
    target = folder / source.name
    taken = AlreadyExists(f"{target} exists already", hint="import the file without --copy")
    if target.exists():
        raise taken
    size = source.stat().st_size
    tmp: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder).free < size:  # refuse now, not after copying 90 %
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{source.name}.", suffix=".partial")
        tmp = Path(name)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfile(source, tmp)  # through the kernel's copy, not Python buffers
            os.fsync(out.fileno())  # the same file: its data is on disk before the rename
        try:
            os.link(tmp, target)
        except FileExistsError as exc:
            raise taken from exc
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if target.exists():  # a file system without hard links (FAT, some mounts)
                raise taken from exc
            tmp.replace(target)
        fsync_folder(folder)
    except OSError as exc:
        raise _copy_fault(exc, source, folder, size) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # after the link, the copy lives on as ``target``
    return target


def _copy_fault(exc: OSError, source: Path, folder: Path, size: int) -> EnvironmentFault:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EnvironmentFault(
            f"not enough disk space to copy {source.name} ({human_size(size)}) into {folder}",
            hint="free some space, or import without --copy to use the file where it is",
        )
    if exc.errno == errno.EFBIG:
        return EnvironmentFault(
            f"{source.name} ({human_size(size)}) is larger than the disk holding {folder} "
            "allows for one file (or than this process's file-size limit)",
            hint="import without --copy to use the file where it is",
        )
    return EnvironmentFault(
        f"could not copy {source.name} into {folder}: {exc.strerror or exc}",
        hint="check that the folder is writable and the disk healthy",
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_catalogue() -> list[dict[str, Any]]:
    """The default models set-up installs (``resources/catalogue.toml``)."""
    path = resources_dir() / "catalogue.toml"
    models: list[dict[str, Any]] = tomllib.loads(path.read_text(encoding="utf-8")).get("model", [])
    return models


class ModelRegistry:
    """Models recorded in the ``models`` table, plus the built-in defaults."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._catalogue = load_catalogue()
        self._register_builtins()

    # -- reading --------------------------------------------------------------------

    def list(self) -> list[ModelEntry]:
        rows = self._db.query("SELECT * FROM models ORDER BY builtin DESC, id")
        return [self._entry(row) for row in rows]

    def get(self, model_id: str) -> ModelEntry:
        rows = self._db.query("SELECT * FROM models WHERE id = ?", (model_id,))
        if not rows:
            known = ", ".join(m.id for m in self.list()) or "none"
            raise NotFound(f"no model {model_id!r}", hint=f"installed models: {known}")
        return self._entry(rows[0])

    def default_id(self) -> str:
        """The model used when none is named: the catalogue's default, else the first."""
        ids = [m.id for m in self.list()]
        for item in self._catalogue:
            if item.get("default") and item["id"] in ids:
                return str(item["id"])
        if not ids:
            raise NotFound(
                "no model is installed",
                hint="run 'python3 installer/bootstrap.py setup' or 'bastion models import FILE'",
            )
        return ids[0]

    # -- writing --------------------------------------------------------------------

    def import_file(
        self, path: Path, model_id: str | None = None, copy_into: Path | None = None
    ) -> ModelEntry:
        """Validate a GGUF file from its header and register it.

        Args:
            path: the GGUF file.
            model_id: the id to register it under; derived from the file name if None.
            copy_into: copy the file into this folder first (the home's ``models/``);
                otherwise it is used where it is.

        Raises:
            NotFound, InvalidModelFile: the file is missing or not a usable GGUF model.
            AlreadyExists: the id or the file is registered already.
        """
        path = Path(path).expanduser()
        info = read_gguf_info(path)
        if info.file_kind == "adapter":
            raise InvalidModelFile(
                f"{path.name} is a LoRA adapter, not a model",
                hint="adapters are registered together with their base model by 'bastion finetune'",
            )
        model_id = validate_id(model_id or derive_id(path))
        self._check_free(model_id, str(info.path))
        copied: Path | None = None
        if copy_into is not None:
            copied = _copy_into(path, copy_into)
        try:
            if copied is not None:
                info = read_gguf_info(copied)
            self._insert(model_id, info, builtin=False)
        except BaseException as exc:
            if copied is not None:
                copied.unlink(missing_ok=True)  # this call made it, and nothing refers to it
            if isinstance(exc, sqlite3.IntegrityError):  # a concurrent import took the id
                raise AlreadyExists(f"a model with id {model_id!r} exists already") from exc
            raise
        log.info("registered model %s (%s, %s)", model_id, info.architecture, info.quant)
        return self.get(model_id)

    def remove(self, model_id: str) -> ModelEntry:
        """Forget a model; its file stays where it is."""
        entry = self.get(model_id)
        self._db.execute("DELETE FROM models WHERE id = ?", (model_id,))
        return entry

    def update_settings(self, model_id: str, **changes: int | None) -> ModelEntry:
        """Set or clear (None) per-model overrides: gpu_layers, context, threads."""
        entry = self.get(model_id)
        unknown = set(changes) - set(_SETTINGS_KEYS)
        if unknown:
            raise InvalidInput(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        current = asdict(entry.settings)
        for key, value in changes.items():
            if value is not None and (value < (-1 if key == "gpu_layers" else 1)):
                raise InvalidInput(f"{key} must be a positive number, not {value}")
            current[key] = value
        self._db.execute(
            "UPDATE models SET settings = ? WHERE id = ?", (json.dumps(current), model_id)
        )
        return self.get(model_id)

    def import_adapter(
        self, path: Path, model_id: str | None, base_id: str, copy_into: Path | None = None
    ) -> ModelEntry:
        """Register a GGUF LoRA adapter made for ``base_id`` as a fine-tune (an exported
        or bundled one); copied into ``copy_into`` first if given.

        Raises:
            NotFound: no such base model or file.
            InvalidModelFile: the file is not an adapter, or not for the base's architecture.
            AlreadyExists: the id is taken.
        """
        path = Path(path).expanduser()
        info = read_gguf_info(path)
        base = self.get(base_id)
        if info.file_kind != "adapter":
            raise InvalidModelFile(
                f"{path.name} is a model, not a LoRA adapter",
                hint="import a model without --base",
            )
        if info.architecture != base.arch:
            raise InvalidModelFile(
                f"{path.name} is an adapter for {info.architecture}, and {base_id} is {base.arch}"
            )
        model_id = validate_id(model_id or derive_id(path))
        self._check_free(model_id, None)
        adapter = _copy_into(path, copy_into / model_id) if copy_into is not None else path
        try:
            return self.register_adapter_model(model_id, base_id, adapter.resolve())
        except BaseException:
            if copy_into is not None:
                adapter.unlink(missing_ok=True)
            raise

    def add_remote(
        self,
        model_id: str,
        url: str,
        remote_model: str,
        key_secret: str | None,
        context_length: int | None,
    ) -> ModelEntry:
        """Register a model that an OpenAI-compatible server at ``url`` serves."""
        model_id = validate_id(model_id)
        self._check_free(model_id, None)
        remote = {"url": url, "model": remote_model, "key_secret": key_secret}
        self._db.execute(
            "INSERT INTO models (id, path, arch, quant, params, context_length, size_bytes, "
            "metadata, settings, builtin, created_at, remote) "
            "VALUES (?, ?, 'remote', '-', 0, ?, 0, '{}', '{}', 0, ?, ?)",
            (model_id, url, context_length, _now(), json.dumps(remote)),
        )
        return self.get(model_id)

    def register_adapter_model(self, model_id: str, base_id: str, adapter_path: Path) -> ModelEntry:
        """Register a fine-tune: the base model's file plus a GGUF LoRA adapter."""
        base = self.get(base_id)
        model_id = validate_id(model_id)
        self._check_free(model_id, None)
        info = read_gguf_info(Path(base.path))
        self._insert(model_id, info, builtin=False, base=base_id, adapter=str(adapter_path))
        return self.get(model_id)

    # -- internals ------------------------------------------------------------------

    def check_id_free(self, model_id: str) -> None:
        """Raise ``AlreadyExists`` when ``model_id`` is taken."""
        self._check_free(model_id, None)

    def _check_free(self, model_id: str, path: str | None) -> None:
        if self._db.query("SELECT 1 FROM models WHERE id = ?", (model_id,)):
            raise AlreadyExists(
                f"a model with id {model_id!r} exists already",
                hint="choose another with --id",
            )
        if path is not None:
            rows = self._db.query(
                "SELECT id FROM models WHERE path = ? AND adapter IS NULL", (path,)
            )
            if rows:
                raise AlreadyExists(f"this file is registered already as {rows[0]['id']!r}")

    def _insert(
        self,
        model_id: str,
        info: GGUFInfo,
        *,
        builtin: bool,
        base: str | None = None,
        adapter: str | None = None,
    ) -> None:
        small_meta = {
            k: v
            for k, v in info.metadata.items()
            if k != "tokenizer.chat_template" and not (isinstance(v, str) and len(v) > 200)
        }
        self._db.execute(
            "INSERT INTO models (id, path, arch, quant, params, context_length, size_bytes, "
            "chat_template, metadata, base, adapter, settings, builtin, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '{}', ?, ?)",
            (
                model_id,
                str(info.path),
                info.architecture,
                info.quant,
                info.params,
                info.context_length,
                info.size_bytes,
                info.chat_template,
                json.dumps(small_meta),
                base,
                adapter,
                int(builtin),
                _now(),
            ),
        )

    def _register_builtins(self) -> None:
        """Put the catalogue's models that set-up installed into this home's registry.

        Runs on every start but costs a stat per model once registered; the header is read
        only the first time (or when set-up moved the file).
        """
        rows = {r["id"]: r["path"] for r in self._db.query("SELECT id, path FROM models")}
        for item in self._catalogue:
            found = next(
                (d / item["file"] for d in builtin_models_dirs() if (d / item["file"]).is_file()),
                None,
            )
            if found is None:
                continue
            model_id = item["id"]
            if model_id in rows:
                if rows[model_id] != str(found.resolve()):
                    self._db.execute(
                        "UPDATE models SET path = ? WHERE id = ? AND builtin = 1",
                        (str(found.resolve()), model_id),
                    )
                continue
            try:
                info = read_gguf_info(found)
                self._insert(model_id, info, builtin=True)
            except InvalidModelFile as exc:
                log.warning("default model %s is damaged: %s", model_id, exc)
            except sqlite3.IntegrityError:
                pass  # another process registered it at the same moment

    @staticmethod
    def _entry(row: sqlite3.Row) -> ModelEntry:
        settings = json.loads(row["settings"] or "{}")
        return ModelEntry(
            id=row["id"],
            path=row["path"],
            arch=row["arch"],
            quant=row["quant"],
            params=row["params"],
            context_length=row["context_length"],
            size_bytes=row["size_bytes"],
            chat_template=row["chat_template"],
            base=row["base"],
            adapter=row["adapter"],
            builtin=bool(row["builtin"]),
            settings=ModelSettings(**{k: settings.get(k) for k in _SETTINGS_KEYS}),
            created_at=row["created_at"],
            metadata=json.loads(row["metadata"] or "{}"),
            remote=json.loads(row["remote"]) if row["remote"] else None,
        )
