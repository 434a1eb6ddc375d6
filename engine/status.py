"""What the engine reports about itself: the network guard's state and the home's disk use."""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from engine.jobs import JobContext
from engine.privacy import guard

# What each storage area holds, relative to the home, in the order a user reads them.
STORAGE_AREAS: dict[str, tuple[str, ...]] = {
    "Database (conversations, document text, model list)": (
        "bastion.db",
        "bastion.db-wal",
        "bastion.db-shm",
    ),
    "Models": ("models",),
    "Fine-tuned adapters": ("adapters",),
    "Document collections (search indexes)": ("collections",),
    "Caches (converted embedders, training)": ("cache",),
    "Logs": ("logs",),
}


@dataclass(frozen=True)
class StorageUsage:
    """Bytes per storage area of the home (``STORAGE_AREAS``' names)."""

    home: Path
    areas: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.areas.values())


@dataclass(frozen=True)
class PrivacyStatus:
    """The network guard's state in this process, and where the audit log would go."""

    guard_active: bool
    offline_switches: int  # how many offline switches Bastion sets
    offline_missing: list[str]  # those not set as they should be
    telemetry_switches: int
    telemetry_missing: list[str]
    blocked: int  # connections refused since the process started
    last_blocked: guard.BlockedAttempt | None
    audit_log: bool
    audit_log_path: Path


def privacy_status(audit_log: bool, audit_log_path: Path) -> PrivacyStatus:
    """The guard's state now (a few dictionary lookups)."""
    blocked = guard.blocked_attempts()
    return PrivacyStatus(
        guard_active=guard.is_active(),
        offline_switches=len(guard.OFFLINE_SWITCHES),
        offline_missing=[k for k, v in guard.OFFLINE_SWITCHES.items() if os.environ.get(k) != v],
        telemetry_switches=len(guard.TELEMETRY_SWITCHES),
        telemetry_missing=[
            k for k, v in guard.TELEMETRY_SWITCHES.items() if os.environ.get(k) != v
        ],
        blocked=len(blocked),
        last_blocked=blocked[-1] if blocked else None,
        audit_log=audit_log,
        audit_log_path=audit_log_path,
    )


def tree_size(path: Path) -> int:
    """Bytes in a file, or in every file below a folder (links are not followed)."""
    try:
        info = path.lstat()
    except OSError:
        return 0  # not there (yet): an empty area
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we looked
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def storage_usage(home: Path, ctx: JobContext) -> StorageUsage:
    """Sum each area's files (a walk of the home: can take a while on a big one)."""
    sizes = {}
    for n, (area, parts) in enumerate(STORAGE_AREAS.items()):
        ctx.check_cancelled()
        ctx.report(n, len(STORAGE_AREAS), area)
        sizes[area] = sum(tree_size(home / part) for part in parts)
    return StorageUsage(home, sizes)
