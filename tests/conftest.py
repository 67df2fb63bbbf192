"""Shared fixtures: real paintings from data/sample, and odd or broken files written by the tests themselves."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
TEST_DATA = Path(__file__).resolve().parent / "data"


def sample_paintings(n: int = 4) -> list[Path]:
    """The first `n` paintings of the public-domain sample, one style after another."""
    paths = sorted(SAMPLE.rglob("*.jpg"))
    styles = sorted({p.parent.name for p in paths})
    picked = []
    for i in range(n):
        style_paths = [p for p in paths if p.parent.name == styles[i % len(styles)]]
        picked.append(style_paths[i // len(styles)])
    return picked


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries no pixel data (a cheap decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


#: file name -> (status, reason fragment or None) expected from the safe loader
ODD_FILES = {
    "Baroque/good.jpg": ("ok", None),
    "Baroque/cmyk.jpg": ("ok", None),
    "Baroque/gray.png": ("ok", None),
    "Baroque/sixteen_bit.png": ("ok", None),
    "Baroque/palette_alpha.png": ("ok", None),
    "Baroque/rgba.png": ("ok", None),
    "Baroque/animated.gif": ("ok", None),
    "Baroque/animated.webp": ("ok", None),
    "Baroque/exif_rotated.jpg": ("ok", None),
    "Baroque/UPPER CASE.JPG": ("ok", None),
    "Baroque/名前 with space.jpeg": ("ok", None),
    "Rococo/truncated.jpg": ("corrupt", "truncated JPEG"),
    "Rococo/empty.jpg": ("corrupt", "empty file"),
    "Rococo/page.jpg": ("corrupt", "HTML page saved under an image name"),
    "Rococo/notes_as.png": ("corrupt", "text file saved under an image name"),
    "Rococo/random.png": ("corrupt", "not a readable image"),
    "Rococo/bomb.png": ("corrupt", "decompression bomb"),
    "Rococo/tiny.png": ("corrupt", "too small"),
    "Rococo/notes.txt": ("ignored", "not an image file (.txt)"),
    "Rococo/.DS_Store": ("ignored", "not an image file"),
}


def write_odd_tree(root: Path) -> dict[str, tuple[str, str | None]]:
    """Write every file of ODD_FILES under `root` from real paintings; returns ODD_FILES."""
    src = sample_paintings(3)
    painting = Image.open(src[0]).convert("RGB")
    (root / "Baroque").mkdir(parents=True)
    (root / "Rococo").mkdir(parents=True)
    w = lambda name: root / name
    w("Baroque/good.jpg").write_bytes(src[1].read_bytes())
    painting.convert("CMYK").save(w("Baroque/cmyk.jpg"), quality=90)
    painting.convert("L").save(w("Baroque/gray.png"))
    arr16 = (np.asarray(painting.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(arr16).save(w("Baroque/sixteen_bit.png"))
    pal = painting.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.save(w("Baroque/palette_alpha.png"), transparency=0)
    rgba = painting.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(w("Baroque/rgba.png"))
    frames = [painting, painting.rotate(90)]
    frames[0].save(w("Baroque/animated.gif"), save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(w("Baroque/animated.webp"), save_all=True, append_images=frames[1:], duration=100)
    wide = painting.resize((320, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    wide.save(w("Baroque/exif_rotated.jpg"), exif=exif)
    w("Baroque/UPPER CASE.JPG").write_bytes(src[2].read_bytes())
    painting.save(w("Baroque/名前 with space.jpeg"), quality=85)
    data = src[1].read_bytes()
    w("Rococo/truncated.jpg").write_bytes(data[: int(len(data) * 0.4)])
    w("Rococo/empty.jpg").write_bytes(b"")
    w("Rococo/page.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    w("Rococo/notes_as.png").write_text("these are my notes about the painting\n" * 5)
    w("Rococo/random.png").write_bytes(np.random.default_rng(0).bytes(4096))
    w("Rococo/bomb.png").write_bytes(png_header_only(20000, 20000))
    painting.resize((8, 8)).save(w("Rococo/tiny.png"))
    w("Rococo/notes.txt").write_text("not an image")
    w("Rococo/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    return ODD_FILES


@pytest.fixture
def odd_tree(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "raw"
    expected = write_odd_tree(root)
    return root, expected


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    """Eight real paintings, two per class folder."""
    root = tmp_path / "paintings"
    for path in sample_paintings(8):
        dest = root / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
    return root


def tree_checksums(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root with its size and content hash (symlinks by their target string)."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = (0, os.readlink(p))
            elif p.is_file():
                out[str(p)] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


MARKER = b"SECRET-MARKER-7f3a"


def write_hostile_tree(base: Path) -> tuple[Path, dict[str, str]]:
    """A root with what a hostile but fair user leaves in a folder, beside an `outside` folder whose files carry
    MARKER: real paintings (one under a name that is not UTF-8), a FIFO and a socket named like images, symbolic links
    to an outside file, an outside folder and /dev/zero, a link inside the root, and a large sparse non-image.
    Returns the root and, by path text (as stored), the reason fragment each non-ok file must get."""
    import shutil
    import socket
    import tempfile

    root, outside = base / "root", base / "outside"
    for folder in (root / "Baroque", root / "Rococo", outside):
        folder.mkdir(parents=True)
    paintings = sample_paintings(8)
    for i, painting in enumerate(paintings[:6]):
        label = "Baroque" if i < 3 else "Rococo"
        (root / label / f"p{i}_{painting.name}").write_bytes(painting.read_bytes())
    with open(os.path.join(os.fsencode(root / "Rococo"), b"caf\xe9_non-utf8.jpg"), "wb") as fh:
        fh.write(paintings[6].read_bytes())
    (outside / "secret.txt").write_bytes(b"hello " + MARKER)
    (outside / "secret.jpg").write_bytes(paintings[7].read_bytes() + MARKER)
    os.mkfifo(root / "Baroque" / "fifo.jpg")
    short = tempfile.mkdtemp(prefix="sock", dir="/tmp")  # socket paths are limited to ~108 bytes
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(os.path.join(short, "s"))
    finally:
        sock.close()
    shutil.move(os.path.join(short, "s"), root / "Baroque" / "socket.jpg")
    os.rmdir(short)
    os.symlink(outside / "secret.txt", root / "Baroque" / "to_text.jpg")
    os.symlink(outside / "secret.jpg", root / "Baroque" / "to_image.jpg")
    os.symlink(outside, root / "Rococo" / "outside_folder")
    os.symlink("/dev/zero", root / "Baroque" / "zero.jpg")
    os.symlink(f"p0_{paintings[0].name}", root / "Baroque" / "inside_link.jpg")
    with open(root / "Rococo" / "video.mp4", "wb") as fh:
        fh.truncate(64 << 20)
    reasons = {
        "Baroque/fifo.jpg": "not a regular file: a FIFO",
        "Baroque/socket.jpg": "not a regular file: a socket",
        "Baroque/to_text.jpg": "outside the scanned folder",
        "Baroque/to_image.jpg": "outside the scanned folder",
        "Rococo/outside_folder": "outside the scanned folder",
        "Baroque/zero.jpg": "symbolic link to /dev/zero",
        "Rococo/video.mp4": "not an image file (.mp4)",
    }
    return root, reasons


@pytest.fixture
def hostile_tree(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return write_hostile_tree(tmp_path)


def files_containing(folder: Path, needle: bytes) -> list[Path]:
    """Every regular file under `folder` whose bytes contain `needle`."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(path)
    return found


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module: 2 CPUs, no dashboard; the engine reuses this connection."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'atelier[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
