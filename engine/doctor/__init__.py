"""``bastion doctor``'s checks: the machine and the install, each problem with its fix."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from engine import paths
from engine.doctor.common import (
    CHECKS,
    OS_RELEASE,
    OS_RELEASE_ENV,
    SETUP,
    SIMULATE_MISSING_ENV,
    Check,
    _Context,
)
from engine.doctor.desktop import QT_XCB_PACKAGES, _check_desktop, _check_display, install_command
from engine.doctor.runtime import (
    _check_gpu,
    _check_llama,
    _check_python,
    _check_selftest,
    _LlamaProbeRun,
    gpu_finding,
)
from engine.doctor.system import (
    _check_disk,
    _check_embedder,
    _check_home,
    _check_keyring,
    _check_privacy,
    _check_reranker,
)
from engine.errors import InvalidInput

__all__ = [
    "CHECKS",
    "OS_RELEASE",
    "OS_RELEASE_ENV",
    "QT_XCB_PACKAGES",
    "SETUP",
    "SIMULATE_MISSING_ENV",
    "Check",
    "gpu_finding",
    "install_command",
    "run_checks",
]

log = logging.getLogger(__name__)


def run_checks(
    home: Path | None = None,
    only: Iterable[str] | None = None,
    *,
    simulate_missing: Iterable[str] = (),
    os_release: Path = OS_RELEASE,
) -> list[Check]:
    """Run the checks (all of ``CHECKS``, or those named in ``only``) in ``CHECKS`` order.

    Never raises for what it finds: a check that breaks becomes a failed ``Check``, so the
    report is complete even when the engine itself cannot start.

    Args:
        home: Bastion's home; ``paths.default_home()`` if None.
        only: names from ``CHECKS``.
        simulate_missing: sonames the desktop check reports as missing (tests).
        os_release: the file that tells the Linux distribution (tests point it elsewhere).

    Raises:
        InvalidInput: a name in ``only`` is not a check.
    """
    from engine.privacy import guard

    guard.activate()  # doctor is a command like the others: nothing leaves the machine
    names = list(CHECKS) if only is None else list(dict.fromkeys(only))
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise InvalidInput(f"no check named {unknown[0]!r}", hint=f"use {', '.join(CHECKS)}")
    ctx = _Context(home or paths.default_home(), frozenset(simulate_missing), os_release)
    if {"llama.cpp", "gpu"} & set(names):
        ctx.llama = _LlamaProbeRun()
    results = []
    for name in sorted(names, key=CHECKS.index):
        try:
            results.append(_RUNNERS[name](ctx))
        except Exception as exc:  # a bug in a check must not hide the other findings
            log.exception("doctor: the %s check failed", name)
            results.append(
                Check(
                    name,
                    False,
                    f"the check itself failed: {type(exc).__name__}: {exc}",
                    "report this as a bug, with the output of `bastion doctor`",
                )
            )
    return results


_RUNNERS: dict[str, Callable[[_Context], Check]] = {
    "python": _check_python,
    "llama.cpp": _check_llama,
    "self-test": _check_selftest,
    "gpu": _check_gpu,
    "desktop": _check_desktop,
    "display": _check_display,
    "home": _check_home,
    "disk": _check_disk,
    "keyring": _check_keyring,
    "embedder": _check_embedder,
    "reranker": _check_reranker,
    "privacy": _check_privacy,
}
