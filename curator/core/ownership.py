"""Which folders atelier may write into: its own, marked, and new or empty ones, never a user's folder.

Every folder atelier fills (a workspace, an export, an ingest OUT, a `classify dir` parts folder, a training run, an
evaluation) gets a small marker file, `.atelier`, naming what kind of folder it is. Before writing, a command claims its
folder: a missing or empty folder is created and marked; a marked folder of the same kind is reused; anything else (a
folder holding files atelier did not write, or atelier's folder of another kind) is refused with one sentence, so that
no user file is ever replaced or removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from curator.core.errors import UsageError

MARKER = ".atelier"
KINDS = ("workspace", "export", "ingest", "predictions", "run", "eval")


def marker_kind(folder: Path) -> str | None:
    """The kind recorded in `folder`'s marker, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if kind in KINDS else None


def _write_marker(folder: Path, kind: str) -> None:
    from curator.core.atomic import atomic_path

    with atomic_path(folder / MARKER) as tmp:
        tmp.write_text(json.dumps({"kind": kind, "tool": "atelier"}) + "\n")


def claim(folder: Path, kind: str, what: str, *, adopt: bool = False) -> Path:
    """Make `folder` atelier's folder of `kind`, or raise `UsageError` when it belongs to someone else.

    `what` names the folder in messages (e.g. "--out"). `adopt` accepts an unmarked folder that the caller has
    recognised as atelier's own from an earlier version (it is then marked).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what} {folder} is a file, not a folder; choose a folder")
    try:
        found = marker_kind(folder) if folder.is_dir() else None
        if found == kind:
            return folder
        if found is not None:
            raise UsageError(f"{what} {folder} is an atelier {found} folder, not a{_n(kind)} {kind} folder; "
                             f"choose another folder")
        if folder.is_dir() and not adopt and any(os.scandir(folder)):
            raise UsageError(f"{what} {folder} already holds files that atelier did not write; choose a new or "
                             f"empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        _write_marker(folder, kind)
    except PermissionError as exc:
        raise UsageError(f"{what} {folder} is not writable ({exc.strerror})") from None
    except OSError as exc:
        raise UsageError(f"cannot use {what} {folder}: {exc.strerror or exc}") from None
    return folder


def _n(kind: str) -> str:
    return "n" if kind[0] in "aeiou" else ""
