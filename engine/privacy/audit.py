"""The audit log: every chat question and answer, kept only when the user turned it on.

Bastion's own log (``logs/bastion.log``) never holds prompts, answers or document text.
Some users must keep a record of what was asked and answered (a compliance archive, a
review of a model's use); for them the ``audit_log`` setting (``config.toml``) appends one
JSON object per answer to ``<home>/logs/audit.log``. With the switch off nothing is
written, not even an empty file.

The switch is read from ``config.toml`` at every answer, not once at start: turning it
on or off in the desktop app takes effect for the very next answer in every process.

Each record is written with one ``write`` on a file opened for appending, then fsynced:
concurrent writers (the desktop app and the CLI) never interleave inside a line, and a
recorded answer survives a power cut. The file is created readable by its owner only,
because it holds the questions themselves. A failure to write is logged (without the
text) and does not fail the chat turn: the answer is already in the database, and the
user is better served by seeing it than by losing it to a full disk.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.config import load_config

log = logging.getLogger(__name__)

AUDIT_FILENAME = "audit.log"
# Past this size the log is renamed audit.log.1 (older ones shift up to .5, the oldest
# is dropped) before the next record.
ROTATE_BYTES = 16 * 1024 * 1024
KEEP_ROTATED = 5


def audit_log_path(home: Path) -> Path:
    return home / "logs" / AUDIT_FILENAME


class AuditLog:
    """Appends chat records to ``<home>/logs/audit.log`` while the setting is on."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.path = audit_log_path(self.home)

    @property
    def enabled(self) -> bool:
        return load_config(self.home).audit_log

    def record_answer(
        self,
        *,
        model: str,
        prompt: str,
        answer: str,
        conversation_id: int | None = None,
        message_id: int | None = None,
        stop_reason: str | None = None,
        system: str | None = None,
        collection: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Record one answered prompt if the audit log is on. Returns whether it wrote.

        Its keyword arguments are plain values, so that it serves as the chat service's
        audit sink (``engine.chat.types.AuditSink``) without either side importing the
        other. ``collection`` names the document collection a grounded answer came from.
        """
        if not self.enabled:
            return False
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": "chat",
            "model": model,
            "conversation_id": conversation_id,
            "message_id": message_id,
            "system": system,
            "prompt": prompt,
            "answer": answer,
            "stop_reason": stop_reason,
        }
        if collection:
            record["collection"] = collection
        if extra:
            record.update(extra)
        return self._append(record)

    def record_request(
        self,
        *,
        key: str,
        model: str,
        endpoint: str,
        status: int,
        latency_ms: float,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        prompt: str | None = None,
        answer: str | None = None,
    ) -> bool:
        """Record one request to the server if the audit log is on. The prompt and answer
        are kept only when ``audit_server_text`` is on as well."""
        config = load_config(self.home)
        if not config.audit_log:
            return False
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": "request",
            "key": key,
            "model": model,
            "endpoint": endpoint,
            "status": status,
            "latency_ms": round(latency_ms, 1),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }
        if config.audit_server_text:
            record["prompt"] = prompt
            record["answer"] = answer
        return self._append(record)

    def _rotate(self) -> None:
        """Shift audit.log to audit.log.1 (and so on) once it has grown past the limit."""
        try:
            if self.path.stat().st_size < ROTATE_BYTES:
                return
        except FileNotFoundError:
            return
        for n in range(KEEP_ROTATED - 1, 0, -1):
            older = self.path.with_name(f"{AUDIT_FILENAME}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{AUDIT_FILENAME}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{AUDIT_FILENAME}.1"))

    def _append(self, record: dict[str, Any]) -> bool:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rotate()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            # The message names the file and the OS error only: never the record's text.
            log.error("could not write the audit log %s: %s", self.path, exc.strerror or exc)
            return False
        return True
