"""Where Bastion keeps its data: one home directory, checked before use."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path

from engine.errors import EnvironmentFault

HOME_ENV = "BASTION_HOME"
MODELS_DIR_ENV = "BASTION_MODELS_DIR"


def default_home() -> Path:
    """``$BASTION_HOME`` if set, otherwise the platform's user data dir."""
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("bastion", appauthor=False))


# The home holds every prompt, answer and indexed chunk: only its owner may enter it
# (0700), and the files that hold user data are private too (0600), so that they stay
# private when a folder's mode is loosened or a file is moved out. Created with these
# modes, never left to the umask, which is usually 022 (readable by every local user).
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_SUBFOLDERS = ("models", "adapters", "collections", "logs")
# Folders made by other parts of Bastion (the secrets file, the embedder cache).
_OTHER_FOLDERS = ("secrets", "cache")
# Folders whose files all hold user data; the files in the others are protected by the
# home's mode (models are not private, adapters are large trees).
_PRIVATE_FILE_FOLDERS = ("logs", "secrets")
_PRIVATE_FILES = (
    "bastion.db",
    "bastion.db-wal",
    "bastion.db-shm",
    "bastion.db-journal",
    "config.toml",
)


def prepare_home(home: Path) -> Path:
    """Create the home and its sub-folders (owner only), and prove it is writable.

    A home made by an older version, or loosened by hand, is made private again: the home
    and its folders 0700, the database, its journals, the logs, the settings and the
    secrets 0600. What was repaired is noted once, as a warning in the log file.

    Raises:
        EnvironmentFault: the folder cannot be created or written, with the path named.
    """
    home = home.expanduser().resolve()
    try:
        home.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        for sub in _SUBFOLDERS:
            (home / sub).mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        # mkdir succeeds on an existing read-only folder: write something to be sure.
        with tempfile.NamedTemporaryFile(dir=home, prefix=".write-test-"):
            pass
    except PermissionError as exc:
        raise EnvironmentFault(
            f"Bastion's home {home} is not writable",
            hint=f"fix its permissions or set {HOME_ENV} to another folder",
        ) from exc
    except OSError as exc:
        raise EnvironmentFault(
            f"Bastion's home {home} cannot be used: {exc.strerror or exc}",
            hint=f"set {HOME_ENV} to a writable folder",
        ) from exc
    repaired, refused = make_private(home)
    if repaired or refused:
        from engine.logs import log_notice

        # In the log file only: the CLI starts an engine for every command, and its
        # console carries that command's output.
        if repaired:
            log_notice(
                home,
                "other users of this machine could read Bastion's data in %s; made private: %s",
                home,
                ", ".join(_relative(home, p) for p in repaired),
            )
        if refused:
            log_notice(
                home,
                "could not make Bastion's data in %s private (not the owner?): %s",
                home,
                ", ".join(_relative(home, p) for p in refused),
            )
    return home


def _relative(home: Path, path: Path) -> str:
    return "the home folder" if path == home else str(path.relative_to(home))


def make_private(home: Path) -> tuple[list[Path], list[Path]]:
    """Take group and other permissions off the home's folders and data files.

    Returns:
        The paths whose mode was changed, and those whose mode could not be changed.
    """
    candidates = [(home, PRIVATE_DIR_MODE)]
    candidates += [(home / sub, PRIVATE_DIR_MODE) for sub in (*_SUBFOLDERS, *_OTHER_FOLDERS)]
    candidates += [(home / name, PRIVATE_FILE_MODE) for name in _PRIVATE_FILES]
    for folder in _PRIVATE_FILE_FOLDERS:
        try:
            files = sorted(p for p in (home / folder).iterdir() if p.is_file())
        except OSError:
            continue  # missing: nothing to repair
        candidates += [(path, PRIVATE_FILE_MODE) for path in files]
    repaired: list[Path] = []
    refused: list[Path] = []
    for path, mode in candidates:
        try:
            if restrict_mode(path, mode):
                repaired.append(path)
        except OSError:
            refused.append(path)
    return repaired, refused


def restrict_mode(path: Path, mode: int) -> bool:
    """Remove from ``path`` every permission bit outside ``mode``; True if any was removed.

    Only ever takes permissions away (a read-only file stays read-only). A missing path is
    left alone. On Windows, where modes do not govern access, nothing is done.

    Raises:
        OSError: the mode cannot be changed (another user's file, a read-only file system).
    """
    if os.name != "posix":
        return False
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return False
    if not current & ~mode:
        return False
    os.chmod(path, current & mode)
    return True


def open_private(path: Path, flags: int) -> int:
    """``os.open`` that creates a missing file owner-only (0600), whatever the umask."""
    return os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)


def env_float(name: str, default: float) -> float:
    """A number from the environment, or ``default`` when unset or not a number."""
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def builtin_models_dirs() -> list[Path]:
    """Folders where set-up puts the default models (first match wins)."""
    dirs = []
    if os.environ.get(MODELS_DIR_ENV):
        dirs.append(Path(os.environ[MODELS_DIR_ENV]))
    dirs.append(Path(sys.prefix) / "share" / "bastion" / "models")
    return dirs


def resources_dir() -> Path:
    """The repository's ``resources/`` folder (Bastion runs from its checkout)."""
    return Path(__file__).resolve().parent.parent / "resources"


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform can open folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half.

    The file is owner-only (0600): ``mkstemp`` creates it so, and the rename keeps it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
