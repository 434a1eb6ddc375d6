"""Where Bastion keeps its data: one home directory, checked before use."""

from __future__ import annotations

import os
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


def prepare_home(home: Path) -> Path:
    """Create the home and its sub-folders, and prove it is writable.

    Raises:
        EnvironmentFault: the folder cannot be created or written, with the path named.
    """
    home = home.expanduser().resolve()
    try:
        for sub in ("", "models", "adapters", "collections", "logs"):
            (home / sub).mkdir(parents=True, exist_ok=True)
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
    return home


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half."""
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
