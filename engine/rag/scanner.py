"""Finding the files of a collection: folders walked recursively, junk and hidden files left out.

Also the three forms of a path (below) and the folders that are never scanned: Bastion's
own home, caches and Python environment.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.rag.collections import Source

# -- the forms of a path ------------------------------------------------------------------
#
# A file name is bytes on POSIX. ``os.walk`` and ``sys.argv`` hand the bytes that are not
# UTF-8 (a Latin-1 name from an old archive or a Windows share) to Python as lone surrogate
# escapes, which SQLite, JSON on stdout and Qt all refuse. So a path has three forms: the
# OS path (a str that may carry surrogate escapes; what ``open`` takes), its database value
# (the same text when it is valid UTF-8, else the raw bytes as a BLOB: faithful and
# reversible, with no schema change), and the shown path (each undecodable byte as
# backslash-x-NN): what every result of the engine carries, so no client can fail to print,
# send or store it.

_ESCAPED_BYTE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def db_path(path: str) -> str | bytes:
    """The database value of an OS path: the text, or its raw bytes if not valid UTF-8."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def os_path(value: str | bytes) -> str:
    """The OS path of a database value (the inverse of ``db_path``)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def shown_path(path: str | bytes) -> str:
    """A path as people and JSON see it: valid Unicode, each undecodable byte escaped."""
    if isinstance(path, str):
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            path = os.fsencode(path)
        else:
            return path
    return path.decode("utf-8", "backslashreplace")


def path_of_shown(shown: str) -> str:
    """The OS path that a shown path stands for: itself if it exists, else its bytes unescaped.

    The shown form of a name that is not UTF-8 can equal a real name that holds the
    characters backslash, x and two hex digits; the name that exists as written wins.
    """
    if os.path.lexists(shown) or "\\x" not in shown:
        return shown
    raw = _ESCAPED_BYTE.sub(lambda m: bytes([int(m.group(1), 16)]), shown.encode("utf-8"))
    candidate = os.fsdecode(raw)
    return candidate if os.path.lexists(candidate) else shown


# -- what is never scanned ---------------------------------------------------------------

Identity = tuple[int, int]  # (st_dev, st_ino): the same folder whatever path names it


def identities(folders: Iterable[str | Path]) -> frozenset[Identity]:
    """The identities of the folders that exist (links followed)."""
    found: set[Identity] = set()
    for folder in folders:
        try:
            st = os.stat(folder)
        except (OSError, ValueError):
            continue
        found.add((st.st_dev, st.st_ino))
    return frozenset(found)


def is_protected(path: str, protected: frozenset[Identity]) -> bool:
    """Whether ``path`` is, or lies inside, a protected folder (after following links).

    Compared by identity rather than by name, so a link, a bind mount or another spelling
    of the home does not slip past.
    """
    if not protected:
        return False
    current = os.path.realpath(path)
    while True:
        if identities([current]) & protected:
            return True
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


# Folders that hold tools' state, not documents.
JUNK_DIRS = frozenset(
    {
        "__pycache__",
        "node_modules",
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        ".tox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".idea",
        ".vscode",
        "$RECYCLE.BIN",
        "System Volume Information",
        ".Trash",
        ".Trashes",
        "__MACOSX",
    }
)
# Bastion's own reports of what redaction removed (``dataset prepare`` writes one next to
# its output, wherever the user puts it): the raw personal data, never to be made citable.
PRIVATE_PATTERNS = ("*.redactions.json",)
# Files that are never documents: editors' and office suites' lock and backup files.
JUNK_PATTERNS = (
    "Thumbs.db",
    "desktop.ini",
    ".DS_Store",
    "~$*",
    "*.swp",
    "*.swo",
    "*~",
    "*.tmp",
    "*.part",
    "*.crdownload",
    "*.lock",
)


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute
    size: int
    mtime_ns: int


def _matches(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def is_private(name: str) -> bool:
    """A file of Bastion's that holds personal data: never indexed, even if named directly."""
    return any(fnmatch.fnmatch(name, p) for p in PRIVATE_PATTERNS)


def _is_junk(name: str) -> bool:
    return (
        name.startswith(".")
        or is_private(name)
        or any(fnmatch.fnmatch(name, p) for p in JUNK_PATTERNS)
    )


def _protected_dir(path: str, protected: frozenset[Identity]) -> bool:
    if not protected:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in protected


def scan(source: Source, protected: frozenset[Identity] = frozenset()) -> Iterator[FoundFile]:
    """The files of one source. A file named directly is taken even if hidden.

    Include patterns (if any) must match the path relative to the folder or the file name;
    exclude patterns remove what they match. Symbolic links to folders are not followed
    (they can loop); links to files are, unless they lead into a protected folder.
    Protected folders (see ``identities``) and what lies inside them are never yielded.
    """
    root = Path(source.path)
    if is_protected(source.path, protected):
        return
    if root.is_file():
        if is_private(root.name):
            return
        st = root.stat()
        yield FoundFile(str(root), st.st_size, st.st_mtime_ns)
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in JUNK_DIRS
            and not d.startswith(".")
            and not _matches(os.path.normpath(os.path.join(rel_dir, d)), d, source.exclude)
            and not _protected_dir(os.path.join(dirpath, d), protected)
        )
        for name in sorted(filenames):
            if _is_junk(name):
                continue
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if source.include and not _matches(rel, name, source.include):
                continue
            if _matches(rel, name, source.exclude):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue  # vanished or a broken link: nothing to index
            if not os.path.isfile(full):
                continue
            if os.path.islink(full) and is_protected(full, protected):
                continue  # a link into the home (its audit log, say) is the home
            yield FoundFile(full, st.st_size, st.st_mtime_ns)
