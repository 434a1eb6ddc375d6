"""The user's settings in ``<home>/config.toml``: typed, validated, with one change signal.

Each setting is a field of ``Config`` whose metadata says what it is for and which values
it takes; ``validate`` checks a change against that, so the desktop, the CLI and the
server refuse the same bad values with the same message. ``SettingsStore`` is the one
owner of the file for an ``Engine``: it reads on demand (the file is tiny, so a change
made by another process -- the desktop app's audit switch -- is seen by the next call in
any other without a restart), writes atomically with ``tomli-w`` (a crash leaves the old
file or the new one), and calls its subscribers once per change, whichever process made
it. Keys Bastion does not know are kept when the file is rewritten, so a newer version's
settings survive a round trip through an older one.

A file that cannot be parsed is not fatal: Bastion starts with the defaults, which are
the private choices (no audit log), and logs where the broken file is.
"""

from __future__ import annotations

import logging
import threading
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from engine.errors import InvalidInput
from engine.paths import atomic_write_bytes

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.toml"
THEMES = ("system", "light", "dark")
_HEADER = "# Bastion settings (no secrets here: they live in the OS keyring).\n"


def _setting(default: Any, doc: str, choices: tuple[Any, ...] | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass(frozen=True)
class Config:
    """Bastion's settings. Defaults are the private and unsurprising choices."""

    audit_log: bool = _setting(
        False, "record every chat question and answer in <home>/logs/audit.log"
    )
    audit_server_text: bool = _setting(
        False,
        "with audit_log on, also keep the prompt and answer text of the server's requests "
        "(without it their records hold key, model, tokens, latency and status only)",
    )
    theme: str = _setting("system", "the desktop app's colour scheme", THEMES)
    model_keep_alive_seconds: int = _setting(
        300,
        "seconds without a request before the model process stops and gives its memory "
        "back (the next answer loads the model again); negative: never",
    )


@dataclass(frozen=True)
class SettingInfo:
    """What a client needs to show one setting: its name, type, meaning and choices."""

    name: str
    type: type
    default: Any
    doc: str
    choices: tuple[Any, ...] | None


def describe() -> list[SettingInfo]:
    """Every setting, in the order of ``Config``."""
    defaults = Config()
    return [
        SettingInfo(
            f.name,
            type(getattr(defaults, f.name)),
            getattr(defaults, f.name),
            f.metadata["doc"],
            f.metadata["choices"],
        )
        for f in fields(Config)
    ]


def _problem(info: SettingInfo, value: Any) -> str | None:
    """Why ``value`` cannot be the setting, or None. ``True`` is not an int here."""
    if type(value) is not info.type:
        return f"setting {info.name!r} must be a {info.type.__name__}"
    if info.choices is not None and value not in info.choices:
        return f"{info.name} must be one of {', '.join(map(str, info.choices))}"
    return None


def validate(changes: dict[str, Any]) -> None:
    """Refuse an unknown setting or a bad value with one clear message.

    Raises:
        InvalidInput: the first problem found.
    """
    infos = {info.name: info for info in describe()}
    for key, value in changes.items():
        info = infos.get(key)
        if info is None:
            raise InvalidInput(f"unknown setting {key!r}", hint=f"known: {', '.join(infos)}")
        problem = _problem(info, value)
        if problem is not None:
            raise InvalidInput(problem)


def config_path(home: Path) -> Path:
    return home / CONFIG_FILENAME


def _read_raw(path: Path) -> dict[str, Any]:
    """The file's table; empty when the file is missing or unreadable (logged)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        log.warning("ignoring unreadable settings file %s: %s", path, exc)
        return {}


def _from_raw(raw: dict[str, Any]) -> Config:
    """A ``Config`` from the known keys; a bad value falls back to its default (logged)."""
    values: dict[str, Any] = {}
    for info in describe():
        value = raw.get(info.name, info.default)
        if _problem(info, value) is not None:
            log.warning("settings: %s has a bad value; using the default", info.name)
            value = info.default
        values[info.name] = value
    return Config(**values)


def dumps_toml(data: dict[str, Any]) -> str:
    """The file's text for ``data`` (any TOML-representable table), with its header."""
    return _HEADER + tomli_w.dumps(data)


def load_config(home: Path) -> Config:
    """The settings in ``home`` (the defaults where the file or a key is missing)."""
    return _from_raw(_read_raw(config_path(home)))


def update_config(home: Path, **changes: Any) -> Config:
    """Change some settings and write the file atomically; returns the new settings.

    Raises:
        InvalidInput: an unknown setting or a bad value; nothing is written then.
    """
    validate(changes)
    path = config_path(home)
    raw = _read_raw(path)
    updated = replace(_from_raw(raw), **changes)
    raw.update(asdict(updated))
    atomic_write_bytes(path, dumps_toml(raw).encode("utf-8"))
    log.info("settings changed: %s", ", ".join(sorted(changes)))
    return updated


SettingsListener = Callable[[Config, frozenset[str]], None]


class SettingsStore:
    """The settings of one home, with one change notification for every client.

    Subscribers are called with the new settings and the names that changed, on the
    thread that noticed the change: the one that called ``update``, or the one whose
    ``get`` first read a change another process wrote. A GUI hands that to its own
    thread (the desktop re-emits it as a queued Qt signal).
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = config_path(home)
        self._lock = threading.Lock()
        self._listeners: list[SettingsListener] = []
        self._last: Config | None = None

    def get(self) -> Config:
        """The current settings, read from the file (a few microseconds)."""
        return self._noticed(load_config(self.home))

    def update(self, **changes: Any) -> Config:
        """Validate, write atomically and notify; returns the new settings.

        Raises:
            InvalidInput: an unknown setting or a bad value; nothing is written then.
        """
        return self._noticed(update_config(self.home, **changes))

    def subscribe(self, listener: SettingsListener) -> Callable[[], None]:
        """Call ``listener(config, changed_names)`` on every change; returns the unsubscriber."""
        with self._lock:
            self._listeners.append(listener)
            if self._last is None:
                self._last = load_config(self.home)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def _noticed(self, current: Config) -> Config:
        with self._lock:
            previous, self._last = self._last, current
            listeners = list(self._listeners)
        if previous is None or previous == current:
            return current
        changed = frozenset(
            f.name for f in fields(Config) if getattr(previous, f.name) != getattr(current, f.name)
        )
        for listener in listeners:
            try:
                listener(current, changed)
            except Exception:  # one broken listener must not stop the others or the change
                log.exception("a settings listener failed")
        return current
