"""`--export`: the kept images as a class-folder tree a trainer can read, plus their manifest.

Files are hard-linked where the filesystem allows (no extra space, and the source is untouched either way) and
copied otherwise. An existing file is never overwritten: the same content is skipped, different content is an error.
The folder is claimed as atelier's export folder (`curator.core.ownership`): a folder of someone else's files is
refused.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from curator.core import manifest
from curator.core.atomic import file_mode
from curator.core.errors import AtelierError, UsageError
from curator.core.hashing import file_sha256
from curator.core.ownership import claim
from curator.core.paths import display


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


def check_destination(root: Path, destination: Path, workspace: Path | None = None) -> None:
    """Refuse an export folder inside the source tree (it would be scanned as source on the next run), the
    workspace itself, or a folder that holds files atelier did not write; claims it as an export folder."""
    root, destination = Path(root).resolve(), Path(destination).resolve()
    if destination == root or root in destination.parents:
        raise AtelierError(f"--export {destination} is inside the source folder {root}; choose a folder outside it")
    if workspace is not None and destination == Path(workspace).resolve():
        raise UsageError(f"--export {destination} is the workspace (--out); choose a folder of its own")
    claim(destination, "export", "--export", adopt=_is_export(destination))


def _is_export(folder: Path) -> bool:
    """An unmarked folder that an earlier atelier exported into (its manifest records where from)."""
    try:
        return "exported_from" in manifest.read_metadata(folder / manifest.MANIFEST_NAME)
    except AtelierError:
        return False


def export_kept(frame: pl.DataFrame, root: Path, destination: Path) -> ExportReport:
    """Place every kept, labelled row of `frame` (paths relative to `root`) at the same relative path under
    `destination`, and write `destination/manifest.parquet` with exactly those rows. Files are hard links or
    copies of the sources' contents (a symbolic link in the source is resolved), so the export holds no links."""
    root, destination = Path(root), Path(destination)
    check_destination(root, destination)
    kept = frame.filter(pl.col("keep") & pl.col("label").is_not_null())
    linked = copied = present = 0
    sources = manifest.file_paths(kept, root)
    targets = manifest.file_paths(kept, destination)
    for source, target, sha in zip(sources, targets, kept["sha256"].to_list(), strict=True):
        if target.exists() or target.is_symlink():
            if target.is_symlink() or not target.is_file() or file_sha256(target) != sha:
                raise AtelierError(f"{display(str(target))} already exists with other content; export into an "
                                   f"empty folder")
            present += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(os.path.realpath(source), target)  # Linux's link(2) would link a symlink itself
            linked += 1
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise AtelierError(f"cannot export {display(str(source))}: {exc.strerror}") from None
            shutil.copyfile(os.path.realpath(source), target)
            os.chmod(target, file_mode())
            copied += 1
    manifest.write_atomic(kept, destination / manifest.MANIFEST_NAME, {"exported_from": str(root)})
    return ExportReport(destination, linked, copied, present)
