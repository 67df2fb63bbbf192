"""What training reads: the split table of a curated workspace, and the images' pixels.

Two ways to the pixels of an image, both giving `Preprocess.square` (the short side resized with the model's
interpolation, the centre kept: exactly the region the eval transform crops from):
- the pixel cache: each image decoded once into a square appended to a store in the workspace, keyed by the file's
  sha256 and named by the preprocessing (`Preprocess.key`), so squares made another way are never read. Epochs,
  reruns and other settings read that memory-mapped file; RAM stays bounded by the page cache. It costs
  `pixel_record_bytes` per image on disk (255,828 bytes at Lite2's 292-pixel square: 26 GB per 100,000 images), so
  `classify train` fills it only when stage 2 runs and the images fit its budget;
- `StreamedBatches`: the files decoded on the fly through the batched data plane (`curator.embedding.dataplane`, the
loader
  `classify dir` and `curator clean` use), batch by batch, in an order drawn for each pass: nothing is written.

Both give the same training crops: `SeededBatches` draws each pass's positions and one seed per crop from the run's
`torch.Generator`, and the crop is `augment(square, seed)` whichever path made the square (`Crops` over the cache,
`FileWork` on the fly). Nothing here draws from the process's default generators itself (the data plane's
DataLoader takes its workers' base seed from torch's; `classify train` runs it inside `classify.rng.private_rng`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from curator.core import manifest
from curator.core.atomic import atomic_path
from curator.core.errors import UsageError
from curator.core.hashing import file_sha256
from curator.core.images import ReadPolicy, decode_bytes, looks_like_image, read_image, read_source, scan
from curator.core.paths import from_text, relative_text, to_text
from curator.core.progress import Event, advance
from curator.core.store import RecordStore, set_aside, sha_array
from curator.embedding.preprocess import Preprocess

if TYPE_CHECKING:
    import torch

    from curator.embedding.dataplane import Context, Item

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitTable:
    """The kept, labelled rows of a splits file with absolute paths, and where they came from."""

    frame: pl.DataFrame  # columns: path (absolute, as text), path_escaped, rel_path, label, group, sha256, split, weight
    classes: list[str]
    root: Path
    workspace: Path
    splits_path: Path
    splits_sha256: str
    backbone_key: str | None

    def rows(self, split: str) -> pl.DataFrame:
        return self.frame.filter(pl.col("split") == split)


def read_split_table(splits_path: Path, need: Sequence[str] = ("train", "val")) -> SplitTable:
    """Read `curator split`'s output, resolve paths against the cleaned root, and check it can train a model.

    Errors (one sentence each): a missing or invalid file, no `split` column (a `--folds` file), a split in `need`
    with no rows, a class with no train rows.
    """
    splits_path = Path(splits_path)
    if splits_path.is_dir():
        splits_path = splits_path / "splits.parquet"
    if not splits_path.is_file():
        raise UsageError(f"no splits file at {splits_path}; run `curator split --workspace WS` first")
    df = manifest.read(splits_path)
    if "split" not in df.columns:
        raise UsageError(f"{splits_path} has no `split` column (a --folds file?); run `curator split` without --folds")
    workspace = splits_path.parent
    meta = {}
    if (workspace / manifest.MANIFEST_NAME).is_file():
        meta = manifest.read_metadata(workspace / manifest.MANIFEST_NAME)
    root = Path(meta.get("root") or workspace)
    df = df.filter(pl.col("split").is_not_null() & pl.col("label").is_not_null() & pl.col("sha256").is_not_null())
    if "weight" not in df.columns:
        df = df.with_columns(pl.lit(1.0, dtype=pl.Float32).alias("weight"))
    escaped = df["path_escaped"] if "path_escaped" in df.columns else pl.Series([False] * len(df))
    absolute = [to_text(str(path)) for path in manifest.file_paths(df, root)]
    frame = df.select(
        pl.Series("path", [text for text, _ in absolute], dtype=pl.String),
        pl.Series("path_escaped", escaped.fill_null(False), dtype=pl.Boolean),
        pl.col("path").alias("rel_path"), "label", "group", "sha256", "split", "weight",
    )
    for split in need:
        if frame.filter(pl.col("split") == split).is_empty():
            raise UsageError(f"{splits_path} has no {split} rows; run `curator split` again (ratios put none there)")
    classes = sorted(frame["label"].unique().to_list())
    train_classes = set(frame.filter(pl.col("split") == "train")["label"].to_list())
    if "train" in need and (missing := [c for c in classes if c not in train_classes]):
        raise UsageError(f"classes with no train rows in {splits_path}: {', '.join(missing)}")
    return SplitTable(frame, classes, root, workspace, splits_path, file_sha256(splits_path),
                      meta.get("backbone_key"))


def folder_images(directory: Path, classes: Sequence[str],
                  policy: ReadPolicy | None = None) -> tuple[pl.DataFrame, dict[str, str]]:
    """The images under a class-folder tree (path, path_escaped, rel_path, sha256, label), label = the first folder
    when it names one of `classes`, else null; and {rel_path: reason} for files that could not be read. Files are
    read through `policy` (default: regular files under `directory` only), so a FIFO or an outside link is a reason,
    never a hang or a leak."""
    directory = Path(directory)
    policy = policy or ReadPolicy(root=directory)
    rows, unreadable = [], {}
    for path in scan(directory, follow_symlinks=policy.follow_symlinks):
        if not looks_like_image(path):
            continue
        rel, escaped = relative_text(path, directory)
        first = rel.split("/", 1)[0] if "/" in rel else None
        data, row = read_source(path, policy)
        if row is not None:
            unreadable[rel] = row.info.reason or row.info.status
            continue
        rows.append({"path": to_text(str(path))[0], "path_escaped": escaped, "rel_path": rel,
                     "sha256": hashlib.sha256(data).hexdigest(), "label": first if first in classes else None})
    schema = {"path": pl.String, "path_escaped": pl.Boolean, "rel_path": pl.String, "sha256": pl.String,
              "label": pl.String}
    return pl.DataFrame(rows, schema=schema), unreadable


def file_items(frame: pl.DataFrame) -> list[tuple[str, str]]:
    """(path the OS opens, sha256) for each row of a frame from `read_split_table` or `folder_images`."""
    escaped = frame["path_escaped"].to_list() if "path_escaped" in frame.columns else [False] * len(frame)
    return [(from_text(text, flag), sha)
            for text, flag, sha in zip(frame["path"].to_list(), escaped, frame["sha256"].to_list(), strict=True)]


#: Pixel-cache records checked per read in `PixelCache.verify` (about 64 MB of 292-px squares).
VERIFY_RECORDS = 256


class PixelCache:
    """Append-only file of (sha256, crc32, uint8 side x side x 3) records, read a record at a time, with a
    metadata file (side, record size, format, and the preprocessing key). `side` is `preprocess.resize`: a record is
    `preprocess.square(image)`. The records live in a `curator.core.store.RecordStore`: appending costs O(batch), reads
    touch only the rows asked for, and an interrupted run loses at most the batch in flight (fsync every 64 MB and
    on `flush`/`close`; see `curator.core.store` for what a machine crash can lose).

    The files are named by the preprocessing (`pixels-SIDE-HASH.u8` and `.json`, HASH from `preprocess.key()`), so a
    model with other preprocessing (interpolation, crop, resize, version of the geometry) uses a cache of its own
    and never reads squares made for another.

    Verified, not trusted:
    - records without metadata (a cache of an older format, or its metadata lost), unreadable metadata, or metadata
      that disagrees with this side, record size or preprocessing key make the file unusable: it is set aside
      (`*.unusable-N`, never deleted) and a fresh cache is started, with a warning;
    - a torn last record (a run killed mid-write) is cut off on open;
    - every record carries a CRC-32 of its sha256 and pixels; `verify` (run by `fill_pixel_cache` on the records it is
      about to use) drops a record that fails it from the index, with a warning, so that it is decoded again.
    Warnings collect in `self.warnings`.
    """

    FORMAT = 3

    def __init__(self, directory: Path, preprocess: Preprocess):
        self.preprocess = preprocess
        self.side = side = preprocess.resize
        self.record = np.dtype([("sha", "u1", (32,)), ("crc", "<u4"), ("pix", "u1", (side, side, 3))])
        self.path = pixel_cache_path(directory, preprocess)
        self.meta_path = self.path.with_suffix(".json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.warnings: list[str] = []
        self._verify_meta()
        self._store = RecordStore(self.path, self.record)

    def _meta(self) -> dict:
        return {"side": self.side, "record_bytes": self.record.itemsize, "format": self.FORMAT,
                "preprocess": self.preprocess.key(), "checksum": "crc32 of sha256 bytes then pixels"}

    def _verify_meta(self) -> None:
        """Set the records aside when their metadata is missing, unreadable or not this cache's; write fresh
        metadata where there is none."""
        problem = None
        if self.meta_path.exists():
            try:
                meta = json.loads(self.meta_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                meta = None
            if not isinstance(meta, dict):
                problem = "its metadata is not readable JSON"
            elif any(meta.get(k) != v for k, v in self._meta().items()):
                problem = (f"its metadata (side {meta.get('side')!r}, {meta.get('record_bytes')!r}-byte records, "
                           f"format {meta.get('format')!r}, preprocessing {meta.get('preprocess')!r}) is not this "
                           f"cache's")
        elif self.path.exists():
            problem = "its records have no metadata (an older format?)"
        if problem:
            moved = [set_aside(p).name for p in (self.path, self.meta_path) if p.exists()]
            self.warnings.append(f"pixel cache {self.path.name} was unusable ({problem}); set aside as "
                                 f"{' and '.join(moved)} in {self.path.parent} and rebuilt")
        if not self.meta_path.exists():
            with atomic_path(self.meta_path) as tmp:
                tmp.write_text(json.dumps(self._meta(), indent=2))

    def __contains__(self, sha: str) -> bool:
        return sha in self._store

    def __len__(self) -> int:
        return len(self._store)

    def append(self, shas: Sequence[str], pixels: np.ndarray) -> None:
        """Persist a batch of squares with their checksums, in O(batch)."""
        records = np.empty(len(shas), dtype=self.record)
        records["sha"] = sha_array(shas)
        records["pix"] = pixels
        records["crc"] = [_record_crc(r["sha"], r["pix"]) for r in records]
        self._store.append(records)

    def flush(self) -> None:
        """Make every appended square durable (fsync)."""
        self._store.flush()

    def close(self) -> None:
        """fsync and close the file (a later `append` reopens it)."""
        self._store.close()

    def verify(self, shas: Sequence[str]) -> list[str]:
        """Check the cached records of `shas` against their checksums; a damaged one is dropped from the index (so
        it counts as not cached and is decoded again), with a warning. Returns the shas dropped."""
        cached = [(sha, row) for sha in dict.fromkeys(shas) if (row := self._store.row(sha)) is not None]
        damaged = []
        for start in range(0, len(cached), VERIFY_RECORDS):
            part = cached[start:start + VERIFY_RECORDS]
            for (sha, _), record in zip(part, self._store.read([row for _, row in part])):
                if _record_crc(record["sha"], record["pix"]) != int(record["crc"]):
                    damaged.append(sha)
        self._store.exclude(damaged)
        if damaged:
            self.warnings.append(f"pixel cache {self.path.name}: {len(damaged)} damaged records (checksum mismatch) "
                                 f"dropped; decoded again")
        return damaged

    def rows(self, shas: Sequence[str]) -> np.ndarray:
        """Record numbers of `shas` (all must be cached; KeyError naming the first that is not)."""
        return self._store.rows(shas, "pixels")

    def pixels(self, row: int) -> np.ndarray:
        """The square of record number `row`, read from the file (`RecordStore.read`)."""
        return self._store.read([row])[0]["pix"]


def pixel_cache_path(directory: Path, preprocess: Preprocess) -> Path:
    """The records file of the pixel cache for this preprocessing in `directory` (which need not exist)."""
    digest = hashlib.sha256(preprocess.key().encode()).hexdigest()[:12]
    return Path(directory) / f"pixels-{preprocess.resize}-{digest}.u8"


def _record_crc(sha: np.ndarray, pix: np.ndarray) -> int:
    """CRC-32 of a pixel-cache record's sha256 bytes followed by its pixels."""
    return zlib.crc32(np.ascontiguousarray(pix), zlib.crc32(np.ascontiguousarray(sha)))


