"""The machine in the way: unusable home, a busy database, a damaged database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.conftest import assert_one_line_error


def test_home_that_cannot_be_created(cli, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = cli("models", "list", env={"BASTION_HOME": str(blocker / "home")})
    assert_one_line_error(result, 1, "cannot be used", str(blocker / "home"))


def test_home_that_is_not_writable(cli, tmp_path: Path) -> None:
    # Tests run as root, where permissions do not stop writes; a full, read-only
    # filesystem does. /proc is one that exists everywhere on Linux.
    result = cli("models", "list", env={"BASTION_HOME": "/proc/bastion-home"})
    assert result.code == 1
    assert_one_line_error(result, 1, "/proc/bastion-home")


def test_database_held_by_another_process(cli, home: Path) -> None:
    assert cli("models", "list").code == 0  # creates the database
    holder = sqlite3.connect(home / "bastion.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = cli("chat", "Hi", "--max-tokens", "4", env={"BASTION_DB_TIMEOUT": "0.5"})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_one_line_error(result, 1, "busy")


def test_database_file_that_is_not_a_database(cli, home: Path) -> None:
    home.mkdir(parents=True)
    (home / "bastion.db").write_bytes(b"this is not sqlite" * 100)
    assert_one_line_error(cli("history", "list"), 1, "bastion.db")
    assert (home / "bastion.db").read_bytes().startswith(b"this is not sqlite"), "left as it was"
