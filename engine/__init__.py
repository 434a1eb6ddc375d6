"""Bastion's headless engine: models, chat, history, documents and fine-tuning, offline.

``from engine import Engine`` is the public entry point. Importing this package is cheap:
heavy libraries load only inside the areas that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.engine import Engine

__all__ = ["Engine"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from engine.engine import Engine

        return Engine
    raise AttributeError(name)
