"""What both command lines (`curator`, `classify`) share: consoles, progress, one-line errors, `--version`, commands
listed in pipeline order, and deprecated option names.

- `console` / `err_console`: stdout and stderr. Into a log file or a pipe, tables are 200 columns wide (rich would
  cut them at 80) and there are no terminal codes.
- `progress_bar()`: a rich bar on a terminal; `PlainProgress` lines (one per stage every 5 s and at its end, never a
  bar of unknown length) in a log file or a pipe.
  `StageDisplay` draws the library's progress events (`curator.core.progress`) on either.
- `fail(exc)`: an `AtelierError` as one line on stderr and its exit code.
- `pipeline_order(...)`: a command group that lists its commands in the order the pipeline runs them.
- `version_option(tool)`: the eager `--version` flag.
- `renamed(...)`: an option's new name and its deprecated old one (kept for one release). A command called with an
  old name says so once on stderr (`say_deprecations`, when it has done its work), or inside the one-line error when
  it fails, so that a failure stays one line.

Only rich and typer are imported here: `--help` must not load the heavy libraries (tests/test_startup.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from typer.core import TyperGroup

from curator.core.errors import AtelierError, UsageError

#: Logs into a file or a pipe: full-width tables (rich would cut them at 80 columns) and plain progress lines.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)

T = TypeVar("T")


class StageDisplay:
    """Draws the library's progress events (`curator.core.progress`: `"stage"`, `"advance"`, `"note"`) on a progress
    display: one task per stage; finished stages stay shown, or with `replace` the next stage takes the previous
    one's place. Commands with facts of their own (train's epochs) extend `__call__`."""

    def __init__(self, bar: Progress | PlainProgress, replace: bool = False):
        self.bar = bar
        self.replace = replace
        self.task = None

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "stage":
            if self.replace and self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(info["name"], total=info.get("total"))
        elif kind == "advance" and self.task is not None:
            self.bar.advance(self.task, info["n"])
        elif kind == "note":
            self.bar.console.print(f"[yellow]{escape(info['text'])}[/]")


class RateColumn(ProgressColumn):
    """Items per second, blank until rich has measured a rate."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:6.1f}/s" if task.speed else "     -/s")


class PlainProgress:
    """Progress for logs and pipes: one plain line per stage every `every` seconds and when it ends (no bars, no
    `0/?`), with the same calls as rich's `Progress` that the commands use."""

    def __init__(self, out: Console, every: float = 5.0):
        self.console, self.every = out, every
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        for task in list(self.tasks):
            self._finish(task)

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        for task in list(self.tasks):
            self._finish(task)
        task = len(self.tasks) + 1000
        self.tasks[task] = {"description": description, "total": total, "done": 0, "start": time.monotonic(),
                            "said": time.monotonic()}
        return task

    def advance(self, task: int, n: float = 1) -> None:
        self.update(task, advance=n)

    def remove_task(self, task: int) -> None:
        self._finish(task)

    def update(self, task: int, description: str | None = None, advance: float = 0, **_) -> None:
        state = self.tasks.get(task)
        if state is None:
            return
        state["done"] += advance
        if description is not None:
            state["description"] = description
        if time.monotonic() - state["said"] >= self.every:
            self._say(state)

    def _say(self, state: dict, end: bool = False) -> None:
        seconds = time.monotonic() - state["start"]
        done, total = state["done"], state["total"]
        count = f"{done:,.0f}/{total:,.0f}" if total else f"{done:,.0f}"
        rate = f", {done / seconds:.1f}/s" if seconds > 0 and done else ""
        self.console.print(f"{escape(state['description'])}: {count}{rate}, {seconds:.0f} s"
                           + (" (done)" if end else ""), highlight=False, soft_wrap=True)
        state["said"] = time.monotonic()

    def _finish(self, task: int) -> None:
        state = self.tasks.pop(task, None)
        if state is not None:
            self._say(state, end=True)


def progress_bar() -> Progress | PlainProgress:
    """A rich progress bar on a terminal; plain progress lines in a log file or a pipe."""
    if not console.is_terminal:
        return PlainProgress(console)
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )


def fail(exc: AtelierError) -> typer.Exit:
    """Print `exc` as one line on stderr (with any deprecated option names the command was called with) and return
    the `typer.Exit` carrying its exit code, for the caller to raise."""
    notes = _take_deprecations()
    told = f" ({'; '.join(notes)})" if notes else ""
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}{escape(told)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=exc.exit_code)


def pipeline_order(*order: str) -> type[TyperGroup]:
    """A typer group class whose `--help` lists the commands named in `order` in that order (the order the pipeline
    runs them), then any others."""

    class PipelineOrder(TyperGroup):
        def list_commands(self, ctx) -> list[str]:
            names = super().list_commands(ctx)
            return sorted(names, key=lambda n: order.index(n) if n in order else len(order))

    return PipelineOrder


def version_option(tool: str) -> Callable[[bool], None]:
    """The callback of an eager `--version` flag: prints "TOOL (atelier) VERSION" and exits 0."""

    def show(value: bool) -> None:
        if value:
            from importlib.metadata import version

            console.print(f"{tool} (atelier) {version('atelier')}", highlight=False)
            raise typer.Exit()

    return show


# Deprecated option names a command was called with; said once, when the command ends (`say_deprecations`) or in
# its error line (`fail`). Process state of the command line only: the library never reads it.
_deprecations: list[str] = []


def reset_deprecations() -> None:
    """Forget earlier notes (each command run starts with none; the apps' callbacks call this)."""
    _deprecations.clear()


def renamed(new_value: T | None, old_value: T | None, new: str, old: str, default: T | None = None) -> T | None:
    """The value of option `new`, given either as `new` or as its deprecated old name `old` (noted for a one-line
    warning); `default` when neither was given. Both at once is a UsageError."""
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise UsageError(f"{old} is the old name of {new}; give {new} only")
    note = f"{old} is deprecated here, use {new}; the old name goes in the next release"
    if note not in _deprecations:
        _deprecations.append(note)
    return old_value


def _take_deprecations() -> list[str]:
    notes = list(_deprecations)
    _deprecations.clear()
    return notes


def say_deprecations(out: Console | None = None) -> None:
    """Print each pending deprecation note as one warning line on stderr, once."""
    for note in _take_deprecations():
        (out or err_console).print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)


def required(value: T | None, name: str) -> T:
    """`value`, or the one-line usage error click gives for a missing option (for options that are required but
    have a deprecated alias, so that typer cannot require them itself)."""
    if value is None:
        raise UsageError(f"Missing option '{name}'")
    return value

