"""`curator ingest`: fill a class-folder tree (`OUT/<label>/<file>`) and `OUT/catalog.parquet` from a source.

Every item a source yields becomes exactly one catalog row: `status=ok` with the file's path and sha256, or
`status=failed` with the reason (an HTML page, an empty or truncated body, a body or file over `--max-bytes`, bytes
no decoder accepts, a missing file, a FIFO or other non-regular file, a symbolic link leaving the source folder, an
HTTP error after retries). A failed item never leaves a file in the tree.

OUT is atelier's own folder: it is claimed with `curator.core.ownership.claim(out, "ingest", ...)` (a `.atelier`
marker), so ingest never writes into a folder holding a user's files, and it only replaces or removes what it wrote
itself (its `.NAME.atelier-part` files and the files its catalog names). An unmarked OUT that holds an ingest catalog
from an earlier version is adopted.

Resumable: each row is appended to `OUT/.catalog.journal.jsonl` (flushed and synced) the moment its file is in place,
and the journal is folded into `catalog.parquet` (atomically) at the start and end of every run. A rerun skips items
whose row is ok and whose file still has its sha256, and retries the failed ones. Files are written as
`.NAME.atelier-part` and renamed, so a killed run leaves no half-written image. Written files get the user's umask
permissions (hard links keep their source's).

Names are kept: an item with a file name at its source (`ingest folder`, `artgan`, a parquet image's `path`) lands
as `OUT/<label>/<that name>`, and its title, id and source path are catalog columns, not part of the name. The name
is changed only where it must be (`kept_name`): a character that cannot stand in a file name here (`/`, `\\`, NUL,
the other control characters, a byte that is not valid UTF-8) becomes `%XX` (its bytes in hex), a leading `.`
becomes `%2E` (no hidden files, no `..`), a name longer than `MAX_KEPT_BYTES` is cut before its extension, and a
name without an image extension gets the one its bytes call for (`scan` -> `scan.jpg`; an existing extension is
never doubled). Items without a file name (WikiArt, Pixiv, a parquet row without a path) are named
`<title>__<id>.<ext>`. When two items would land on the same name, the first in listing order keeps it and the next
ones get `~2`, `~3`, ... before the extension (`name~2.jpg`): names are handed out in listing order whatever the
order downloads finish in, so the same source always gives the same names, and no file is ever overwritten by
another item's.

Any file name becomes a row: a name that is not valid UTF-8 is stored escaped (`curator.core.paths.to_text`) in
`source_id`, with `source_id_escaped = true`; every other text column is stored as storable text, and the landed file
and folder names are always valid UTF-8.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
import unicodedata
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from curator.core.atomic import atomic_path, file_mode
from curator.core.errors import UsageError
from curator.core.hashing import file_sha256
from curator.core.images import IMAGE_EXTENSIONS, ReadPolicy, decode_bytes, read_source
from curator.core.manifest import SCHEMA_VERSION
from curator.core.ownership import MARKER, claim, marker_kind
from curator.core.paths import display
from curator.core.progress import Event
from curator.ingest.fetch import FetchError, PoliteClient

CATALOG_NAME = "catalog.parquet"
JOURNAL_NAME = ".catalog.journal.jsonl"
#: The `kind` in the `atelier` key-value metadata of the catalog's Parquet footer: how a catalog is recognised.
CATALOG_KIND = "ingest-catalog"
#: Suffix of the temporary files ingest writes before renaming: only files named `.*{PART_SUFFIX}` are ever removed.
PART_SUFFIX = ".atelier-part"
CATALOG_SCHEMA: dict[str, pl.DataType] = {
    "path": pl.String, "label": pl.String, "group": pl.String, "source": pl.String, "source_id": pl.String,
    "url": pl.String, "title": pl.String, "artist": pl.String, "year": pl.String, "style": pl.String,
    "genre": pl.String, "tags": pl.List(pl.String), "sha256": pl.String, "status": pl.String, "error": pl.String,
    "source_id_escaped": pl.Boolean,
}
#: Columns every catalog has had since the first version; the others are filled in when an older catalog lacks them.
REQUIRED_COLUMNS = ("path", "label", "group", "source", "source_id", "sha256", "status", "error")
STATUSES = ("ok", "failed")
MAX_NAME_BYTES = 120
#: At most this many UTF-8 bytes in a kept file name, `~N` suffix included, so that its part file
#: (`.NAME.atelier-part`) still fits the 255-byte name limit of common file systems.
MAX_KEPT_BYTES = 255 - len(".") - len(PART_SUFFIX)
_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "MPO": ".jpg"}


@dataclass
class Item:
    """One image a source offers: where its bytes come from (url, inline data or a local file) and what it is.

    `source_id` is text; for a local file whose name is not valid UTF-8 it is the escaped name
    (`curator.core.paths.to_text`) and `escaped` is true. A local file is read through `policy` (regular files only,
    size cap, symbolic links kept inside the source folder); without one, links may not leave the file's own folder.
    `name` is the file name the source gives the image (a local file's name, a parquet image's path); it is kept as
    the landed name (see the module docstring), and items without one are named from title and id.
    """

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
    escaped: bool = False
    policy: ReadPolicy | None = None
    name: str | None = None


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


def storable(text: object) -> str | None:
    """`text` as a str that UTF-8 writers (Parquet, JSON) accept: unchanged when it already is; a file name with
    surrogate-escaped bytes as `curator.core.paths.to_text` escapes it; any other lone surrogate as `\\udXXX`."""
    return None if text is None else display(str(text))


def safe_name(text: str | None, fallback: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """A file or folder name from untrusted text: valid UTF-8, NFKC-normalised, no separators, no `..`, no control or
    shell-hostile characters, no leading dots, at most `max_bytes` UTF-8 bytes; from `fallback` when nothing is
    left."""
    return _clean_name(text, max_bytes) or _clean_name(fallback, max_bytes) or "item"


def _clean_name(text: str | None, max_bytes: int) -> str:
    text = unicodedata.normalize("NFKC", storable(text) or "")
    text = re.sub(r"[\x00-\x1f\x7f/\\:*?\"<>|]+", " ", text)
    text = re.sub(r"\.{2,}", ".", text)
    text = re.sub(r"\s+", " ", text).strip(" .-_")
    while len(text.encode("utf-8")) > max_bytes:
        text = text[:-1]
    return text.rstrip(" .")


_MUST_ESCAPE = re.compile(r"[\x00-\x1f\x7f/\\\ud800-\udfff]")


def _percent(match: re.Match) -> str:
    """`%XX` for each byte of one character that cannot stand in a kept name (a surrogate-escaped byte as itself)."""
    char = match.group(0)
    if "\udc80" <= char <= "\udcff":
        return f"%{ord(char) - 0xDC00:02X}"
    return "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))


def kept_name(name: str) -> str:
    """A source's file name as ingest lands it, changed only where it must be: `/`, `\\`, NUL, the other control
    characters and bytes that are not valid UTF-8 (surrogate-escaped, PEP 383) become `%XX`; a leading `.` becomes
    `%2E`, so that no kept name is hidden, `.`, `..` or one of ingest's own part files. Everything else (spaces,
    accents, `<`, `%`, case) is left alone; "" stays "" (the caller falls back to title and id)."""
    text = _MUST_ESCAPE.sub(_percent, name)
    return "%2E" + text[1:] if text.startswith(".") else text


def _with_suffix(name: str, n: int) -> str:
    """`name`, or for n > 1 `stem~n.ext`; the stem is cut (never the extension) to keep `MAX_KEPT_BYTES`."""
    stem, ext = os.path.splitext(name)
    tail = f"{'' if n == 1 else f'~{n}'}{ext}"
    room = MAX_KEPT_BYTES - len(tail.encode("utf-8"))
    while len(stem.encode("utf-8")) > room:
        stem = stem[:-1]
    return f"{stem}{tail}"


def _is_variant(name: str, wanted: str) -> bool:
    """Whether `name` is `wanted` or one of its `~N` variants (`_with_suffix`)."""
    match = re.search(r"~(\d+)(\.[^.]*)?$", name)
    return name == wanted or (match is not None and _with_suffix(wanted, int(match.group(1))) == name)


def wanted_name(item: Item, ext: str) -> str:
    """The name `item` asks for in its label folder, before any clash suffix: its kept source name (with the
    extension its bytes call for only when the name has no image extension), else `<title>__<id><ext>`."""
    kept = kept_name(item.name) if item.name else ""
    if kept:
        return kept if os.path.splitext(kept)[1].lower() in IMAGE_EXTENSIONS else f"{kept}{ext}"
    stem = safe_name(item.title, item.source_id, MAX_NAME_BYTES - 40)
    sid = safe_name(item.source_id, "id", 36)
    return f"{stem if stem == sid else f'{stem}__{sid}'}{ext}"


def _key(source: str, source_id: str, escaped: bool | None) -> tuple[str, str, bool]:
    return storable(source) or "", storable(source_id) or "", bool(escaped)


def _row_key(row: dict) -> tuple[str, str, bool]:
    return _key(row["source"], row["source_id"], row.get("source_id_escaped"))


def _item_key(item: Item) -> tuple[str, str, bool]:
    return _key(item.source, item.source_id, item.escaped)


def _row(item: Item, path: str | None, sha: str | None, status: str, error: str | None) -> dict:
    s = storable
    return {"path": path, "label": s(item.label), "group": s(item.group), "source": s(item.source),
            "source_id": s(item.source_id), "url": s(item.url), "title": s(item.title), "artist": s(item.artist),
            "year": s(item.year), "style": s(item.style), "genre": s(item.genre),
            "tags": [s(t) for t in item.tags if t is not None], "sha256": sha, "status": status, "error": s(error),
            "source_id_escaped": bool(item.escaped)}


# ------------------------------------------------------------------------------------------------------ catalog file


def _is_regular(path: Path) -> bool:
    """True for a regular file that is not a symbolic link (never opens it)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def catalog_origin(path: Path) -> str:
    """Whose `path` (a catalog.parquet) is: "atelier", "foreign" or "unreadable".

    A catalog is atelier's when its Parquet footer carries the key `atelier` whose JSON value has
    `kind = "ingest-catalog"` (written by `run_ingest`), or, for catalogs of earlier versions, the `atelier` key
    without a kind on a file that has `source` and `source_id` columns. A symbolic link or other non-regular file is
    foreign; a regular file that is not Parquet at all is unreadable. Only the footer is read.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not _is_regular(path):
        return "foreign"
    try:
        with open(path, "rb") as fh:  # a file object: arrow refuses paths that are not valid UTF-8
            footer = pq.read_metadata(fh)
        names = footer.schema.to_arrow_schema().names
    except (OSError, ValueError, pa.ArrowException):
        return "unreadable"
    try:
        meta = json.loads((footer.metadata or {}).get(b"atelier", b"null"))
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        return "foreign"
    if meta.get("kind") == CATALOG_KIND:
        return "atelier"
    if meta.get("kind") is None and {"source", "source_id"} <= set(names):
        return "atelier"
    return "foreign"


def _load_catalog(path: Path) -> pl.DataFrame:
    """Read an atelier catalog and check it: the required columns with text types, known statuses, keys present.
    Missing newer columns are filled in; anything wrong is a one-line `UsageError`."""
    try:
        with open(path, "rb") as fh:  # a file object: polars refuses paths that are not valid UTF-8
            frame = pl.read_parquet(fh)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise UsageError(f"{path} is unreadable ({_first_line(exc)}); move it away to start over") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    wrong = [f"{c} is {frame.schema[c]}, expected {CATALOG_SCHEMA[c]}" for c in CATALOG_SCHEMA
             if c in frame.columns and frame.schema[c] not in (CATALOG_SCHEMA[c], pl.Null)]
    if missing or wrong:
        what = f"lacks column(s) {', '.join(missing)}" if missing else f"has wrong column types: {'; '.join(wrong)}"
        raise UsageError(f"{path} is an atelier ingest catalog that {what}; move it away to start over")
    frame = frame.with_columns(pl.lit(None, dtype=t).alias(c) for c, t in CATALOG_SCHEMA.items()
                               if c not in frame.columns or frame.schema[c] == pl.Null)
    frame = frame.select(list(CATALOG_SCHEMA)).with_columns(pl.col("source_id_escaped").fill_null(False))
    bad = frame.filter(~pl.col("status").is_in(STATUSES) | pl.col("status").is_null())["status"].unique().to_list()
    if bad:
        raise UsageError(f"{path} has unknown status value(s) {bad}; expected {', '.join(STATUSES)}")
    if frame["source"].null_count() or frame["source_id"].null_count():
        raise UsageError(f"{path} has rows without source or source_id; move it away to start over")
    return frame


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def read_catalog(root: Path) -> pl.DataFrame | None:
    """`ROOT/catalog.parquet` when an ingest made ROOT, else None (so that the caller treats any other file of that
    name as an ordinary file).

    The file counts as atelier's when `catalog_origin` says so, or when ROOT carries an ingest marker. A catalog
    that is atelier's but unreadable or malformed (wrong column types, unknown statuses) is a one-line `UsageError`.
    The columns are those of `CATALOG_SCHEMA` (older catalogs are filled in: `source_id_escaped` false).
    """
    path = Path(root) / CATALOG_NAME
    if not _is_regular(path):
        return None
    origin = catalog_origin(path)
    if origin == "foreign" or (origin == "unreadable" and marker_kind(Path(root)) != "ingest"):
        return None
    return _load_catalog(path)


def _journal_row(line: bytes) -> dict | None:
    """One journal line as a catalog row, or None for a torn or malformed line."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(row, dict) or row.get("status") not in STATUSES:
        return None
    out = {}
    for column, dtype in CATALOG_SCHEMA.items():
        value = row.get(column)
        if column == "tags":
            value = value or []
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                return None
        elif column == "source_id_escaped":
            value = bool(value)
        elif value is not None and not isinstance(value, str):
            return None
        out[column] = value
    if out["source"] is None or out["source_id"] is None:
        return None
    return out


