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
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


def scan(root: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Every file under `root` (symlinks followed once, loops cut, `exclude` folders skipped), naturally sorted.

    Broken symbolic links are listed too, so that they become rows rather than vanish.
    """
    return list(iter_files(root, exclude))


def iter_files(root: Path, exclude: Iterable[Path] = ()) -> Iterator[Path]:
    """Every file under `root`, lazily, in natural order of each folder's entries (folders sorted as `name/`, so
    the order matches `scan`'s for ordinary names); symlinked folders followed once, loops cut.

    Memory is bounded by the largest single folder, not by the tree.
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
    """Cheap pre-check: an image extension, or image magic bytes at the start of the file."""
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as fh:
            return _sniff(fh.read(16)) is not None
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


def read_image(path: Path, draft_size: tuple[int, int] | None = None) -> Decoded:
    """Read, hash, judge and decode one file; never raises for a bad file, returns a corrupt row instead."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            return Decoded(
                FileInfo(path, None, 0, None, None, None, None, STATUS_IGNORED, "broken symbolic link (target missing)"),
                None,
            )
        return _corrupt(path, None, 0, "file disappeared while reading")
    except OSError as exc:
        return _corrupt(path, None, 0, f"cannot read file: {exc.strerror or exc}")
    return decode_bytes(path, data, draft_size)


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
