"""Finding the files of a collection: folders walked recursively, junk and hidden files left out."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.rag.collections import Source

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


def _is_junk(name: str) -> bool:
    return name.startswith(".") or any(fnmatch.fnmatch(name, p) for p in JUNK_PATTERNS)


def scan(source: Source) -> Iterator[FoundFile]:
    """The files of one source. A file named directly is taken even if hidden.

    Include patterns (if any) must match the path relative to the folder or the file name;
    exclude patterns remove what they match. Symbolic links to folders are not followed
    (they can loop); links to files are.
    """
    root = Path(source.path)
    if root.is_file():
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
            yield FoundFile(full, st.st_size, st.st_mtime_ns)
