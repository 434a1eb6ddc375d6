"""Privacy hardening: private file modes in the home, reverse DNS, and the guard in every child.

Modes are checked under a umask of 022 (the usual one), where a file created without an
explicit mode is readable by every local user.
"""

from __future__ import annotations

import ast
import json
import logging
import logging.handlers
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import NetworkBlocked
from engine.privacy import guard
from tests.conftest import CLIResult

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# -- finding 6: the home and its data files are private ------------------------------------


def test_a_new_home_and_the_files_holding_user_data_are_private(
    home: Path, umask_022: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine import Engine
    from engine.config import update_config
    from engine.privacy import secrets

    with Engine(home) as eng:  # open: the database's -wal and -shm files exist
        for folder in (home, *(home / sub for sub in ("models", "adapters", "collections"))):
            assert mode(folder) == 0o700, folder
        assert mode(home / "logs") == 0o700
        for name in ("bastion.db", "bastion.db-wal", "bastion.db-shm"):
            assert mode(home / name) == 0o600, name
        log_file = home / "logs" / "bastion.log"
        assert mode(log_file) == 0o600
        handler = next(
            h
            for h in logging.getLogger().handlers
            if isinstance(h, logging.handlers.RotatingFileHandler)
            and Path(h.baseFilename) == log_file
        )
        handler.doRollover()  # the file that replaces a full log is private too
        assert mode(log_file) == 0o600 and mode(log_file.with_name("bastion.log.1")) == 0o600
        update_config(home, theme="dark")
        assert mode(home / "config.toml") == 0o600
        monkeypatch.setattr(secrets, "_os_keyring_available", lambda: False)
        monkeypatch.setenv(secrets.PASSWORD_ENV, "correct horse")
        eng.secrets.set("hf_token", "hf_secret")
        assert mode(home / "secrets") == 0o700
        assert mode(home / "secrets" / "keyring.cfg") == 0o600


def test_an_exposed_home_is_repaired_at_start_with_one_notice_in_the_log(
    cli, home: Path, umask_022: None
) -> None:
    from engine.store.db import Database

    # A home as an older version left it: the folders 0755, the files 0644.
    home.mkdir()
    Database(home / "bastion.db").close()
    # An open reader keeps the database's -wal and -shm files in place.
    reader = sqlite3.connect(home / "bastion.db")
    reader.execute("SELECT count(*) FROM sqlite_master").fetchall()
    (home / "logs").mkdir()
    (home / "logs" / "bastion.log").write_text("an older line\n", encoding="utf-8")
    (home / "logs" / "model-host.log").write_text("host output\n", encoding="utf-8")
    (home / "config.toml").write_text('theme = "dark"\n', encoding="utf-8")
    (home / "secrets").mkdir()
    (home / "secrets" / "keyring.cfg").write_text("[keyring-setting]\n", encoding="utf-8")
    (home / "adapters").mkdir()
    exposed_files = [
        home / "bastion.db",
        home / "bastion.db-wal",
        home / "bastion.db-shm",
        home / "logs" / "bastion.log",
        home / "logs" / "model-host.log",
        home / "config.toml",
        home / "secrets" / "keyring.cfg",
    ]
    exposed_folders = [home, home / "logs", home / "secrets", home / "adapters"]
    for path in exposed_files:
        path.chmod(0o644)
    for path in exposed_folders:
        path.chmod(0o755)

    try:
        first: CLIResult = cli("history", "list", "--json")
        assert first.code == 0 and first.stderr == "", first.stderr  # the console stays quiet
        for path in exposed_files:
            assert mode(path) == 0o600, path
    finally:
        reader.close()
    for path in exposed_folders:
        assert mode(path) == 0o700, path

    def notices() -> list[str]:
        text = (home / "logs" / "bastion.log").read_text(encoding="utf-8")
        return [line for line in text.splitlines() if "WARNING" in line and "private" in line]

    assert len(notices()) == 1, notices()
    assert str(home) in notices()[0]
    second = cli("history", "list", "--json")
    assert second.code == 0 and second.stderr == ""
    assert len(notices()) == 1, "the notice is given once, when something was repaired"


# -- finding 8: reverse DNS ----------------------------------------------------------------


def test_reverse_lookups_of_other_machines_are_refused_and_loopback_ones_allowed() -> None:
    guard.activate()
    # sys.audit raises the very events CPython raises for these calls, without any lookup:
    # a guard that failed here cannot send a query.
    with pytest.raises(NetworkBlocked, match=r"192\.0\.2\.1 \(reverse name lookup\)"):
        sys.audit("socket.gethostbyaddr", "192.0.2.1")
    with pytest.raises(NetworkBlocked, match=r"example\.org"):
        sys.audit("socket.gethostbyaddr", "example.org")
    with pytest.raises(NetworkBlocked, match=r"192\.0\.2\.1:80 \(reverse name lookup\)"):
        sys.audit("socket.getnameinfo", ("192.0.2.1", 80))
    with pytest.raises(NetworkBlocked, match=r"2001:db8::1"):
        sys.audit("socket.getnameinfo", ("2001:db8::1", 80, 0, 0))
    for host in ("127.0.0.1", "::1", "localhost"):
        sys.audit("socket.gethostbyaddr", host)
        sys.audit("socket.getnameinfo", (host, 80))
    numeric = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
    assert socket.getnameinfo(("127.0.0.1", 80), numeric) == ("127.0.0.1", "80")


def _can_unshare_network() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


_REAL_REVERSE_LOOKUPS = """\
import json, socket
from engine.errors import NetworkBlocked
from engine.privacy import guard
guard.activate()
seen = {}
for name, call in [
    ("gethostbyaddr", lambda: socket.gethostbyaddr("192.0.2.1")),
    ("getnameinfo", lambda: socket.getnameinfo(("192.0.2.1", 80), 0)),
]:
    try:
        call()
        seen[name] = "answered"
    except NetworkBlocked:
        seen[name] = "refused"
    except OSError as exc:
        seen[name] = f"looked up: {exc!r}"
# getfqdn catches OSError (NetworkBlocked is one) and returns the address it was given.
seen["getfqdn"] = socket.getfqdn("192.0.2.1")
seen["blocked"] = len(guard.blocked_attempts())
print(json.dumps(seen))
"""


@pytest.mark.skipif(not _can_unshare_network(), reason="needs unshare -n (root or user namespaces)")
def test_the_real_reverse_lookup_functions_are_refused() -> None:
    # In a network namespace with only loopback: even without the guard nothing could leave.
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", _REAL_REVERSE_LOOKUPS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen == {
        "gethostbyaddr": "refused",
        "getnameinfo": "refused",
        "getfqdn": "192.0.2.1",
        "blocked": 3,
    }


