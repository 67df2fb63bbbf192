"""`curator ingest`: fill a class-folder tree (`OUT/<label>/<file>`) and `OUT/catalog.parquet` from a source.

Every item a source yields becomes exactly one catalog row: `status=ok` with the file's path and sha256, or
`status=failed` with the reason (an HTML page, an empty or truncated body, a body over `--max-bytes`, bytes no
decoder accepts, a missing file, an HTTP error after retries). A failed item never leaves a file in the tree.

Resumable: each row is appended to `OUT/.catalog.journal.jsonl` (flushed and synced) the moment its file is in place,
and the journal is folded into `catalog.parquet` (atomically) at the start and end of every run. A rerun skips items
whose row is ok and whose file still has its sha256, and retries the failed ones. Files are written as `*.part` and
renamed, so a killed run leaves no half-written image; a name already taken by different content gets a suffix
instead of overwriting it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from curator.errors import UsageError
from curator.fetch import FetchError, PoliteClient
from curator.hashing import file_sha256
from curator.images import decode_bytes
from curator.manifest import write_atomic

CATALOG_NAME = "catalog.parquet"
JOURNAL_NAME = ".catalog.journal.jsonl"
CATALOG_SCHEMA: dict[str, pl.DataType] = {
    "path": pl.String, "label": pl.String, "group": pl.String, "source": pl.String, "source_id": pl.String,
    "url": pl.String, "title": pl.String, "artist": pl.String, "year": pl.String, "style": pl.String,
    "genre": pl.String, "tags": pl.List(pl.String), "sha256": pl.String, "status": pl.String, "error": pl.String,
}
MAX_NAME_BYTES = 120
_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "MPO": ".jpg"}
Event = Callable[[str, dict], None]


@dataclass
class Item:
    """One image a source offers: where its bytes come from (url, inline data or a local file) and what it is."""

    source: str
    source_id: str
    label: str | None
    group: str | None = None
    url: str | None = None
    headers: dict = field(default_factory=dict)
    data: bytes | None = None
    local: Path | None = None
    title: str | None = None
    artist: str | None = None
    year: str | None = None
    style: str | None = None
    genre: str | None = None
    tags: list[str] = field(default_factory=list)
    error: str | None = None  # the source already knows the item is broken (e.g. a CSV line naming no file)


@dataclass
class IngestResult:
    out: Path
    catalog: Path
    added: int
    skipped: int
    failed: int
    bytes: int
    by_label: dict[str, int]
    failures: dict[str, int]


def safe_name(text: str | None, fallback: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """A file or folder name from untrusted text: NFKC-normalised, no separators, no `..`, no control or shell-
    hostile characters, no leading dots, at most `max_bytes` UTF-8 bytes; from `fallback` when nothing is left."""
    return _clean_name(text, max_bytes) or _clean_name(fallback, max_bytes) or "item"


def _clean_name(text: str | None, max_bytes: int) -> str:
    text = unicodedata.normalize("NFKC", text or "")
    text = re.sub(r"[\x00-\x1f\x7f/\\:*?\"<>|]+", " ", text)
    text = re.sub(r"\.{2,}", ".", text)
    text = re.sub(r"\s+", " ", text).strip(" .-_")
    while len(text.encode("utf-8")) > max_bytes:
        text = text[:-1]
    return text.rstrip(" .")


def _row(item: Item, path: str | None, sha: str | None, status: str, error: str | None) -> dict:
    return {"path": path, "label": item.label, "group": item.group, "source": item.source,
            "source_id": item.source_id, "url": item.url, "title": item.title, "artist": item.artist,
            "year": None if item.year is None else str(item.year), "style": item.style, "genre": item.genre,
            "tags": list(item.tags), "sha256": sha, "status": status, "error": error}


class Catalog:
    """The catalog of one output tree: rows by (source, source_id), journalled as they arrive."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / CATALOG_NAME
        self.journal = self.out / JOURNAL_NAME
        self._lock = threading.Lock()
        self.rows: dict[tuple[str, str], dict] = {}
        if self.path.is_file():
            try:
                frame = pl.read_parquet(self.path)
            except (OSError, pl.exceptions.PolarsError) as exc:
                raise UsageError(f"{self.path} is unreadable ({exc}); move it away to start over") from None
            for row in frame.iter_rows(named=True):
                self.rows[(row["source"], row["source_id"])] = row
        if self.journal.is_file():
            with open(self.journal, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from a killed run
                    self.rows[(row["source"], row["source_id"])] = row
        self.compact()

    def add(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            with open(self.journal, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            self.rows[(row["source"], row["source_id"])] = row

    def frame(self) -> pl.DataFrame:
        rows = sorted(self.rows.values(), key=lambda r: (r["source"], r["label"] or "", r["source_id"]))
        return pl.DataFrame(rows, schema=CATALOG_SCHEMA)

    def compact(self) -> None:
        """Fold the journal into catalog.parquet (atomically), then drop the journal."""
        with self._lock:
            if not self.rows and not self.path.exists():
                return
            write_atomic(self.frame(), self.path)
            self.journal.unlink(missing_ok=True)

    def done(self, item: Item) -> bool:
        """Whether `item` is already in the tree, verified: an ok row whose file still has its sha256."""
        row = self.rows.get((item.source, item.source_id))
        if not row or row["status"] != "ok" or not row["path"]:
            return False
        target = self.out / row["path"]
        return target.is_file() and file_sha256(target) == row["sha256"]


class Writer:
    """Places verified image bytes in the tree: `*.part` then rename; never overwrites other content."""

    def __init__(self, out: Path, link: bool = True):
        self.out = Path(out)
        self.link = link
        self._lock = threading.Lock()

    def place(self, item: Item, data: bytes | None, sha: str, ext: str, own: str | None = None) -> str:
        """Write the item's file and return its path relative to OUT. `own` is the path an earlier run gave this
        same item: the only existing file that may be replaced (its content no longer matched)."""
        label = safe_name(item.label, "unlabelled")
        stem = safe_name(item.title, item.source_id, MAX_NAME_BYTES - 40)
        sid = safe_name(item.source_id, "id", 36)
        base = stem if stem == sid else f"{stem}__{sid}"
        folder = self.out / label
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(1, 1000):
                name = f"{base}{'' if n == 1 else f'-{n}'}{ext}"
                target = folder / name
                rel = target.relative_to(self.out).as_posix()
                if target.exists():
                    if file_sha256(target) == sha:
                        return rel
                    if rel != own:
                        continue
                part = target.with_name(f".{name}.part")
                if item.local is not None and data is None:
                    self._copy_local(item.local, part)
                else:
                    with open(part, "wb") as fh:
                        fh.write(data or b"")
                        fh.flush()
                        os.fsync(fh.fileno())
                os.replace(part, target)
                return target.relative_to(self.out).as_posix()
        raise OSError(f"no free file name for {base}{ext} in {folder}")

    def _copy_local(self, source: Path, part: Path) -> None:
        import shutil

        part.unlink(missing_ok=True)
        if self.link:
            try:
                os.link(source, part)
                return
            except OSError:
                pass
        shutil.copyfile(source, part)


def check_image(data: bytes, name: str) -> tuple[str | None, str | None]:
    """(file extension, None) when `data` is an image the safe loader accepts, else (None, the reason)."""
    if not data:
        return None, "empty response"
    decoded = decode_bytes(Path(name), data)
    if not decoded.info.ok:
        return None, decoded.info.reason or "not a readable image"
    return _EXT.get(decoded.info.format or "", ".img"), None


def run_ingest(items: Iterable[Item], out: Path, client: PoliteClient | None = None, *, concurrency: int = 4,
               link: bool = True, events: Event | None = None) -> IngestResult:
    """Fetch, verify and place every item; one catalog row each (see the module docstring)."""
    emit = events or (lambda kind, info: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(".*.part"):  # left by a killed run: never a file of the tree
        stale.unlink(missing_ok=True)
    catalog = Catalog(out)
    writer = Writer(out, link)
    counts = {"added": 0, "skipped": 0, "failed": 0}
    by_label: dict[str, int] = {}
    failures: dict[str, int] = {}
    lock = threading.Lock()

    def handle(item: Item) -> None:
        status, path, sha, error = "failed", None, None, item.error
        data = item.data
        if error is None:
            try:
                if item.local is not None:
                    data = item.local.read_bytes()
                elif data is None:
                    if client is None or not item.url:
                        raise FetchError("no way to fetch this item")
                    data = client.get_bytes(item.url, headers=item.headers or None)
            except FetchError as exc:
                error = str(exc)
            except OSError as exc:
                error = "file is missing" if isinstance(exc, FileNotFoundError) else f"cannot read: {exc}"
        if error is None:
            ext, error = check_image(data, item.url or str(item.local or item.source_id))
            if error is None:
                sha = hashlib.sha256(data).hexdigest()
                try:
                    prior = catalog.rows.get((item.source, item.source_id)) or {}
                    path = writer.place(item, None if item.local is not None else data, sha, ext,
                                        own=prior.get("path"))
                    status = "ok"
                except OSError as exc:
                    error = f"cannot write: {exc}"
        catalog.add(_row(item, path, sha if status == "ok" else None, status, error))
        with lock:
            if status == "ok":
                counts["added"] += 1
                by_label[item.label or ""] = by_label.get(item.label or "", 0) + 1
            else:
                counts["failed"] += 1
                kind = re.sub(r"\d[\d,]*", "N", (error or "?").split(" from ")[0])[:60]
                failures[kind] = failures.get(kind, 0) + 1
        emit("item", {"status": status, "label": item.label, "error": error,
                      "bytes": len(data) if data is not None else 0})

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        pending: set[Future] = set()
        try:
            for item in _dedupe(items):
                if catalog.done(item):
                    counts["skipped"] += 1
                    emit("item", {"status": "skipped", "label": item.label, "error": None, "bytes": 0})
                    continue
                pending.add(pool.submit(handle, item))
                if len(pending) >= 4 * concurrency:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        f.result()
            for f in pending:
                f.result()
        finally:
            pool.shutdown(wait=True)
            catalog.compact()
    return IngestResult(out, catalog.path, counts["added"], counts["skipped"], counts["failed"],
                        client.bytes if client else 0, by_label, failures)


def _dedupe(items: Iterable[Item]) -> Iterator[Item]:
    """A listing that offers one (source, source_id) twice (overlapping pages) yields it once."""
    seen: set[tuple[str, str]] = set()
    for item in items:
        key = (item.source, item.source_id)
        if key not in seen:
            seen.add(key)
            yield item


def read_catalog(root: Path) -> pl.DataFrame | None:
    """`ROOT/catalog.parquet` when an ingest made ROOT, else None."""
    path = Path(root) / CATALOG_NAME
    if not path.is_file():
        return None
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise UsageError(f"{path} is unreadable ({exc})") from None
