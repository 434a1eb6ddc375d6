"""The desktop checks: the system libraries Qt's xcb plugin needs (and their fix), the display."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from engine.doctor.common import OS_RELEASE, SETUP, Check, _Context

# What Qt 6's xcb platform plugin loads from the system, by soname: the Debian/Ubuntu
# package, the Fedora/RHEL package, and "*" where PySide6 6.8-6.11 needs it (read with
# ldd; where there is no ldd these are loaded one by one). Only missing ones are installed;
# the others are here so that a fix names a package whichever library a machine lacks.
_QT_XCB_TABLE = """
libxcb-cursor.so.0       libxcb-cursor0       xcb-util-cursor      *
libxcb-icccm.so.4        libxcb-icccm4        xcb-util-wm          *
libxcb-keysyms.so.1      libxcb-keysyms1      xcb-util-keysyms     *
libxcb-image.so.0        libxcb-image0        xcb-util-image       *
libxcb-render-util.so.0  libxcb-render-util0  xcb-util-renderutil  *
libxcb-util.so.1         libxcb-util1         xcb-util             *
libxkbcommon-x11.so.0    libxkbcommon-x11-0   libxkbcommon-x11     *
libxkbcommon.so.0        libxkbcommon0        libxkbcommon         *
libxcb.so.1              libxcb1              libxcb               *
libxcb-xkb.so.1          libxcb-xkb1          libxcb               *
libxcb-sync.so.1         libxcb-sync1         libxcb               *
libxcb-shape.so.0        libxcb-shape0        libxcb               *
libxcb-randr.so.0        libxcb-randr0        libxcb               *
libxcb-xfixes.so.0       libxcb-xfixes0       libxcb               *
libxcb-shm.so.0          libxcb-shm0          libxcb               *
libxcb-render.so.0       libxcb-render0       libxcb               *
libxcb-xinerama.so.0     libxcb-xinerama0     libxcb
libxcb-glx.so.0          libxcb-glx0          libxcb
libxcb-xinput.so.0       libxcb-xinput0       libxcb
libX11-xcb.so.1          libx11-xcb1          libX11-xcb           *
libX11.so.6              libx11-6             libX11               *
libSM.so.6               libsm6               libSM
libICE.so.6              libice6              libICE
libEGL.so.1              libegl1              libglvnd-egl         *
libGL.so.1               libgl1               libglvnd-glx         *
libGLX.so.0              libglx0              libglvnd-glx
libOpenGL.so.0           libopengl0           libglvnd-opengl
libfontconfig.so.1       libfontconfig1       fontconfig           *
libfreetype.so.6         libfreetype6         freetype             *
libdbus-1.so.3           libdbus-1-3          dbus-libs            *
libglib-2.0.so.0         libglib2.0-0         glib2                *
libgthread-2.0.so.0      libglib2.0-0         glib2                *
libz.so.1                zlib1g               zlib
"""
_ROWS = [line.split() for line in _QT_XCB_TABLE.strip().splitlines()]
QT_XCB_PACKAGES = {row[0]: (row[1], row[2]) for row in _ROWS}
_QT_XCB_NEEDS = tuple(row[0] for row in _ROWS if row[3:] == ["*"])


# -- the desktop ------------------------------------------------------------------------


def _os_release(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return values
    for line in lines:
        key, sep, raw = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            parts = shlex.split(raw, comments=False) or [""]
            values[key.strip()] = parts[0]
    return values


def install_command(sonames: Iterable[str], os_release: Path = OS_RELEASE) -> str:
    """The ``apt``/``dnf`` command that installs ``sonames``, for this distribution."""
    sonames = sorted(set(sonames))
    known = [s for s in sonames if s in QT_XCB_PACKAGES]
    unknown = [s for s in sonames if s not in QT_XCB_PACKAGES]
    info = _os_release(os_release)
    family = set(f"{info.get('ID', '')} {info.get('ID_LIKE', '')}".lower().split())
    apt = "sudo apt install " + " ".join(dict.fromkeys(QT_XCB_PACKAGES[s][0] for s in known))
    dnf = "sudo dnf install " + " ".join(dict.fromkeys(QT_XCB_PACKAGES[s][1] for s in known))
    fixes = []
    if known:
        if family & {"debian", "ubuntu"}:
            fixes.append(apt)
        elif family & {"fedora", "rhel", "centos"}:
            fixes.append(dnf)
        else:
            fixes.append(f"Debian/Ubuntu: {apt}; Fedora/RHEL: {dnf}")
    for soname in unknown:
        if soname.startswith("libQt6"):
            fixes.append(f"{soname} belongs to PySide6: reinstall it with {SETUP}")
        else:
            fixes.append(
                f"find the package that has {soname}: "
                f"`apt-file search {soname}` or `dnf provides '*/{soname}'`"
            )
    return "; ".join(fixes)


def _missing_libraries(plugin: Path) -> tuple[list[str], str]:
    """Sonames the plugin cannot load, and how that was found out."""
    ldd = shutil.which("ldd")
    if ldd is not None:
        try:
            # ldd follows the plugin's RUNPATH into PySide6's own Qt libraries
            # (libQt6XcbQpa.so.6, libQt6Gui.so.6, ...) and lists their needs too.
            out = subprocess.run(
                [ldd, str(plugin)], capture_output=True, text=True, timeout=20, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        if "=>" in out:
            missing = re.findall(r"^\s*(\S+)\s*=>\s*not found", out, flags=re.MULTILINE)
            return sorted(set(missing)), "ldd"
    import ctypes

    missing = []
    for soname in _QT_XCB_NEEDS:
        try:
            ctypes.CDLL(soname)
        except OSError:
            missing.append(soname)
    return missing, "loaded one by one (no ldd)"


def _check_desktop(ctx: _Context) -> Check:
    if not sys.platform.startswith("linux"):
        system = {"darwin": "macOS", "win32": "Windows"}.get(sys.platform, sys.platform)
        return Check("desktop", True, f"{system}: Qt brings what it needs (no system libraries)")
    # find_spec of a top-level package reads no Qt library and starts nothing.
    spec = importlib.util.find_spec("PySide6")
    if spec is None or not spec.submodule_search_locations:
        return Check("desktop", False, "PySide6 (Qt for Python) is not installed", f"run {SETUP}")
    plugin = Path(next(iter(spec.submodule_search_locations))) / "Qt/plugins/platforms/libqxcb.so"
    if not plugin.is_file():
        return Check(
            "desktop",
            False,
            f"Qt's xcb platform plugin is missing: {plugin}",
            f"reinstall PySide6: {SETUP}",
        )
    missing, how = _missing_libraries(plugin)
    simulated = sorted(ctx.simulate_missing - set(missing))
    missing = sorted({*missing, *simulated})
    if not missing:
        return Check("desktop", True, f"the Qt xcb plugin {plugin} finds every library ({how})")
    note = f" ({', '.join(simulated)} simulated)" if simulated else ""
    return Check(
        "desktop",
        False,
        f"the Qt xcb plugin {plugin} cannot load: missing {', '.join(missing)}{note} ({how}); "
        "the desktop app would stop with Qt's 'could not load the Qt platform plugin \"xcb\"'",
        install_command(missing, ctx.os_release),
    )


def _check_display(ctx: _Context) -> Check:
    if not sys.platform.startswith("linux"):
        return Check("display", True, "windows open on the desktop of the signed-in user")
    for name in ("WAYLAND_DISPLAY", "DISPLAY", "QT_QPA_PLATFORM"):
        if os.environ.get(name):
            return Check("display", True, f"{name}={os.environ[name]}")
    # Advice, not a failure: the command line and the server need no display.
    return Check(
        "display",
        True,
        "no DISPLAY or WAYLAND_DISPLAY: the desktop app cannot open a window here "
        "(the command line works)",
        "start the app in a desktop session, or headless with "
        "`xvfb-run -a python3 installer/bootstrap.py run`",
    )