# -- finding 8: every Python child process Bastion starts runs under the guard -------------

# Each child, by the entry point its command line names (a module run with -m, or a script
# constant run with -c), with arguments that make it end early but only after it has set
# itself up: a configuration, run folder or model that does not exist.
CHILDREN: dict[str, list[str]] = {
    "-m engine.models.host": ["no-such-configuration"],
    "-m engine.train.worker": ["{tmp}/no-such-run"],
    "-m engine.models.selftest": ["probe", "{tmp}/missing.gguf", "default"],
    "-c engine.doctor.runtime._PROBE_SCRIPT": [],
    "-c engine.rag.embedder.export._QUANTIZE": ["{tmp}/missing.onnx", "{tmp}/out.onnx"],
    "-c engine.rag.embedder.onnx_backend._CHILD_EXPORT": ["no-such-embedder", "{tmp}/cache"],
}
# Children that connect out by design, at the user's explicit request, and so run without
# the guard: the installer making an offline bundle (pip downloads the locked wheels).
DOWNLOADERS: dict[str, str] = {
    "-c engine.bundle._RUN_INSTALLER": "bastion bundle create: pip downloads the locked wheels",
}
# Children known to lack the guard until a change lands elsewhere (none now): strict, so
# the mark must go when it does.
PENDING: dict[str, str] = {}
# Mentions of sys.executable that start no process.
NOT_A_CHILD = {("engine.doctor.runtime", "_check_python")}
# Other ways of starting a process: none is used, and a new one must be checked here.
OS_SPAWNERS = {
    "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
    "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp",
    "spawnvpe", "posix_spawn", "posix_spawnp", "system", "popen", "startfile",
}  # fmt: skip
SPAWNING_MODULES = {"multiprocessing", "pty", "concurrent.futures.process"}