def square_pixels(path: Path, preprocess: Preprocess,
                  data: bytes | None = None) -> tuple[np.ndarray | None, str | None]:
    """`preprocess.square` of the file (uint8 HWC, side `preprocess.resize`), or the reason it cannot be read (the
    same safe loader, draft size and wording as `curator clean`)."""
    draft = preprocess.draft_size
    decoded = read_image(Path(path), draft) if data is None else decode_bytes(Path(path), data, draft)
    if not decoded.info.ok:
        return None, decoded.info.reason or decoded.info.status
    return preprocess.square(decoded.image), None


def checked_square(path: str, sha: str, preprocess: Preprocess) -> tuple[np.ndarray | None, str | None]:
    """`preprocess.square` of the file at `path`, read through `read_source` and checked against the sha256 that
    `curator clean` recorded; or why not (missing, unreadable, changed since, not decodable)."""
    if not os.path.lexists(path):
        return None, "file is missing"
    data, row = read_source(Path(path))
    if row is not None:
        return None, row.info.reason or row.info.status
    if hashlib.sha256(data).hexdigest() != sha:
        return None, "file changed since `curator clean` (sha256 differs)"
    try:
        return square_pixels(Path(path), preprocess, data)
    except (OSError, ValueError) as exc:
        return None, f"cannot preprocess: {exc}"


