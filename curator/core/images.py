"""Safe image loading: the one place in atelier that decodes a file.

Every regular file under a root becomes exactly one `FileInfo`: `ok` images, `corrupt` image files (with a reason a
person understands), and `ignored` files that are not images at all. Valid but unusual images (CMYK, 16-bit,
palette with transparency, RGBA, animated, EXIF-rotated) are converted to plain RGB rather than rejected.
Source files are only ever read.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from curator.core.settings import DEFAULT_MAX_BYTES  # re-exported; defined where `--help` can read it cheaply

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm"}
)
#: Images with more pixels than this are rejected as decompression bombs (Pillow's own hard limit, 2 x 89.5 MP).
MAX_PIXELS = 178_956_970
#: Images whose shorter side is below this many pixels carry too little to learn from and are rejected.
MIN_SIDE = 32

STATUS_OK = "ok"
STATUS_CORRUPT = "corrupt"
STATUS_IGNORED = "ignored"

_DECODE_ERRORS = (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, EOFError, ValueError)
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


@dataclass(frozen=True)
class FileInfo:
    """What one file is: its identity (hash, size), its geometry and the verdict of the safe loader."""

    path: Path
    sha256: str | None
    bytes: int
    width: int | None
    height: int | None
    format: str | None
    mode: str | None
    status: str
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


@dataclass(frozen=True)
class Decoded:
    """A file's `FileInfo` and, when it is ok, its pixels as an RGB image (upright, alpha composited on white)."""

    info: FileInfo
    image: Image.Image | None