def _other_spawner(node: ast.AST) -> str | None:
    """What ``node`` names if it is a way to start a process other than subprocess."""
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
        and node.attr in OS_SPAWNERS
    ):
        return f"os.{node.attr}"
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if base == "os":
            spawners = [a.name for a in node.names if a.name in OS_SPAWNERS]
            return f"from os import {', '.join(spawners)}" if spawners else None
        names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        if any(alias.name == "ProcessPoolExecutor" for alias in node.names):
            return "ProcessPoolExecutor"
    else:
        return None
    found = [n for n in names if n.split(".")[0] in SPAWNING_MODULES or n in SPAWNING_MODULES]
    return found[0] if found else None


def _is_sys_executable(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "executable"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    )


def _python_children() -> tuple[set[str], list[str]]:
    """Every Python child started in engine/ and desktop/, and anything not understood."""
    children: set[str] = set()
    unknown: list[str] = []
    for path in sorted([*(REPO / "engine").rglob("*.py"), *(REPO / "desktop").rglob("*.py")]):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            where = f"{module}:{getattr(node, 'lineno', '?')}"
            spawner = _other_spawner(node)
            if spawner is not None:
                unknown.append(f"{where}: {spawner}")
            if not _is_sys_executable(node):
                continue
            command = parents.get(node)
            if isinstance(command, ast.List) and command.elts[0] is node:
                flag, target = command.elts[1], command.elts[2]
                flag_value = flag.value if isinstance(flag, ast.Constant) else None
                if flag_value == "-m" and isinstance(target, ast.Constant):
                    children.add(f"-m {target.value}")
                elif flag_value == "-c" and isinstance(target, ast.Name):
                    children.add(f"-c {module}.{target.id}")
                else:
                    unknown.append(f"{where}: a command line this test cannot read")
                continue
            scope = node
            while scope in parents and not isinstance(scope, ast.FunctionDef):
                scope = parents[scope]
            if (module, getattr(scope, "name", "")) not in NOT_A_CHILD:
                unknown.append(f"{where}: sys.executable used outside a command line")
    return children, unknown


def test_every_python_child_bastion_starts_is_known_here() -> None:
    children, unknown = _python_children()
    assert unknown == [], "a process is started in a way this test does not check"
    assert children == set(CHILDREN) | set(DOWNLOADERS), (
        "a Python child was added or removed: list it in CHILDREN, and make it call "
        "engine.privacy.guard.activate() before anything else"
    )


# Loaded into every child by PYTHONPATH: at exit, it asks the child's own audit hooks what
# they make of a connection to TEST-NET-1. sys.audit only raises the event; no socket
# connects, so a child without the guard sends nothing either.
_SITECUSTOMIZE = """\
import atexit, os, socket, sys

def _report():
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sys.audit("socket.connect", probe, ("192.0.2.1", 9))
        outcome = "unguarded"
    except OSError as exc:
        outcome = type(exc).__name__
    finally:
        probe.close()
    with open(os.environ["BASTION_TEST_GUARD_REPORT"], "a", encoding="utf-8") as fh:
        fh.write(outcome + "\\n")

atexit.register(_report)
"""


def _command(child: str, tmp: Path) -> list[str]:
    """The child's command line as its caller builds it, with this test's arguments."""
    import importlib

    flag, target = child.split(" ")
    args = [arg.replace("{tmp}", str(tmp)) for arg in CHILDREN[child]]
    if flag == "-c":
        module, _, constant = target.rpartition(".")
        target = getattr(importlib.import_module(module), constant)
    return [sys.executable, flag, target, *args]


@pytest.mark.parametrize(
    "child",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=PENDING[c]))
        if c in PENDING
        else c
        for c in CHILDREN
    ],
)
def test_each_python_child_runs_under_the_guard(child: str, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
    report = tmp_path / "report.txt"
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "BASTION_TEST_GUARD_REPORT": str(report)}
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        _command(child, tmp_path),
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert report.exists(), f"{child} ended without exiting normally: {proc.stderr[-2000:]}"
    outcomes = report.read_text(encoding="utf-8").splitlines()
    assert outcomes and set(outcomes) == {"NetworkBlocked"}, (outcomes, proc.stderr[-2000:])
