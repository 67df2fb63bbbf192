"""The command-line entry point both tools share: every failure a user can cause ends in one line and an exit code.

Click prints a usage error as a usage line, a hint and a boxed message; an `OSError` the commands did not expect
(a full disk, a folder made read-only mid-run) would end in a traceback. `run` turns both into one line on stderr:
exit 2 for usage errors, 1 for the environment, 130 for Ctrl-C.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

try:  # typer vendors its own click from 0.2x on; earlier versions use click's
    from typer._click import exceptions
except ImportError:  # pragma: no cover
    from click import exceptions


def _say(console: Console, message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)


def run(app: typer.Typer, args: list[str] | None = None) -> int:
    """Run `app` on `args` (default: the process's) and return its exit code, each failure said in one line."""
    console = Console(stderr=True)
    try:
        result = app(args=args, standalone_mode=False)
    except exceptions.NoArgsIsHelpError as exc:
        console.print(exc.ctx.get_help() if exc.ctx else str(exc), markup=False, highlight=False)
        return 2
    except exceptions.UsageError as exc:
        where = f"; see '{exc.ctx.command_path} --help'" if exc.ctx else ""
        _say(console, f"{_escape(exc.format_message()).rstrip('.')}{where}")
        return 2
    except typer.Abort:
        _say(console, "interrupted")
        return 130
    except KeyboardInterrupt:
        _say(console, "interrupted")
        return 130
    except exceptions.ClickException as exc:
        _say(console, _escape(exc.format_message()))
        return exc.exit_code
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        _say(console, _escape(f"{exc.strerror or exc}{where}"))
        return 1
    return result if isinstance(result, int) else 0


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(" ".join(str(text).split()))


def main(app: typer.Typer) -> None:
    """The console script: run `app` and exit with its code."""
    sys.exit(run(app))