class _SquareDataset:
    def __init__(self, items: Sequence[tuple[str, str]], preprocess: Preprocess):
        self.items = list(items)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, sha = self.items[i]
        pixels, reason = checked_square(path, sha, self.preprocess)
        return i, sha, pixels, reason


def fill_pixel_cache(cache: PixelCache, items: Sequence[tuple[str, str]], workers: int = 1,
                     events: Event | None = None) -> dict[str, str]:
    """Decode the (path, sha256) items not in `cache` yet (or whose cached record fails its checksum) and append
    them; returns {sha256: reason} of failures."""
    from torch.utils.data import DataLoader

    todo, seen = [], set()
    failures: dict[str, str] = {}
    cache.verify([sha for _, sha in items])  # damaged records are dropped here, so decoded again below
    for path, sha in items:
        if not os.path.isfile(path):  # a file gone since `curator split` is not trained on, cached or not
            failures[sha] = "file is missing"
        elif sha not in cache and sha not in seen:
            seen.add(sha)
            todo.append((path, sha))
    advance(events, len(items) - len(todo))
    if not todo:
        return failures
    import torch

    # its own generator: a DataLoader draws a base seed for its workers on every pass, from the process's default
    # generator unless given one (decoding uses no randomness; the caller's generators stay untouched)
    loader = DataLoader(_SquareDataset(todo, cache.preprocess), batch_size=32, num_workers=workers,
                        collate_fn=lambda batch: batch, generator=torch.Generator())
    for batch in loader:
        good = [(sha, pix) for _, sha, pix, _ in batch if pix is not None]
        failures.update({sha: reason for _, sha, pix, reason in batch if pix is None})
        if good:
            cache.append([s for s, _ in good], np.stack([p for _, p in good]))
        advance(events, len(batch))
    cache.flush()
    return failures


