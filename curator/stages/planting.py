"""Planted copies with known truth, for measuring duplicate detection (tests and bench/dedup.py).

Five kinds of copy, as they occur in scraped art collections: byte copies, heavy JPEG re-encodes, downscaled
copies (JPEG or PNG), centre crops and colour-jittered copies.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageEnhance

KINDS = ("byte", "reencode", "resize", "crop", "jitter")


def make_copy(image: Image.Image, data: bytes, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """The bytes and extension of one planted copy of `image` (whose file bytes are `data`)."""
    buf = io.BytesIO()
    if kind == "byte":
        return data, ".jpg"
    if kind == "reencode":
        image.save(buf, "JPEG", quality=int(rng.integers(25, 46)))
        return buf.getvalue(), ".jpg"
    if kind == "resize":
        scale = rng.uniform(0.5, 0.7)
        small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            small.save(buf, "PNG")
            return buf.getvalue(), ".png"
        small.save(buf, "JPEG", quality=90)
        return buf.getvalue(), ".jpg"
    if kind == "crop":
        fx, fy = rng.uniform(0.05, 0.10, size=2)
        dx, dy = round(image.width * fx), round(image.height * fy)
        image.crop((dx, dy, image.width - dx, image.height - dy)).save(buf, "JPEG", quality=90)
        return buf.getvalue(), ".jpg"
    if kind == "jitter":
        out = ImageEnhance.Brightness(image).enhance(1 + rng.choice([-1, 1]) * rng.uniform(0.10, 0.15))
        out = ImageEnhance.Color(out).enhance(1 + rng.choice([-1, 1]) * rng.uniform(0.10, 0.15))
        out.save(buf, "JPEG", quality=90)
        return buf.getvalue(), ".jpg"
    raise ValueError(f"unknown copy kind {kind!r}; expected one of {', '.join(KINDS)}")


def plant_tree(source_root: Path, out_root: Path, originals: Sequence[Path], kinds: Sequence[str] = KINDS,
               seed: int = 0) -> pl.DataFrame:
    """Copy every image of `source_root` into `out_root`, then plant one copy of each of `originals` (cycling through
    `kinds`) beside it. Returns the truth: `copy`, `original` (paths relative to out_root) and `kind`."""
    rng = np.random.default_rng(seed)
    source_root, out_root = Path(source_root), Path(out_root)
    for path in sorted(source_root.rglob("*")):
        if path.is_file():
            dest = out_root / path.relative_to(source_root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    rows = []
    for i, original in enumerate(originals):
        kind = kinds[i % len(kinds)]
        rel = Path(original).relative_to(source_root)
        data = Path(original).read_bytes()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        copy_bytes, ext = make_copy(image, data, kind, rng)
        copy_rel = rel.with_name(f"{rel.stem}__copy-{kind}{ext}")
        (out_root / copy_rel).write_bytes(copy_bytes)
        rows.append({"copy": copy_rel.as_posix(), "original": rel.as_posix(), "kind": kind})
    return pl.DataFrame(rows, schema={"copy": pl.String, "original": pl.String, "kind": pl.String})
