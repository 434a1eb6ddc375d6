"""The network guard: nothing leaves the machine unless the user asked for it in that call.

Two layers, both installed by ``activate()`` at engine start:

1. environment switches that put the Hugging Face libraries offline and turn off every
   telemetry switch we know of, so well-behaved libraries never try;
2. a Python audit hook that refuses any socket connection or DNS lookup (forward or
   reverse) that is not loopback or a Unix socket, raising ``NetworkBlocked`` with the
   name of the code that tried, and logging it. Audit hooks cannot be removed once
   added, so a library cannot quietly undo the guard.

``allow_network(reason, hosts=...)`` opens the guard for the duration of an explicit,
user-requested download (a model the user asked to fetch), to those hosts and their
subdomains only: a name is looked up only if it is one of them, and a connection goes
only to an address that such a lookup returned. Without ``hosts`` it opens to every host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from engine.errors import NetworkBlocked

log = logging.getLogger("bastion.privacy")

OFFLINE_SWITCHES = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
}
TELEMETRY_SWITCHES = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "WANDB_MODE": "disabled",
    "WANDB_DISABLED": "true",
    "WANDB_SILENT": "true",
    "COMET_MODE": "disabled",
    "CLEARML_OFFLINE_MODE": "1",
    "NEPTUNE_MODE": "offline",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "ANONYMIZED_TELEMETRY": "False",
    "SCARF_NO_ANALYTICS": "true",
    "OTEL_SDK_DISABLED": "true",
    "POSTHOG_DISABLED": "1",
    "DEEPSPEED_DISABLE_TELEMETRY": "1",
    "TRL_DISABLE_TELEMETRY": "1",
    # ONNX Runtime (the embedder) keeps a device id under ~/.cache/Microsoft otherwise.
    "ORT_DISABLE_TELEMETRY": "1",
}

# Frames in these modules are plumbing; the "caller" named in an error is the first frame
# outside them.
_PLUMBING = (
    "socket",
    "ssl",
    "http.",
    "urllib",
    "urllib3",
    "requests",
    "httpx",
    "httpcore",
    "aiohttp",
    "asyncio",
    "selectors",
    "smtplib",
    "ftplib",
    "engine.privacy",
    "anyio",
    "h11",
    "h2",
    "concurrent.",
    "threading",
)
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}


@dataclass(frozen=True)
class BlockedAttempt:
    target: str
    caller: str


class _State:
    lock = threading.Lock()
    installed = False
    allowances = 0
    blocked: list[BlockedAttempt] = []  # noqa: RUF012 -- one process-wide list on purpose
    # Open allowances limited to some hosts: each a set of host names (subdomains count).
    scoped: list[frozenset[str]] = []  # noqa: RUF012
    # Addresses that lookups of allowed names returned, while a scoped allowance is open.
    resolved: set[str] = set()  # noqa: RUF012
    resolving = threading.local()


def _resolve(host: str) -> list[str]:
    """The addresses of ``host`` (a real lookup: it is allowed when this is called)."""
    try:
        return [str(info[4][0]) for info in socket.getaddrinfo(host, None)]
    except OSError:
        return []  # the caller's own lookup fails the same way, with its own error


def _in_scope(host: Any) -> bool:
    """Whether an open scoped allowance names ``host`` or a domain above it."""
    if isinstance(host, bytes):
        host = host.decode("ascii", errors="replace")
    name = str(host).strip("[]").rstrip(".").lower()
    return any(name == h or name.endswith("." + h) for hosts in _State.scoped for h in hosts)


def _scoped_allows(event: str, args: tuple[Any, ...]) -> bool:
    """Whether a scoped allowance lets this socket event through."""
    if not _State.scoped:
        return False
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        host = args[0] if args else None
        if not _in_scope(host):
            return False
        if not getattr(_State.resolving, "active", False):  # learn where the name points
            _State.resolving.active = True
            try:
                addresses = _resolve(str(host.decode() if isinstance(host, bytes) else host))
            finally:
                _State.resolving.active = False
            with _State.lock:
                _State.resolved.update(a.split("%", 1)[0] for a in addresses)
        return True
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        target = _target(args[1] if len(args) > 1 else None)
        return target is not None and str(target[0]).split("%", 1)[0] in _State.resolved
    return False


def set_environment_switches() -> None:
    """Offline and no-telemetry switches for this process and its children."""
    for key, value in {**OFFLINE_SWITCHES, **TELEMETRY_SWITCHES}.items():
        os.environ[key] = value


def _is_local_host(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", errors="replace")
    host = str(host).strip("[]").lower()
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _is_ip_literal(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", errors="replace")
    try:
        ipaddress.ip_address(str(host).strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def _module_of(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", "?"))


def _describe_caller(frame: FrameType | None) -> str:
    """``module.function (file:line)`` of the first frame outside networking plumbing."""
    first: FrameType | None = None
    while frame is not None:
        name = _module_of(frame)
        if not any(name == p.rstrip(".") or name.startswith(p) for p in _PLUMBING):
            break
        first = first or frame
        frame = frame.f_back
    chosen = frame or first
    if chosen is None:
        return "unknown code"
    where = f"{os.path.basename(chosen.f_code.co_filename)}:{chosen.f_lineno}"
    described = f"{_module_of(chosen)}.{chosen.f_code.co_qualname} ({where})"
    if first is not None and frame is not None:
        described += f" via {_module_of(first)}"
    return described


def _target(address: Any) -> tuple[Any, str] | None:
    """(host, printable target) of an inet address tuple; None for other families."""
    if isinstance(address, tuple) and len(address) >= 2:
        return address[0], f"{address[0]}:{address[1]}"
    return None


def _refuse(target: str) -> None:
    caller = _describe_caller(sys._getframe(2))
    attempt = BlockedAttempt(target, caller)
    with _State.lock:
        _State.blocked.append(attempt)
    message = (
        f"Bastion blocked a network connection to {target} attempted by {caller}: "
        "nothing leaves this machine unless you ask for a download"
    )
    log.warning("%s", message)
    raise NetworkBlocked(message)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not event.startswith("socket.") or _State.allowances > 0:
        return
    if _scoped_allows(event, args):
        return
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock = args[0]
        family = getattr(sock, "family", None)
        if family not in (socket.AF_INET, socket.AF_INET6):
            return  # Unix sockets, netlink: local by construction
        address = args[1] if len(args) > 1 else None
        target = _target(address)
        if target is not None and not _is_local_host(target[0]):
            _refuse(target[1])
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        host = args[0] if args else None
        # Resolving a name asks a DNS server: that is a connection too. Literal addresses
        # resolve locally; connecting to them is checked above.
        if not _is_local_host(host) and not _is_ip_literal(host):
            _refuse(f"{host} (name lookup)")
    elif event == "socket.gethostbyaddr":
        host = args[0] if args else None
        # A reverse lookup asks a DNS server who an address is (a PTR query), so even an
        # address literal leaves the machine, and a name is resolved forwards first.
        if not _is_local_host(host):
            _refuse(f"{host} (reverse name lookup)")
    elif event == "socket.getnameinfo":
        target = _target(args[0] if args else None)
        # The event carries the address but not the flags, so a purely numeric call
        # (NI_NUMERICHOST) cannot be told from a PTR query and is refused as well; the
        # ipaddress module formats an address without asking anyone.
        if target is not None and not _is_local_host(target[0]):
            _refuse(f"{target[1]} (reverse name lookup)")


def activate() -> None:
    """Install the guard in this process (idempotent)."""
    set_environment_switches()
    with _State.lock:
        if _State.installed:
            return
        sys.addaudithook(_audit)
        _State.installed = True
    log.debug("network guard active")


def is_active() -> bool:
    return _State.installed


def blocked_attempts() -> list[BlockedAttempt]:
    """Connections refused so far in this process, oldest first."""
    with _State.lock:
        return list(_State.blocked)


@contextlib.contextmanager
def allow_network(reason: str, hosts: Iterable[str] | None = None) -> Iterator[None]:
    """Let connections through while an explicitly requested download runs.

    Args:
        reason: logged.
        hosts: only these hosts and their subdomains; None opens the guard to every host.
    """
    scope = None if hosts is None else frozenset(h.strip(".").lower() for h in hosts)
    shown = "every host" if scope is None else ", ".join(sorted(scope))
    log.info("network allowed to %s: %s", shown, reason)
    with _State.lock:
        if scope is None:
            _State.allowances += 1
        else:
            _State.scoped.append(scope)
    try:
        yield
    finally:
        with _State.lock:
            if scope is None:
                _State.allowances -= 1
            else:
                _State.scoped.remove(scope)
                if not _State.scoped:
                    _State.resolved.clear()