def natural_key(text: str) -> list:
    """Sort key that orders 'img2' before 'img10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def scan(root: Path, exclude: Iterable[Path] = (), follow_symlinks: bool = False) -> list[Path]:
    """Every file under `root` (see `iter_files`), naturally sorted, as a list."""
    return list(iter_files(root, exclude, follow_symlinks))


def inside(path: Path | str, root: Path | str) -> bool:
    """True when `path`, with every symbolic link resolved, lies under `root` (resolved too)."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def iter_files(root: Path, exclude: Iterable[Path] = (), follow_symlinks: bool = False) -> Iterator[Path]:
    """Every entry under `root` that is not a folder, lazily, in natural order of each folder's entries (folders
    sorted as `name/`, so the order matches `scan`'s for ordinary names).

    Symbolic links to folders are followed once (loops cut) when they stay inside `root`, or with
    `follow_symlinks`; a link that leaves `root` is listed as an entry of its own, so that it becomes a row saying
    where it points rather than bringing outside files in. Broken links, FIFOs, sockets and devices are listed too
    (the loader turns them into rows without reading them). Memory is bounded by the largest single folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    excluded = {os.path.realpath(p) for p in exclude}
    seen: set[str] = set()

    def walk(folder: Path) -> Iterator[Path]:
        real = os.path.realpath(folder)
        if real in seen or real in excluded:
            return
        seen.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        keyed = []
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                if is_dir and entry.is_symlink() and not follow_symlinks and not inside(entry.path, root):
                    is_dir = False
            except OSError:
                is_dir = False
            keyed.append((natural_key(entry.name + ("/" if is_dir else "")), is_dir, entry.name))
        keyed.sort()
        for _, is_dir, name in keyed:
            if is_dir:
                yield from walk(folder / name)
            else:
                yield folder / name

    yield from walk(root)


def _sniff(head: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def looks_like_image(path: Path) -> bool:
    """Cheap pre-check: an image extension, or image magic bytes at the start of a regular file (FIFOs and devices
    are never opened for reading)."""
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb", buffering=0) as fh:
            return stat.S_ISREG(os.fstat(fd).st_mode) and _sniff(fh.read(16)) is not None
    except OSError:
        return False


def _text_kind(head: bytes) -> str | None:
    """'HTML page' or 'text file' when the bytes are plainly text, else None."""
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<svg")):
        return "HTML page" if b"html" in stripped[:64] else "XML/SVG document"
    if not head:
        return None
    sample = head[:512]
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in sample)
    return "text file" if printable / len(sample) > 0.95 else None


def _corrupt(path: Path, sha: str | None, size: int, reason: str, **geometry) -> Decoded:
    info = FileInfo(
        path=path,
        sha256=sha,
        bytes=size,
        width=geometry.get("width"),
        height=geometry.get("height"),
        format=geometry.get("format"),
        mode=geometry.get("mode"),
        status=STATUS_CORRUPT,
        reason=reason,
    )
    return Decoded(info, None)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: high bit depths scaled, transparency composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F" or arr.max(initial=0) > 65535:
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        elif arr.max(initial=0) > 255:
            arr = arr / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    width, height = im.size
    try:
        orientation = im.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def decode_bytes(path: Path, data: bytes, draft_size: tuple[int, int] | None = None) -> Decoded:
    """Judge and decode one file's bytes. `draft_size` lets JPEGs decode straight to near that size (never below)."""
    size = len(data)
    sha = hashlib.sha256(data).hexdigest()
    ext = path.suffix.lower()
    head = data[:1024]
    sniffed = _sniff(head)
    looks_like_image = ext in IMAGE_EXTENSIONS or sniffed is not None
    if not looks_like_image:
        shown = ext or path.name
        return Decoded(
            FileInfo(path, sha, size, None, None, None, None, STATUS_IGNORED, f"not an image file ({shown})"), None
        )
    if size == 0:
        return _corrupt(path, sha, size, "empty file (0 bytes)")
    if sniffed is None:
        kind = _text_kind(head)
        if kind is not None:
            start = head[:24].decode("utf-8", "replace").strip().replace("\n", " ")
            return _corrupt(path, sha, size, f"{kind} saved under an image name (starts with {start!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt, mode = im.format, im.mode
            width, height = _oriented_size(im)
            geometry = dict(width=width, height=height, format=fmt, mode=mode)
            if width * height > MAX_PIXELS:
                return _corrupt(
                    path, sha, size,
                    f"decompression bomb: {width}x{height} = {width * height / 1e6:.0f} MP exceeds the limit of "
                    f"{MAX_PIXELS / 1e6:.0f} MP",
                    **geometry,
                )
            if min(width, height) < MIN_SIDE:
                return _corrupt(
                    path, sha, size, f"too small: {width}x{height} px, below the minimum side of {MIN_SIDE} px",
                    **geometry,
                )
            if draft_size is not None and fmt == "JPEG":
                im.draft(None, draft_size)
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        claimed = f"{int(found.group(1)) / 1e6:.0f} MP" if found else "the image"
        return _corrupt(path, sha, size, f"decompression bomb: {claimed} exceeds the limit of {MAX_PIXELS / 1e6:.0f} MP")
    except UnidentifiedImageError:
        what = f"{sniffed} header but unreadable data" if sniffed else "bytes of no known image format"
        return _corrupt(path, sha, size, f"not a readable image: {what}")
    except _DECODE_ERRORS as exc:
        fmt_name = locals().get("fmt") or sniffed or ext.lstrip(".").upper()
        message = str(exc) or type(exc).__name__
        geometry = locals().get("geometry", {})
        if "truncated" in message.lower() or isinstance(exc, EOFError):
            reason = f"truncated {fmt_name}: the file ends before the image data does ({size:,} bytes; {message})"
        else:
            reason = f"broken {fmt_name} data: {message}"
        return _corrupt(path, sha, size, reason, **geometry)
    info = FileInfo(path, sha, size, width, height, fmt, mode, STATUS_OK, None)
    return Decoded(info, rgb)


@dataclass(frozen=True)
class ReadPolicy:
    """What the loader may open: regular files only, at most `max_bytes`, and (unless `follow_symlinks`) nothing a
    symbolic link reaches outside `root`. Every command that reads a user's files reads through one of these."""

    root: Path | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    follow_symlinks: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            from curator.core.errors import UsageError

            raise UsageError(f"--max-bytes must be a positive number of bytes, got {self.max_bytes!r}")


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _ignored(path: Path, reason: str, size: int = 0) -> Decoded:
    return Decoded(FileInfo(path, None, size, None, None, None, None, STATUS_IGNORED, reason), None)


def _kind_of(mode: int) -> str | None:
    for test, name in _NOT_REGULAR:
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _outside_link(path: Path, policy: ReadPolicy) -> Decoded | None:
    """The row for a path that a symbolic link takes outside the policy's root, or None when it may be read."""
    if policy.follow_symlinks or policy.root is None or inside(path, policy.root):
        return None
    from curator.core.paths import display

    try:
        target = os.readlink(path) if os.path.islink(path) else os.path.realpath(path)
    except OSError:
        target = os.path.realpath(path)
    return _ignored(path, f"symbolic link to {display(str(target))} outside the scanned folder: not followed "
                          f"(--follow-symlinks reads it)")


def read_source(path: Path, policy: ReadPolicy = ReadPolicy()) -> tuple[bytes | None, Decoded | None]:
    """A file's bytes when it is a regular file, inside the policy, under the size cap and possibly an image;
    otherwise the row that says why it was not read: `(bytes, None)` or `(None, row)`.

    The file type is checked on the open descriptor (opened non-blocking, so a FIFO never hangs), non-images are
    judged from their first 16 bytes without reading the rest, and no read goes past `max_bytes`.
    """
    path = Path(path)
    row = _outside_link(path, policy)
    if row is not None:
        return None, row
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            return None, _ignored(path, "broken symbolic link (target missing)")
        return None, _corrupt(path, None, 0, "file disappeared while reading")
    except OSError as exc:
        try:
            kind = _kind_of(os.stat(path).st_mode)
        except OSError:
            kind = None
        if kind is not None:
            return None, _ignored(path, f"not a regular file: {kind}")
        return None, _corrupt(path, None, 0, f"cannot read file: {exc.strerror or exc}")
    with os.fdopen(fd, "rb", buffering=0) as fh:
        info = os.fstat(fd)
        kind = _kind_of(info.st_mode)
        if kind is not None:
            return None, _ignored(path, f"not a regular file: {kind}")
        size = info.st_size
        try:
            head = fh.read(16)
            if path.suffix.lower() not in IMAGE_EXTENSIONS and _sniff(head) is None:
                shown = path.suffix.lower() or path.name
                from curator.core.paths import display

                return None, _ignored(path, f"not an image file ({display(shown)})", size)
            if size > policy.max_bytes:
                return None, _corrupt(path, None, size, f"too large: {size:,} bytes exceeds --max-bytes "
                                                        f"{policy.max_bytes:,}")
            data = head + _read_bounded(fh, policy.max_bytes + 1 - len(head))
        except OSError as exc:
            return None, _corrupt(path, None, size, f"cannot read file: {exc.strerror or exc}")
    if len(data) > policy.max_bytes:
        return None, _corrupt(path, None, len(data), f"too large: more than --max-bytes {policy.max_bytes:,} "
                                                     f"bytes (the file grew while being read)")
    return data, None


def _read_bounded(fh, limit: int) -> bytes:
    chunks, left = [], limit
    while left > 0:
        chunk = fh.read(min(left, 1 << 22))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_image(path: Path, draft_size: tuple[int, int] | None = None, policy: ReadPolicy = ReadPolicy()) -> Decoded:
    """Read (through `policy`), hash, judge and decode one file; never raises for a bad file, returns a row instead."""
    data, row = read_source(path, policy)
    if row is not None:
        return row
    return decode_bytes(Path(path), data, draft_size)


def write_thumbnail(source: Path, target: Path, side: int) -> bool:
    """Make `target`, a WebP thumbnail of `source` at most `side` pixels a side, unless it exists already; False when
    `source` cannot be decoded. Written through a temporary file, so a half-written thumbnail is never served."""
    if target.exists():
        return True
    decoded = read_image(source)
    if decoded.image is None:
        return False
    image = decoded.image.copy()
    image.thumbnail((side, side))
    tmp = target.with_suffix(".tmp")
    image.save(tmp, "WEBP", quality=80)
    os.replace(tmp, target)
    return True
