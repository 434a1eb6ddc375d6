"""API keys of the OpenAI-compatible server: made once, shown once, kept only as a hash.

A key is ``bst-`` and 43 random URL-safe characters (256 bits). Bastion keeps its first
twelve characters (to find the row, and to tell keys apart in lists) and an HMAC-SHA256
of the whole key under a random per-key salt. A fast salted hash is enough for keys of
this strength -- no one guesses 256 random bits -- and costs microseconds per request,
where a password hash (scrypt, bcrypt) would cost tens of milliseconds on every call.
Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from engine.errors import AlreadyExists, InvalidInput, NotFound
from engine.store.db import Database

KEY_PREFIX = "bst-"
_SHOWN = 12  # characters of a key kept in the clear: "bst-" and 8 random ones
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ApiKey:
    """A key as Bastion keeps it: everything but the key itself."""

    name: str
    prefix: str
    rpm: int | None  # requests per minute; None: no limit
    tpm: int | None  # tokens (prompt + completion) per minute; None: no limit
    models: tuple[str, ...] | None  # the models it may use; None: all
    created_at: str
    last_used_at: str | None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def to_public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prefix": self.prefix,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "models": list(self.models) if self.models is not None else None,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
        }


def _digest(salt: bytes, key: str) -> bytes:
    return hmac.new(salt, key.encode("utf-8"), hashlib.sha256).digest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _limit(value: int | None, what: str) -> int | None:
    if value is not None and value < 1:
        raise InvalidInput(f"{what} must be a positive number, not {value}")
    return value


class KeyStore:
    """The ``api_keys`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(
        self,
        name: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        models: list[str] | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key named ``name``; returns it and the key itself, which is not kept.

        Raises:
            InvalidInput: a bad name or limit; AlreadyExists: the name is taken.
        """
        if not _NAME.match(name):
            raise InvalidInput(
                f"invalid key name {name!r}",
                hint="use letters, digits, '.', '_' and '-' (up to 64), starting with a "
                "letter or digit",
            )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        wanted = sorted(set(models)) if models else None
        try:
            self._db.execute(
                "INSERT INTO api_keys (name, prefix, salt, digest, rpm, tpm, models, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    key[:_SHOWN],
                    salt,
                    _digest(salt, key),
                    _limit(rpm, "--rpm"),
                    _limit(tpm, "--tpm"),
                    json.dumps(wanted) if wanted else None,
                    _now(),
                ),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(
                f"a key named {name!r} exists already", hint="revoke it first, or pick a name"
            ) from None
        return self.get(name), key

    def get(self, name: str) -> ApiKey:
        row = self._db.query_one("SELECT * FROM api_keys WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"no API key named {name!r}", hint="`bastion keys list` shows them")
        return _entry(row)

    def list(self) -> list[ApiKey]:
        return [_entry(row) for row in self._db.query("SELECT * FROM api_keys ORDER BY name")]

    def revoke(self, name: str) -> ApiKey:
        """Delete a key; requests with it are refused from then on."""
        entry = self.get(name)
        self._db.execute("DELETE FROM api_keys WHERE name = ?", (name,))
        return entry

    def verify(self, key: str) -> ApiKey | None:
        """The key's entry if ``key`` is a live key, else None (in constant time per row)."""
        if not key.startswith(KEY_PREFIX) or len(key) < _SHOWN:
            return None
        found = None
        for row in self._db.query("SELECT * FROM api_keys WHERE prefix = ?", (key[:_SHOWN],)):
            if hmac.compare_digest(bytes(row["digest"]), _digest(bytes(row["salt"]), key)):
                found = row
        if found is None:
            return None
        self._db.execute(
            "UPDATE api_keys SET last_used_at = ? WHERE name = ?", (_now(), found["name"])
        )
        return _entry(found)


def _entry(row: sqlite3.Row) -> ApiKey:
    models = json.loads(row["models"]) if row["models"] else None
    return ApiKey(
        name=row["name"],
        prefix=row["prefix"],
        rpm=row["rpm"],
        tpm=row["tpm"],
        models=tuple(models) if models else None,
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
    )
