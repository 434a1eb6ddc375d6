"""``bastion doctor``: what a user checks before filing a bug, each problem with its fix."""

from __future__ import annotations

import os
from pathlib import Path

import click

from engine.cli.common import json_option
from engine.cli.output import emit_json
from engine.doctor import CHECKS, OS_RELEASE, OS_RELEASE_ENV, SIMULATE_MISSING_ENV, run_checks
from engine.paths import default_home


def _names(only: tuple[str, ...]) -> list[str] | None:
    """``--only a --only b,c`` -> [a, b, c]; None (every check) when not given."""
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    for name in names:
        if name not in CHECKS:
            raise click.BadParameter(
                f"no check named {name!r}; use {', '.join(CHECKS)}", param_hint="--only"
            )
    return names or None


@click.command("doctor")
@click.option(
    "--only",
    multiple=True,
    metavar="NAME",
    help=f"Run only these checks (repeat, or separate with commas): {', '.join(CHECKS)}.",
)
@json_option
def doctor(only: tuple[str, ...], as_json: bool) -> None:
    """Check the machine and the install; print each problem with its fix; exit 1 if any.

    Works even when Bastion's home or database cannot be opened (that is one of the checks).
    """
    # Test-only switches (see engine.doctor): a library reported missing, another distro.
    simulated = os.environ.get(SIMULATE_MISSING_ENV, "")
    checks = run_checks(
        default_home(),
        _names(only),
        simulate_missing=[s.strip() for s in simulated.split(",") if s.strip()],
        os_release=Path(os.environ.get(OS_RELEASE_ENV) or OS_RELEASE),
    )
    failed = [c.name for c in checks if not c.ok]
    if as_json:
        emit_json({"checks": [c.to_dict() for c in checks]})
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            # "note": nothing is broken, but there is advice (low disk, no display).
            status = "FAIL" if not c.ok else ("note" if c.fix else "ok")
            click.echo(f"{status:<4}  {c.name:<{width}}  {c.detail}")
            if c.fix:
                click.echo(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
        if failed:
            click.echo(f"\n{len(failed)} to fix: {', '.join(failed)}")
        else:
            click.echo("\nall is well")
    if failed:
        raise SystemExit(1)
