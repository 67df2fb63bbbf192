"""`--export`: the kept images as a class-folder tree a trainer can read, plus their manifest.

Files are hard-linked where the filesystem allows (no extra space, and the source is untouched either way) and
copied otherwise. An existing file is never overwritten: the same content is skipped, different content is an error.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from curator import manifest
from curator.errors import AtelierError
from curator.hashing import file_sha256


@dataclass(frozen=True)
class ExportReport:
    """What an export did."""

    destination: Path
    linked: int
    copied: int
    already_there: int

    @property
    def files(self) -> int:
        return self.linked + self.copied + self.already_there


def check_destination(root: Path, destination: Path) -> None:
    """Refuse an export folder inside the source tree (it would be scanned as source on the next run)."""
    root, destination = Path(root).resolve(), Path(destination).resolve()
    if destination == root or root in destination.parents:
        raise AtelierError(f"--export {destination} is inside the source folder {root}; choose a folder outside it")


def export_kept(frame: pl.DataFrame, root: Path, destination: Path) -> ExportReport:
    """Place every kept, labelled row of `frame` (paths relative to `root`) at the same relative path under
    `destination`, and write `destination/manifest.parquet` with exactly those rows."""
    root, destination = Path(root), Path(destination)
    check_destination(root, destination)
    kept = frame.filter(pl.col("keep") & pl.col("label").is_not_null())
    linked = copied = present = 0
    for rel, sha in kept.select("path", "sha256").iter_rows():
        source, target = root / rel, destination / rel
        if target.exists():
            if file_sha256(target) != sha:
                raise AtelierError(f"{target} already exists with other content; export into an empty folder")
            present += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
            linked += 1
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise AtelierError(f"cannot export {source}: {exc.strerror}") from None
            shutil.copy2(source, target)
            copied += 1
    manifest.write_atomic(kept, destination / manifest.MANIFEST_NAME, {"exported_from": str(root)})
    return ExportReport(destination, linked, copied, present)
