"""The ``bastion`` command: one place where errors become one line and an exit code.

Exit codes follow the contract: 0 success, 1 the operation failed, 2 bad input or usage;
128 + N when signal N (Ctrl-C, SIGTERM) stopped the work after saving it.
"""

from __future__ import annotations

import logging
import sys

import click

from engine.cli.bundle_cmd import bundle_group
from engine.cli.chat_cmd import chat
from engine.cli.collections_cmd import collections_group, search
from engine.cli.dataset_cmd import dataset_group
from engine.cli.doctor_cmd import doctor
from engine.cli.eval_cmd import eval_group
from engine.cli.export_cmd import export
from engine.cli.finetune_cmd import finetune
from engine.cli.history_cmd import history_group
from engine.cli.keys_cmd import keys_group
from engine.cli.models_cmd import models_group
from engine.cli.output import error_line
from engine.cli.secrets_cmd import secrets_group
from engine.cli.serve_cmd import serve
from engine.errors import BastionError, Cancelled

log = logging.getLogger("bastion.cli")


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"bastion: {record.levelname.lower()}: {record.getMessage()}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bastion")
@click.option("-v", "--verbose", is_flag=True, help="Log what the engine does on stderr.")
def cli(verbose: bool) -> None:
    """Bastion: a private LLM workstation. Nothing leaves this machine."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger().addHandler(handler)
    if verbose:
        logging.getLogger().setLevel(logging.INFO)


cli.add_command(models_group)
cli.add_command(chat)
cli.add_command(history_group)
cli.add_command(collections_group)
cli.add_command(search)
cli.add_command(eval_group)
cli.add_command(dataset_group)
cli.add_command(finetune)
cli.add_command(doctor)
cli.add_command(secrets_group)
cli.add_command(export)
cli.add_command(bundle_group)
cli.add_command(keys_group)
cli.add_command(serve)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script calls ``sys.exit`` on it)."""
    try:
        cli.main(args=argv, prog_name="bastion", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        return int(exc.exit_code)
    except click.ClickException as exc:  # usage errors: exit 2
        error_line(exc.format_message())
        return exc.exit_code
    except click.exceptions.Abort:
        return 130
    except BastionError as exc:
        error_line(str(exc))
        return exc.exit_code
    except Cancelled:
        return 130
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1  # stdout closed by a pager or `head`: nothing more to say
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # a bug: the log gets the traceback, the user one line
        log.exception("unexpected error")
        error_line(f"internal error: {type(exc).__name__}: {exc} (details in the log file)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