def pixel_record_bytes(preprocess: Preprocess) -> int:
    """Bytes one image takes in the pixel cache of this preprocessing (sha256, CRC, resize x resize x 3 square)."""
    return 32 + 4 + preprocess.resize * preprocess.resize * 3


#: (square uint8 HWC, seed) to the model's input, uint8 CHW: a training augmentation that draws its randomness from
#: `seed` alone (so a batch's crops do not depend on which process made them, or in what order)
Augment = Callable[[np.ndarray, int], np.ndarray]


def seeded_chunks(positions: Sequence[int], batch_size: int, generator: torch.Generator | None = None,
                  drop_last: bool = False) -> list[list[tuple[int, int]]]:
    """`positions` as (position, seed) pairs in batches of `batch_size`, the last short batch dropped when
    `drop_last`. With `generator`, each position gets a crop seed drawn from it (one draw for the pass); without,
    seed 0 (centre crops draw nothing)."""
    import torch

    from curator.embedding.dataplane import chunked

    positions = [int(i) for i in positions]
    if generator is not None:
        seeds = torch.randint(0, 2**62, (len(positions),), generator=generator).tolist()
    else:
        seeds = [0] * len(positions)
    chunks = list(chunked(zip(positions, seeds), batch_size))
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    return chunks


@dataclass
class SeededBatches:
    """A DataLoader `batch_sampler` over `Crops` with augmentation: each pass, the positions `order()` gives (e.g. a
    sampler's draw from the run's generator), a crop seed for each drawn from `generator`, in batches
    (`seeded_chunks`); `StreamedBatches` draws the same for the same generator. `count` is the positions per pass."""

    order: Callable[[], Sequence[int]]
    count: int
    batch_size: int
    generator: torch.Generator
    drop_last: bool = False

    def __len__(self) -> int:
        return self.count // self.batch_size if self.drop_last else math.ceil(self.count / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(seeded_chunks(self.order(), self.batch_size, self.generator, self.drop_last))


