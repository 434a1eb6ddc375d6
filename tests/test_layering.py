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


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import stands (``TYPE_CHECKING`` too).

    ``from a import b`` counts as importing both ``a`` and ``a.b`` (``b`` may be a
    module); relative imports are resolved against the file's package.
    """
    package = list(path.relative_to(ENGINE.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def test_chat_and_the_audit_log_do_not_import_each_other() -> None:
    """The chat service reports to an injected audit sink, so neither side knows the other."""

    def within(module: str, package: str) -> bool:
        return module == package or module.startswith(package + ".")

    chat_files = sorted((ENGINE / "chat").rglob("*.py"))
    audit_file = ENGINE / "privacy" / "audit.py"
    assert chat_files and audit_file.exists()
    offenders = [
        f"{path.name}: {module}"
        for path in chat_files
        for module in _imported_modules(path)
        if within(module, "engine.privacy.audit")
    ]
    offenders += [
        f"{audit_file.name}: {module}"
        for module in _imported_modules(audit_file)
        if within(module, "engine.chat")
    ]
    assert offenders == []


def test_the_desktop_uses_only_the_engines_front_door() -> None:
    """``desktop/`` imports ``engine`` (its public names) and never a module inside it:
    the engine's inside can change without the desktop knowing (issue 11)."""
    desktop = ENGINE.parent / "desktop"
    offenders = []
    for path in sorted(desktop.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            offenders += [
                f"{path.name}:{node.lineno}: {n}" for n in names if n.startswith("engine.")
            ]
    assert offenders == []
    import engine

    # and every name it exports resolves (no stale entry in the map)
    for name in engine.__all__:
        assert getattr(engine, name) is not None, name
