"""The SQLite connection behind ``bastion.db``: pragmas, transactions, and error translation."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from engine.errors import EnvironmentFault
from engine.paths import HOME_ENV, open_private
from engine.store.migrations import apply_migrations

logger = logging.getLogger(__name__)

DB_FILENAME: Final = "bastion.db"
DEFAULT_TIMEOUT: Final = 30.0

Params = Sequence[Any] | dict[str, Any]

# Primary result codes (the low byte of an extended code), from sqlite3.h.
_SQLITE_PERM: Final = 3
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_NOMEM: Final = 7
_SQLITE_READONLY: Final = 8
_SQLITE_IOERR: Final = 10
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_CANTOPEN: Final = 14
_SQLITE_NOTADB: Final = 26

# Fallback for exceptions that carry no result code (raised by hand, older builds).
_MESSAGE_CODES: Final = (
    ("database is locked", _SQLITE_BUSY),
    ("database table is locked", _SQLITE_LOCKED),
    ("busy", _SQLITE_BUSY),
    ("disk is full", _SQLITE_FULL),
    ("disk i/o error", _SQLITE_IOERR),
    ("unable to open database file", _SQLITE_CANTOPEN),
    ("readonly database", _SQLITE_READONLY),
    ("read-only", _SQLITE_READONLY),
    ("file is not a database", _SQLITE_NOTADB),
    ("disk image is malformed", _SQLITE_CORRUPT),
    ("out of memory", _SQLITE_NOMEM),
)


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc).lower()
    for needle, fallback in _MESSAGE_CODES:
        if needle in text:
            return fallback
    return None


def translate_error(exc: sqlite3.Error, path: Path) -> EnvironmentFault | None:
    """The user-facing fault for an SQLite error caused by the machine, if it is one.

    Errors that are bugs (SQL syntax, constraint violations) are not translated:
    they keep their traceback.

    Args:
        exc: The exception raised by ``sqlite3``.
        path: The database file, named in the message.

    Returns:
        An ``EnvironmentFault`` to raise ``from exc``, or None when ``exc`` is a bug.
    """
    code = _primary_code(exc)
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return EnvironmentFault(
            f"the database {path} is busy: another Bastion process is holding it",
            hint="wait for the other Bastion window or command to finish, or close it, "
            "then try again",
        )
    if code == _SQLITE_FULL:
        return EnvironmentFault(
            f"the disk holding the database {path} is full",
            hint="free some disk space, then try again",
        )
    if code == _SQLITE_IOERR:
        return EnvironmentFault(
            f"the database {path} could not be read or written (disk I/O error)",
            hint="check that the disk is present, not full and healthy",
        )
    if code in (_SQLITE_CANTOPEN, _SQLITE_PERM):
        return EnvironmentFault(
            f"the database {path} cannot be opened: its folder is missing or not writable",
            hint=f"check the folder's permissions, or set {HOME_ENV} to a writable folder",
        )
    if code == _SQLITE_READONLY:
        return EnvironmentFault(
            f"the database {path} is read-only",
            hint="make the file and its folder writable, then try again",
        )
    if code == _SQLITE_NOTADB:
        return EnvironmentFault(
            f"{path} is not a database (the file is not SQLite, or it is encrypted)",
            hint="move the file aside; Bastion creates a fresh database in its place",
        )
    if code == _SQLITE_CORRUPT:
        return EnvironmentFault(
            f"the database {path} is damaged",
            hint="restore it from a backup, or salvage it with `sqlite3 bastion.db .recover`",
        )
    if code == _SQLITE_NOMEM:
        return EnvironmentFault(
            f"out of memory while using the database {path}",
            hint="close other programs, then try again",
        )
    return None


def _create_private(path: Path) -> None:
    """Create a missing database file owner-only (0600).

    SQLite would create it with the umask's mode, usually readable by every local user,
    and it gives the ``-wal``, ``-shm`` and ``-journal`` files the database file's mode.
    """
    # A failure here is met again by sqlite3.connect, which reports it, translated.
    with contextlib.suppress(OSError):
        os.close(open_private(path, os.O_RDONLY))


class Database:
    """One connection to ``bastion.db``, shared by the threads of one process.

    SQLite is opened in autocommit mode; writes go through ``transaction()`` (a
    ``BEGIN IMMEDIATE``, so a writer waits for the write lock up front instead of
    failing half-way). An ``RLock`` serializes the threads that share the connection;
    other processes are serialized by SQLite's own locks, waited for up to ``timeout``.
    WAL lets readers in other processes go on while one process writes.

    Usable as a context manager that closes the connection.
    """

    def __init__(self, path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Open (creating if needed) the database and apply pending migrations.

        Args:
            path: The database file, normally ``<home>/bastion.db``. Its folder must exist.
            timeout: Seconds to wait for another process's lock before giving up.

        Raises:
            EnvironmentFault: The file cannot be opened or created, is not a database,
                or another process holds it for longer than ``timeout``.
        """
        self.path = Path(path)
        self.timeout = timeout
        self._lock = threading.RLock()
        self._depth = 0
        self._conn: sqlite3.Connection | None = None
        with self._translated():
            _create_private(self.path)
            conn = sqlite3.connect(
                self.path,
                timeout=timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                conn.row_factory = sqlite3.Row
                self._configure(conn)
                apply_migrations(conn)
            except BaseException:
                conn.close()
                raise
        self._conn = conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        # busy_timeout is also set by connect(timeout=...); set it in milliseconds too so
        # the value is visible with PRAGMA busy_timeout.
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        # The first statement reads the header: a garbage file fails here (NOTADB).
        mode = self._switch_to_wal(conn)
        if mode.lower() != "wal":
            # Some network file systems cannot share WAL's memory map.
            logger.warning("database %s runs in journal mode %s, not WAL", self.path, mode)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")

    def _switch_to_wal(self, conn: sqlite3.Connection) -> str:
        """Set WAL mode, retrying while another process holds the file, up to ``timeout``.

        Leaving rollback-journal mode needs an exclusive lock, and SQLite answers BUSY at
        once, without its busy handler, when two processes open a fresh file together
        (seen in tests/test_store.py's two-process test), so this waits by hand.
        """
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if _primary_code(exc) not in (_SQLITE_BUSY, _SQLITE_LOCKED):
                    raise
                if time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    @property
    def connection(self) -> sqlite3.Connection:
        """The raw connection. Use it only while holding ``transaction()``."""
        if self._conn is None:
            raise RuntimeError(f"the database {self.path} is closed")
        return self._conn

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            fault = translate_error(exc, self.path)
            if fault is None:
                raise
            raise fault from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run a block as one write transaction (``BEGIN IMMEDIATE`` … ``COMMIT``).

        The block is rolled back if it raises. Nested calls in the same thread become
        savepoints, so an inner failure undoes only the inner block.

        Yields:
            The connection, to run statements on inside the block.

        Raises:
            EnvironmentFault: The write lock was not granted within the timeout, or the
                disk refused the write.
        """
        with self._lock:
            conn = self.connection
            nested = self._depth > 0
            savepoint = f"sp{self._depth}"
            with self._translated():
                conn.execute(f"SAVEPOINT {savepoint}" if nested else "BEGIN IMMEDIATE")
            self._depth += 1
            try:
                with self._translated():
                    yield conn
                    conn.execute(f"RELEASE {savepoint}" if nested else "COMMIT")
            except BaseException:
                self._rollback(conn, savepoint if nested else None)
                raise
            finally:
                self._depth -= 1

    def _rollback(self, conn: sqlite3.Connection, savepoint: str | None) -> None:
        if not conn.in_transaction:
            return  # SQLite already rolled back (e.g. after SQLITE_FULL)
        try:
            if savepoint is None:
                conn.execute("ROLLBACK")
            else:
                conn.execute(f"ROLLBACK TO {savepoint}")
                conn.execute(f"RELEASE {savepoint}")
        except sqlite3.Error:
            # The original error is the one worth reporting.
            logger.exception("rollback failed on %s", self.path)

    def execute(self, sql: str, params: Params = ()) -> sqlite3.Cursor:
        """Run one statement in its own transaction (autocommit).

        For writes: read ``rowcount`` and ``lastrowid`` from the result. Use ``query``
        to read rows, so they are fetched while the lock is held.

        Raises:
            EnvironmentFault: For locks held too long, full disks and similar.
        """
        with self._lock, self._translated():
            return self.connection.execute(sql, params)

    def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Run a ``SELECT`` and return all its rows.

        Raises:
            EnvironmentFault: For locks held too long, unreadable files and similar.
        """
        with self._lock, self._translated():
            rows: list[sqlite3.Row] = self.connection.execute(sql, params).fetchall()
            return rows

    def query_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        """Run a ``SELECT`` and return its first row, or None when there is none."""
        with self._lock, self._translated():
            row: sqlite3.Row | None = self.connection.execute(sql, params).fetchone()
            return row

    def close(self) -> None:
        """Close the connection. Safe to call twice."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with self._translated():
                    conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Database({str(self.path)!r})"
