"""The one progress protocol of atelier's long-running library calls: a callback `events(kind, info)`.

Every library function that runs long (`clean`, `later_stages`, `embed_files`, the neighbour search, the duplicate
cascade, `run_ingest`, `train`, `evaluate`, `classify_dir`, the pixel cache) takes `events: Event | None` and says
what happens through it; the command lines draw it (`curator.cli_support.StageDisplay` and its subclasses), a program
can log it, and None means silence. Kinds every caller may send:

- `"stage"`, `{"name": str, "total": int | None}`: a counted stage starts (None: the total is unknown).
- `"advance"`, `{"n": int}`: n more items of the current stage are done.
- `"note"`, `{"text": str}`: a one-line remark for the user.

Commands add facts of their own, documented where they are sent: `"epoch"` (train), `"page"`, `"item"` and
`"listing_failed"` (ingest). A receiver ignores kinds it does not know.
"""

from __future__ import annotations

from collections.abc import Callable

Event = Callable[[str, dict], None]


def silent(kind: str, info: dict) -> None:
    """The receiver of a call made without one: drops every event."""


def stage(events: Event | None, name: str, total: int | None) -> None:
    """Send `"stage"`: a counted stage called `name` starts, with `total` items (None: unknown)."""
    if events is not None:
        events("stage", {"name": name, "total": total})


def advance(events: Event | None, n: int = 1) -> None:
    """Send `"advance"`: `n` more items of the current stage are done."""
    if events is not None:
        events("advance", {"n": n})


def note(events: Event | None, text: str) -> None:
    """Send `"note"`: a one-line remark for the user."""
    if events is not None:
        events("note", {"text": text})