class Catalog:
    """The catalog of one output tree: rows by (source, source_id, escaped), journalled as they arrive."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / CATALOG_NAME
        self.journal = self.out / JOURNAL_NAME
        self._lock = threading.Lock()
        self.rows: dict[tuple[str, str, bool], dict] = {}
        check_catalog_slot(self.out)
        if self.path.exists():
            for row in _load_catalog(self.path).iter_rows(named=True):
                self.rows[_row_key(row)] = row
        if _is_regular(self.journal):
            with open(self.journal, "rb") as fh:
                for line in fh:
                    row = _journal_row(line)  # None: a torn last line from a killed run
                    if row is not None:
                        self.rows[_row_key(row)] = row
        self.compact()

    def add(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            with open(self.journal, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            self.rows[_row_key(row)] = row

    def frame(self) -> pl.DataFrame:
        rows = sorted(self.rows.values(), key=lambda r: (r["source"], r["label"] or "", r["source_id"]))
        return pl.DataFrame(rows, schema=CATALOG_SCHEMA)

    def compact(self) -> None:
        """Fold the journal into catalog.parquet (atomically, marked as atelier's), then drop the journal."""
        with self._lock:
            if not self.rows and not self.path.exists():
                return
            write_catalog(self.frame(), self.path)
            self.journal.unlink(missing_ok=True)

    def done(self, item: Item) -> bool:
        """Whether `item` is already in the tree, verified: an ok row whose file still has its sha256."""
        row = self.rows.get(_item_key(item))
        if not row or row["status"] != "ok" or not row["path"] or ".." in Path(row["path"]).parts:
            return False
        target = self.out / row["path"]
        return _is_regular(target) and file_sha256(target) == row["sha256"]


def write_catalog(frame: pl.DataFrame, path: Path) -> Path:
    """Write a catalog atomically with atelier's key-value metadata (`atelier` = {"kind": "ingest-catalog", ...}),
    which is how `catalog_origin` recognises it. Through a file object, so any folder name the OS allows works."""
    kv = {"atelier": json.dumps({"kind": CATALOG_KIND, "schema_version": SCHEMA_VERSION}, sort_keys=True)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            frame.write_parquet(fh, metadata=kv)
    return path


def check_catalog_slot(out: Path) -> None:
    """Refuse (one line) an OUT whose catalog.parquet atelier did not write or cannot read: it is never replaced."""
    path = Path(out) / CATALOG_NAME
    if not os.path.lexists(path):
        return
    origin = catalog_origin(path)
    if origin == "foreign":
        raise UsageError(f"{path} was not written by atelier (no atelier ingest metadata); move it away or choose "
                         f"another --out")
    if origin == "unreadable":
        raise UsageError(f"{path} is not a readable Parquet file; move it away or choose another --out")


def _earlier_ingest(out: Path) -> bool:
    """Whether an unmarked OUT is an ingest tree of an earlier atelier version: its catalog.parquet is atelier's, or
    it has a journal whose first line is a catalog row."""
    if catalog_origin(out / CATALOG_NAME) == "atelier":
        return True
    journal = out / JOURNAL_NAME
    if not _is_regular(journal):
        return False
    with open(journal, "rb") as fh:
        return _journal_row(fh.readline(1 << 20)) is not None


def prepare_out(out: Path) -> Path:
    """Claim OUT for ingest (see the module docstring) and remove the part files a killed run left there."""
    out = Path(out)
    if out.is_dir():
        check_catalog_slot(out)
    claim(out, "ingest", "--out", adopt=out.is_dir() and _earlier_ingest(out))
    _remove_parts(out)
    return out


def _remove_parts(out: Path) -> None:
    """Delete `.*.atelier-part` regular files in OUT and its label folders (the only places ingest writes them)."""
    folders = [out] + [Path(e.path) for e in os.scandir(out) if e.is_dir(follow_symlinks=False)]
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(PART_SUFFIX) and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------ writing


def _same_file(path: Path, sha: str, size: int) -> bool:
    """True when `path` is a regular file (not a link) of `size` bytes with content hash `sha`."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == size and file_sha256(path) == sha


class Writer:
    """Names and places verified image bytes in the tree: a part file then rename; never overwrites another item's
    file.

    Names are handed out in listing order (`seq`, 0, 1, 2, ... for the items of one run, each taking exactly one turn
    with `place` or `skip`), so which of two clashing items gets the plain name does not depend on which download
    finished first. Only the naming waits for its turn; the writes themselves run in parallel, each to a name no
    other item holds. Names the catalog's rows hold are taken (by their item) from the start.
    """

    def __init__(self, out: Path, taken: Iterable[tuple[str, tuple[str, str, bool]]] = (), link: bool = True):
        self.out = Path(out)
        self.link = link
        # a file system that ignores case (and Unicode normalisation) makes `A.jpg` and `a.jpg` one file
        self._fold = os.path.lexists(self.out / MARKER.upper()) and MARKER != MARKER.upper()
        self._taken: dict[str, tuple[str, str, bool]] = {}
        self._held: dict[tuple[str, str, bool], str] = {}
        for rel, key in taken:
            self._taken[self._fold_key(rel)] = key
            self._held[key] = rel
        self._next_n: dict[str, int] = {}
        self._folders: set[str] = set()
        self._turn = 0
        self._cond = threading.Condition()

    def _fold_key(self, rel: str) -> str:
        return unicodedata.normalize("NFD", rel).casefold() if self._fold else rel

    @contextmanager
    def _turn_of(self, seq: int) -> Iterator[None]:
        """Run the block when every item listed before `seq` has had its turn; then let `seq + 1` go."""
        with self._cond:
            self._cond.wait_for(lambda: self._turn == seq)
        try:
            yield
        finally:
            with self._cond:
                self._turn = seq + 1
                self._cond.notify_all()

    def skip(self, seq: int) -> None:
        """Item `seq` lands nothing (it failed): let the next one be named."""
        with self._turn_of(seq):
            pass

    def place(self, seq: int, item: Item, data: bytes, sha: str, ext: str, link_from: Path | None = None) -> str:
        """Name the item's file in its turn (see `_claim`), write it, and return its path relative to OUT.
        `link_from`, a local file whose bytes are `data`, is hard-linked instead of copied when linking is on and it
        still holds exactly those bytes."""
        with self._turn_of(seq):
            rel, write = self._claim(item, sha, len(data), ext)
        if write:
            target = self.out / rel
            part = target.with_name(f".{target.name}{PART_SUFFIX}")
            self._land(part, data, sha, link_from)
            os.replace(part, target)
        return rel

    def _claim(self, item: Item, sha: str, size: int, ext: str) -> tuple[str, bool]:
        """(path relative to OUT, whether it must be written) for `item`: its wanted name, or the first `~N` variant
        that no other item holds and no other content occupies. A file already there with exactly these bytes that
        no item holds (a killed run landed it before its row was journalled) is adopted; the item's own earlier file
        (its content changed) is replaced."""
        label = safe_name(item.label, "unlabelled")
        folder = self.out / label
        if label not in self._folders:
            if folder.is_symlink() or (os.path.lexists(folder) and not folder.is_dir()):
                raise OSError(f"{label} in the output folder is not a folder atelier made")
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(label)
        wanted = wanted_name(item, ext)
        key, mine = _item_key(item), f"{label}/{wanted}"
        own = self._held.get(key)
        if own is not None and own.startswith(f"{label}/") and _is_variant(own[len(label) + 1:], wanted):
            return own, True  # the item's own file from an earlier run, whose content no longer matched
        n = 1
        while True:
            rel = f"{label}/{_with_suffix(wanted, n)}"
            holder = self._taken.get(self._fold_key(rel))
            if holder == key:
                break  # this item's own name from an earlier run
            if holder is None:
                if not os.path.lexists(self.out / rel):
                    break
                if _same_file(self.out / rel, sha, size):
                    self._taken[self._fold_key(rel)] = key
                    self._held[key] = rel
                    return rel, False
            n = self._next_n.get(mine, n) + 1 if n == 1 else n + 1
        self._next_n[mine] = n
        self._taken[self._fold_key(rel)] = key
        self._held[key] = rel
        return rel, True

    def _land(self, part: Path, data: bytes, sha: str, link_from: Path | None) -> None:
        part.unlink(missing_ok=True)
        if link_from is not None and self.link:
            try:
                os.link(link_from, part)
                if _same_file(part, sha, len(data)):
                    return  # a hard link keeps the source's permissions: chmod would change the user's file
                part.unlink()
            except OSError:
                part.unlink(missing_ok=True)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fchmod(fh.fileno(), file_mode())
                os.fsync(fh.fileno())
        except BaseException:
            part.unlink(missing_ok=True)
            raise


def check_image(data: bytes, name: str) -> tuple[str | None, str | None]:
    """(file extension, None) when `data` is an image the safe loader accepts, else (None, the reason)."""
    if not data:
        return None, "empty response"
    decoded = decode_bytes(Path(name), data)
    if not decoded.info.ok:
        return None, decoded.info.reason or "not a readable image"
    return _EXT.get(decoded.info.format or "", ".img"), None


def _read_local(item: Item) -> tuple[bytes | None, str | None]:
    """A local item's bytes through its read policy, or the reason they were not read."""
    policy = item.policy or ReadPolicy(root=item.local.parent)
    data, row = read_source(item.local, policy)
    if row is not None:
        reason = row.info.reason or "not read"
        return None, "file is missing" if reason == "file disappeared while reading" else reason
    return data, None


def run_ingest(items: Iterable[Item], out: Path, client: PoliteClient | None = None, *, concurrency: int = 4,
               link: bool = True, events: Event | None = None) -> IngestResult:
    """Fetch, verify and place every item; one catalog row each (see the module docstring). OUT is claimed first
    (`prepare_out`); a foreign catalog, a folder of someone else's files or a full disk is a one-line `UsageError`."""
    if not isinstance(concurrency, int) or concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {concurrency!r}")
    emit = events or (lambda kind, info: None)
    out = prepare_out(Path(out))
    try:
        return _ingest(items, out, client, concurrency, link, emit)
    except OSError as exc:
        raise UsageError(f"cannot write to --out {out}: {exc.strerror or _first_line(exc)}") from None


def _fetch_checked(item: Item, client: PoliteClient | None) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, file extension, None) for an item whose bytes are an image the safe loader accepts, else
    (bytes or None, None, why not)."""
    data, error = item.data, item.error
    if error is None:
        try:
            if item.local is not None:
                data, error = _read_local(item)
            elif data is None:
                if client is None or not item.url:
                    raise FetchError("no way to fetch this item")
                data = client.get_bytes(item.url, headers=item.headers or None)
        except FetchError as exc:
            error = str(exc)
    if error is not None:
        return data, None, error
    ext, error = check_image(data, item.url or str(item.local or item.source_id))
    return data, ext, error


def _ingest(items: Iterable[Item], out: Path, client: PoliteClient | None, concurrency: int, link: bool,
            emit: Event) -> IngestResult:
    catalog = Catalog(out)
    writer = Writer(out, ((row["path"], key) for key, row in catalog.rows.items()
                          if row["status"] == "ok" and row["path"]), link)
    counts = {"added": 0, "skipped": 0, "failed": 0}
    by_label: dict[str, int] = {}
    failures: dict[str, int] = {}
    lock = threading.Lock()

    def handle(item: Item, seq: int) -> None:
        try:
            data, ext, error = _fetch_checked(item, client)
        except BaseException:
            writer.skip(seq)  # the items listed after this one are still named
            raise
        status, path, sha = "failed", None, None
        if error is None:
            sha = hashlib.sha256(data).hexdigest()
            try:
                path = writer.place(seq, item, data, sha, ext, link_from=item.local)
                status = "ok"
            except OSError as exc:
                error = f"cannot write: {exc.strerror or exc}"
        else:
            writer.skip(seq)
        catalog.add(_row(item, path, sha if status == "ok" else None, status, error))
        label = storable(item.label)
        with lock:
            if status == "ok":
                counts["added"] += 1
                by_label[label or ""] = by_label.get(label or "", 0) + 1
            else:
                counts["failed"] += 1
                kind = re.sub(r"\d[\d,]*", "N", (storable(error) or "?").split(" from ")[0])[:60]
                failures[kind] = failures.get(kind, 0) + 1
        emit("item", {"status": status, "label": label, "error": storable(error),
                      "bytes": len(data) if data is not None else 0})

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending: set[Future] = set()
        seq = 0  # listing order of the items this run lands: the order names are handed out in
        try:
            for item in _dedupe(items):
                if catalog.done(item):
                    counts["skipped"] += 1
                    emit("item", {"status": "skipped", "label": storable(item.label), "error": None, "bytes": 0})
                    continue
                pending.add(pool.submit(handle, item, seq))
                seq += 1
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
    """A listing that offers one (source, source_id) twice (overlapping pages) yields it once; a source that fails
    to read on is a one-line `UsageError`."""
    seen: set[tuple[str, str, bool]] = set()
    iterator = iter(items)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except OSError as exc:  # the source's listing, not OUT: a CSV or parquet that cannot be read on
            raise UsageError(f"cannot read the source: {exc.strerror or _first_line(exc)}") from None
        key = _item_key(item)
        if key not in seen:
            seen.add(key)
            yield item
