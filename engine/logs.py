"""Logging set-up: a rotating log file in the home, never with prompts or document text."""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
from pathlib import Path

from engine.paths import open_private

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_NOTICE_LOGGER = "bastion.notice"


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose files are owner-only (0600) from their creation.

    The log names files, models and errors, so it is as private as the rest of the home.
    ``RotatingFileHandler`` opens each new file (the first, and one after every rollover)
    with ``open``, which leaves the mode to the umask: usually readable by every user.
    """

    def _open(self) -> io.TextIOWrapper:
        fd = open_private(Path(self.baseFilename), os.O_WRONLY | os.O_APPEND)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def _log_path(home: Path) -> Path:
    return home / "logs" / "bastion.log"


def _file_handler(path: Path) -> logging.handlers.RotatingFileHandler | None:
    for handler in logging.getLogger().handlers:
        if (
            isinstance(handler, logging.handlers.RotatingFileHandler)
            and Path(handler.baseFilename) == path
        ):
            return handler
    return None


def _new_handler(path: Path, level: int) -> logging.handlers.RotatingFileHandler:
    handler = _PrivateRotatingFileHandler(path, maxBytes=1_000_000, backupCount=3, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(level)
    return handler


def log_to_file(home: Path, level: int = logging.INFO) -> Path:
    """Send engine logs to ``<home>/logs/bastion.log`` (1 MB x 3); returns its path."""
    path = _log_path(home)
    if _file_handler(path) is not None:
        return path
    root = logging.getLogger()
    root.addHandler(_new_handler(path, level))
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)
    return path


def log_notice(home: Path, message: str, *args: object) -> None:
    """A warning written to ``home``'s log file alone, not to the console (if it can be).

    For what start-up did once on the user's behalf (e.g. made the home private): the CLI
    starts an engine for every command, and its console carries that command's output.
    """
    path = _log_path(home)
    notices = logging.getLogger(_NOTICE_LOGGER)
    handler = _file_handler(path)
    temporary = handler is None
    if handler is None:  # start-up runs before the engine starts its log
        try:
            handler = _new_handler(path, logging.WARNING)
        except OSError:  # no log file to keep it in: wherever logging goes, then
            notices.warning(message, *args)
            return
    try:
        handler.handle(
            notices.makeRecord(notices.name, logging.WARNING, __file__, 0, message, args, None)
        )
    finally:
        if temporary:
            handler.close()
