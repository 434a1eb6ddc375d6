"""The user's settings in ``<home>/config.toml``: plain choices, never secrets.

The file is small and read on demand (a few microseconds), so a change made by one
process -- the desktop app's audit switch -- is seen by the next call in any other (the
CLI, the local server) without a restart. It is written atomically, so a crash leaves the
old file or the new one. Python reads TOML (``tomllib``) but does not write it; the tiny
writer here covers what this file holds: top-level scalars and one level of tables of
scalars. Keys Bastion does not know are kept when the file is rewritten, so a newer
version's settings survive a round trip through an older one.

A file that cannot be parsed is not fatal: Bastion starts with the defaults, which are
the private choices (no audit log), and logs where the broken file is.
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput
from engine.paths import atomic_write_bytes

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.toml"
THEMES = ("system", "light", "dark")


@dataclass(frozen=True)
class Config:
    """Bastion's settings. Defaults are the private and unsurprising choices."""

    # Record every chat question and answer in <home>/logs/audit.log (engine.privacy.audit).
    audit_log: bool = False
    # The desktop app's colour scheme: follow the system, or force light or dark.
    theme: str = "system"
    # Seconds without a request before the model host process is stopped, which gives its
    # RAM and VRAM back (the next answer loads the model again); negative: never.
    model_keep_alive_seconds: int = 300


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


def _validated(raw: dict[str, Any]) -> Config:
    """A ``Config`` from the known keys; values of the wrong type fall back to defaults."""
    defaults = Config()
    values: dict[str, Any] = {}
    for f in fields(Config):
        value = raw.get(f.name, getattr(defaults, f.name))
        if type(value) is not type(getattr(defaults, f.name)):
            log.warning("settings: %s has the wrong type; using the default", f.name)
            value = getattr(defaults, f.name)
        values[f.name] = value
    if values["theme"] not in THEMES:
        values["theme"] = defaults.theme
    return Config(**values)


def load_config(home: Path) -> Config:
    """The settings in ``home`` (the defaults where the file or a key is missing)."""
    return _validated(_read_raw(config_path(home)))


def update_config(home: Path, **changes: Any) -> Config:
    """Change some settings and write the file atomically; returns the new settings.

    Raises:
        InvalidInput: an unknown setting or a value of the wrong type.
    """
    current = load_config(home)
    known = {f.name: type(getattr(current, f.name)) for f in fields(Config)}
    for key, value in changes.items():
        if key not in known:
            raise InvalidInput(f"unknown setting {key!r}", hint=f"known: {', '.join(known)}")
        if type(value) is not known[key]:
            raise InvalidInput(f"setting {key!r} must be a {known[key].__name__}")
    if "theme" in changes and changes["theme"] not in THEMES:
        raise InvalidInput(f"theme must be one of {', '.join(THEMES)}")
    updated = replace(current, **changes)
    path = config_path(home)
    raw = _read_raw(path)
    raw.update(asdict(updated))
    atomic_write_bytes(path, dumps_toml(raw).encode("utf-8"))
    log.info("settings changed: %s", ", ".join(sorted(changes)))
    return updated


# -- a tiny TOML writer ----------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string for every character JSON escapes
        # with \uXXXX or a short escape (both syntaxes agree on them).
        # TOML also forbids a raw DEL, which JSON leaves as it is.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to config.toml")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def dumps_toml(data: dict[str, Any]) -> str:
    """TOML text for top-level scalars and lists, then one level of tables of them."""
    lines = ["# Bastion settings (no secrets here: they live in the OS keyring)."]
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{_toml_key(name)}]")
        for key, value in table.items():
            if isinstance(value, dict):
                raise TypeError("config.toml holds at most one level of tables")
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
