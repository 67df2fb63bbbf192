from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance

from curator.core.hashing import CROP_SCALES, centre_crop, fingerprint, from_hex, hamming, to_hex
from tests.conftest import sample_paintings


def load(path) -> Image.Image:
    return Image.open(path).convert("RGB")


def reencode(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_phash_is_stable_under_copies_and_far_between_paintings():
    paintings = [load(p) for p in sample_paintings(10)]
    original = paintings[0]
    fp = fingerprint(original)
    copies = {
        "reencode": reencode(original, 30),
        "resize": original.resize((134, 134), Image.Resampling.LANCZOS),
        "jitter": ImageEnhance.Brightness(original).enhance(1.12),
    }
    for kind, copy in copies.items():
        assert hamming(np.uint64(fp.phash), np.uint64(fingerprint(copy).phash)) <= 6, kind
    others = [fingerprint(p).phash for p in paintings[1:]]
    assert min(hamming(np.uint64(fp.phash), np.array(others, dtype=np.uint64))) > 12


def test_crop_aligned_hash_catches_a_centre_crop():
    original = load(sample_paintings(1)[0])
    fp = fingerprint(original)
    cropped = centre_crop(original, 0.86).resize((200, 200))
    full_distance = hamming(np.uint64(fp.phash), np.uint64(fingerprint(cropped).phash))
    aligned = hamming(np.uint64(fingerprint(cropped).phash), np.array(fp.crop_phash, dtype=np.uint64)).min()
    assert aligned <= 8 and aligned < full_distance
    assert len(fp.crop_phash) == len(CROP_SCALES)


def test_pixel_hash_equal_for_lossless_resave_and_hex_round_trip():
    original = load(sample_paintings(1)[0])
    buf = io.BytesIO()
    original.save(buf, "PNG")
    png = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    assert fingerprint(png).pixel_sha256 == fingerprint(original).pixel_sha256
    assert fingerprint(reencode(original, 95)).pixel_sha256 != fingerprint(original).pixel_sha256
    value = fingerprint(original).phash
    assert from_hex([to_hex(value)])[0] == np.uint64(value)


def test_our_phash_is_imagehash_phash_bit_for_bit():
    import imagehash

    for path in sample_paintings(6):
        image = load(path)
        expected = int(str(imagehash.phash(image)), 16)
        assert fingerprint(image).phash == expected
        assert fingerprint(image).crop_phash[1] == int(str(imagehash.phash(centre_crop(image, CROP_SCALES[1]))), 16)


def test_colour_signature_separates_hue_variants_but_not_grey_or_jittered_copies():
    from curator.core.hashing import colour_agreement, colour_vectors

    original = load(sample_paintings(3)[2])
    r, g, b = original.split()
    swapped = Image.merge("RGB", (b, r, g))  # the same composition in other colours
    variants = {
        "grey": original.convert("L").convert("RGB"),
        "jitter": ImageEnhance.Color(ImageEnhance.Brightness(original).enhance(0.87)).enhance(1.14),
        "swapped": swapped,
    }
    sig = colour_vectors([fingerprint(original).colour.hex()])
    agreement = {k: colour_agreement(sig, colour_vectors([fingerprint(v).colour.hex()]), 8.0)[0]
                 for k, v in variants.items()}
    assert agreement["grey"] == 1.0
    assert agreement["jitter"] > 0.95
    assert agreement["swapped"] < 0.6
