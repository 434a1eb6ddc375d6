"""What ``bastion doctor``'s parts share: the check names, the switches, a finding, its context."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.doctor.runtime import _LlamaProbeRun

CHECKS = ("python", "llama.cpp", "self-test", "gpu", "desktop", "display",
          "home", "disk", "keyring", "embedder", "reranker", "privacy")  # fmt: skip
# Test-only switches, read by the CLI: sonames the desktop check reports missing, and
# the os-release file that picks the package manager.
SIMULATE_MISSING_ENV = "BASTION_DOCTOR_SIMULATE_MISSING"
OS_RELEASE_ENV = "BASTION_DOCTOR_OS_RELEASE"
OS_RELEASE = Path("/etc/os-release")

SETUP = "python3 installer/bootstrap.py setup"


@dataclass(frozen=True)
class Check:
    """One finding. ``fix`` says what to do; on a check that is ok it is advice, or empty."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Context:
    home: Path
    simulate_missing: frozenset[str]
    os_release: Path
    llama: _LlamaProbeRun | None = None