class Crops:
    """Pixel-cache records `rows` as a map-style dataset of (uint8 CHW crop of side `preprocess.crop`, position).
    Without `augment`, a key is a position and the crop is the model's centre crop (`Preprocess.crop_square`: exactly
    the pixels `curator clean` and `classify dir` feed the model); with it, a key is a (position, seed) pair (as
    `SeededBatches` yields them) and the crop is `augment(square, seed)`."""

    def __init__(self, cache: PixelCache, rows: np.ndarray, augment: Augment | None = None):
        self.cache = cache
        self.rows = rows
        self.preprocess = cache.preprocess
        self.augment = augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        import torch

        if self.augment is None:
            return torch.from_numpy(self.preprocess.crop_square(self.cache.pixels(int(self.rows[key])))), key
        position, seed = key
        square = self.cache.pixels(int(self.rows[position]))
        return torch.from_numpy(np.ascontiguousarray(self.augment(square, seed), dtype=np.uint8)), position


@dataclass(frozen=True)
class FileWork:
    """The data plane's per-file work for training: input (position, seed) names `items[position]`, a (path, sha256)
    pair; output `Item((position, sha256, reason or None), pixels)`. The file is read and checked by
    `checked_square`; the pixels are the model's centre crop of the square, or `augment(square, seed)`."""

    items: Sequence[tuple[str, str]]
    preprocess: Preprocess
    augment: Augment | None = None

    def __call__(self, x: tuple[int, int], ctx: Context) -> Item:
        from curator.embedding.dataplane import Item

        position, seed = x
        path, sha = self.items[position]
        square, reason = checked_square(path, sha, self.preprocess)
        if square is None:
            return Item((position, sha, reason))
        if self.augment is None:
            return Item((position, sha, None), self.preprocess.crop_square(square))
        return Item((position, sha, None), np.ascontiguousarray(self.augment(square, seed), dtype=np.uint8))


@dataclass
class StreamedBatches:
    """Batches of `items` ((path, sha256) pairs) decoded on the fly through the data plane, for when the pixel cache
    would be too large: each pass yields (uint8 pixels (n, 3, crop, crop) on `device`, int64 positions into
    `items`), decoding every file again; nothing is written.

    A pass takes the positions `order()` gives (default: every item, in order; e.g. a sampler's draw, so that each
    epoch is shuffled by the caller's `torch.Generator`), in batches of `batch_size` (the last, short one dropped
    when `drop_last`). With `augment`, each row also gets a seed drawn from `generator`, and its pixels are
    `augment(square, seed)`: the same crops whatever the number of `workers`. A file that cannot be read (missing,
    changed since `curator clean`, undecodable) is left out of its batch and recorded in `failures`
    ({sha256: reason}); a batch left with fewer than `min_rows` rows is not yielded (batch norm cannot train on one).
    """

    items: Sequence[tuple[str, str]]
    preprocess: Preprocess
    batch_size: int
    device: Any = "cpu"
    workers: int = 0
    augment: Augment | None = None
    order: Callable[[], Sequence[int]] | None = None
    generator: torch.Generator | None = None
    drop_last: bool = False
    min_rows: int = 1
    failures: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        """Batches per pass (when `order` gives as many positions as there are items, as a sampler does)."""
        n = len(self.items)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _chunks(self) -> list[list[tuple[int, int]]]:
        """This pass's (position, seed) inputs in batches (`seeded_chunks`)."""
        positions = self.order() if self.order is not None else range(len(self.items))
        return seeded_chunks(positions, self.batch_size, self.generator if self.augment is not None else None,
                             self.drop_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        from curator.embedding.dataplane import DataPlane

        crop = self.preprocess.crop
        plane = DataPlane(partial(iter, self._chunks()), FileWork(self.items, self.preprocess, self.augment),
                          (3, crop, crop), device=self.device, workers=self.workers)
        for ready in plane:
            self.failures.update({sha: reason for _, sha, reason in ready.meta if reason is not None})
            if len(ready.positions) < self.min_rows:
                continue
            rows = torch.tensor([ready.meta[p][0] for p in ready.positions], dtype=torch.int64)
            yield ready.pixels, rows
