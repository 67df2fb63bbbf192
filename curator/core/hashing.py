"""Content fingerprints of a decoded image: exact pixels, perceptual hashes, and crop-aligned perceptual hashes.

pHash (imagehash's 64-bit DCT hash) keeps byte copies, re-encodes, resizes and mild colour jitter within a few bits
of the original, but a copy cropped by 5-10% a side lands 10-28 bits away, as far as distinct paintings. So each
image also gets the pHash of its own centre crops at `CROP_SCALES`: a cropped copy's full-frame hash is close to
one of its original's crop hashes ("crop-aligned re-hash"). dHash (gradient signs) is a second, independent hash
that flat, dark or monochrome images rarely share by accident.

Both hashes see only grey levels, so series painted in one composition and several colours (Yves Klein's
monochromes, screen-print variants) collide. `colour` is a 4x4 grid of opponent-colour chroma, compared by cosine,
which is blind to brightness and saturation changes but not to a change of hue.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: Centre-crop scales (fraction of each side kept) whose pHashes are stored for crop-tolerant matching.
CROP_SCALES = (0.95, 0.9, 0.85, 0.8)


@dataclass(frozen=True)
class Fingerprint:
    """Hashes of one decoded image. Perceptual hashes are 64-bit unsigned integers."""

    pixel_sha256: str
    phash: int
    dhash: int
    crop_phash: tuple[int, ...]
    colour: bytes  # 32 signed bytes: opponent chroma (R-G, R+G-2B) over a 4x4 grid, halved
    stats: tuple[float, float, float] | None = None  # (brightness, sharpness, entropy): `image_stats`



def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bits_to_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.astype(np.uint8).ravel()).tobytes(), "big")


def phash(image: Image.Image) -> int:
    """imagehash's pHash (8x8 low frequencies of the DCT of a 32x32 grayscale copy), bit for bit."""
    import scipy.fftpack  # here, not at the top: 0.3 s that `classify` start-up (via file_sha256) need not pay

    gray = image if image.mode == "L" else image.convert("L")
    pixels = np.asarray(gray.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8]
    return _bits_to_int(low > np.median(low))


def dhash(image: Image.Image) -> int:
    """imagehash's dHash (signs of horizontal gradients of a 9x8 grayscale copy) as a 64-bit integer."""
    import imagehash

    return _bits_to_int(imagehash.dhash(image).hash)


def centre_crop(image: Image.Image, scale: float) -> Image.Image:
    width, height = image.size
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (width - w) // 2, (height - h) // 2
    return image.crop((left, top, left + w, top + h))


def colour_signature(image: Image.Image) -> bytes:
    """Opponent-colour chroma of a 4x4 grid (brightness removed), as 32 signed bytes."""
    grid = np.asarray(image.convert("RGB").resize((4, 4), Image.Resampling.BOX), dtype=np.float64)
    red, green, blue = grid[..., 0], grid[..., 1], grid[..., 2]
    chroma = np.concatenate([((red - green) / np.sqrt(2)).ravel(), ((red + green - 2 * blue) / np.sqrt(6)).ravel()])
    return np.clip(np.round(chroma / 2), -127, 127).astype(np.int8).tobytes()


def colour_vectors(signatures) -> np.ndarray:
    """Hex colour signatures (as stored in the manifest) to an (n, 32) float array."""
    return np.stack([np.frombuffer(bytes.fromhex(s), dtype=np.int8) for s in signatures]).astype(np.float64) \
        if len(signatures) else np.zeros((0, 32))


def colour_agreement(a: np.ndarray, b: np.ndarray, grey_norm: float) -> np.ndarray:
    """Cosine of chroma rows; 1 where either side is close to grey (a grey copy of a colour image agrees)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cosine = (a * b).sum(axis=1) / np.maximum(na * nb, 1e-9)
    return np.where(np.minimum(na, nb) < grey_norm, 1.0, cosine)


#: Long side of the grey copy the image statistics are measured on, so that they do not depend on the file's size.
STATS_SIDE = 256


def image_stats(gray: Image.Image) -> tuple[float, float, float]:
    """(brightness, sharpness, entropy) of a grey image, measured on a copy whose long side is `STATS_SIDE`:
    mean grey level in [0, 1]; variance of the 4-neighbour Laplacian (grey levels 0..255; low means blurry or flat);
    Shannon entropy of the 256-bin grey histogram in bits (0 for a blank image, 8 at most)."""
    scale = STATS_SIDE / max(gray.size)
    if scale < 1:
        gray = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))),
                           Image.Resampling.BILINEAR)
    g = np.asarray(gray, dtype=np.float32)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    counts = np.bincount(np.asarray(gray, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(g.mean() / 255.0), float(lap.var()) if lap.size else 0.0, max(0.0, float(-(p * np.log2(p)).sum()))


def fingerprint(image: Image.Image) -> Fingerprint:
    """All hashes of an RGB image, as decoded by `curator.core.images` (upright, alpha on white)."""
    pixels = np.asarray(image)
    digest = hashlib.sha256()
    digest.update(f"{pixels.shape}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    gray = image.convert("L")
    return Fingerprint(
        pixel_sha256=digest.hexdigest(),
        phash=phash(gray),
        dhash=dhash(gray),
        crop_phash=tuple(phash(centre_crop(gray, s)) for s in CROP_SCALES),
        colour=colour_signature(image),
        stats=image_stats(gray),
    )


def to_hex(value: int) -> str:
    return f"{value:016x}"


def from_hex(values) -> np.ndarray:
    """Hex strings to a uint64 array."""
    return np.array([int(v, 16) for v in values], dtype=np.uint64)


def to_bytes(hashes: np.ndarray) -> np.ndarray:
    """uint64 hashes to the (n, 8) uint8 rows faiss binary indexes take (big-endian, bit order kept)."""
    return np.ascontiguousarray(hashes.astype(">u8")).view(np.uint8).reshape(-1, 8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distance between uint64 arrays (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))).astype(
        np.int64)
