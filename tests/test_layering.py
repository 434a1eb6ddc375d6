"""The engine stays headless, quiet and light to import (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"
FORBIDDEN = ("PySide6", "PyQt5", "PyQt6", "desktop")


def _engine_files() -> list[Path]:
    return sorted(ENGINE.rglob("*.py"))


def test_engine_never_imports_the_gui() -> None:
    offenders = []
    for path in _engine_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_engine_never_prints_outside_the_cli() -> None:
    offenders = []
    for path in _engine_files():
        if "cli" in path.relative_to(ENGINE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path}:{node.lineno}")
    assert offenders == []


def test_every_engine_module_imports_with_qt_absent() -> None:
    modules = [
        ".".join(p.relative_to(ENGINE.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in _engine_files()
    ]
    code = (
        "import sys, importlib\n"
        "for name in ('PySide6', 'PyQt5', 'PyQt6'): sys.modules[name] = None\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_importing_the_engine_loads_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "import engine.engine, engine.cli.main\n"
        "heavy = [m for m in ('llama_cpp', 'torch', 'transformers', 'sentence_transformers',"
        " 'faiss', 'gguf', 'numpy') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stderr
