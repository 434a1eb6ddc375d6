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

    users = 0  # the engines of this process logging here (see log_to_file, stop_logging)

    def _open(self) -> io.TextIOWrapper:
        fd = open_private(Path(self.baseFilename), os.O_WRONLY | os.O_APPEND)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def handleError(self, record: logging.LogRecord) -> None:
        if not Path(self.baseFilename).parent.is_dir():
            return  # the home was removed: there is nowhere to keep the record
        super().handleError(record)


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
    """Send engine logs to ``<home>/logs/bastion.log`` (1 MB x 3) until ``stop_logging``;
    returns its path. Each call needs its own ``stop_logging``."""
    path = _log_path(home)
    handler = _file_handler(path)
    if handler is None:
        handler = _new_handler(path, level)
        logging.getLogger().addHandler(handler)
    if isinstance(handler, _PrivateRotatingFileHandler):
        handler.users += 1
    root = logging.getLogger()
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)
    return path


def stop_logging(home: Path) -> None:
    """End one ``log_to_file`` of ``home``: the last one closes its log file.

    Else a process that opens engines on several homes one after another (tests, a
    script) would write every later record into each earlier home's log.
    """
    handler = _file_handler(_log_path(home))
    if not isinstance(handler, _PrivateRotatingFileHandler):
        return
    handler.users -= 1
    if handler.users <= 0:
        logging.getLogger().removeHandler(handler)
        handler.close()


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
