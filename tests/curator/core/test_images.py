from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curator.core import images
from curator.core.errors import UsageError
from curator.core.images import MAX_PIXELS, ReadPolicy, decode_bytes, natural_key, read_image, read_source, scan
from tests.conftest import sample_paintings


def test_every_odd_and_bad_file_gets_the_right_verdict(odd_tree):
    root, expected = odd_tree
    paths = scan(root)
    assert sorted(p.relative_to(root).as_posix() for p in paths) == sorted(expected)
    for path in paths:
        rel = path.relative_to(root).as_posix()
        decoded = read_image(path)
        status, fragment = expected[rel]
        assert decoded.info.status == status, (rel, decoded.info.reason)
        if fragment:
            assert fragment in decoded.info.reason, (rel, decoded.info.reason)
        if status == "ok":
            assert decoded.info.reason is None
            assert decoded.image.mode == "RGB"
            assert decoded.image.size == (decoded.info.width, decoded.info.height)
        else:
            assert decoded.image is None


def test_unusual_images_are_converted_faithfully(odd_tree):
    root, _ = odd_tree
    gray = np.asarray(read_image(root / "Baroque/gray.png").image)
    sixteen = np.asarray(read_image(root / "Baroque/sixteen_bit.png").image)
    # 16-bit values are scaled down, not clipped to white
    assert np.abs(sixteen.astype(int) - gray.astype(int)).max() <= 1
    rgba = np.asarray(read_image(root / "Baroque/rgba.png").image).astype(int)
    plain = np.asarray(Image.open(root / "Baroque/rgba.png").convert("RGB")).astype(int)
    # half-transparent pixels composited on white come out lighter than the bare colour
    assert rgba.mean() > plain.mean() + 40
    rotated = read_image(root / "Baroque/exif_rotated.jpg")
    assert (rotated.info.width, rotated.info.height) == (200, 320)
    assert rotated.image.size == (200, 320)
    cmyk = read_image(root / "Baroque/cmyk.jpg")
    assert cmyk.info.mode == "CMYK" and cmyk.image.mode == "RGB"
    animated = read_image(root / "Baroque/animated.gif")
    assert animated.info.format == "GIF" and animated.image.size == (224, 224)


def test_truncated_reason_reads_as_a_sentence(odd_tree):
    root, _ = odd_tree
    reason = read_image(root / "Rococo/truncated.jpg").info.reason
    assert reason.startswith("truncated JPEG: the file ends before the image data does")
    bomb = read_image(root / "Rococo/bomb.png").info
    assert bomb.reason == f"decompression bomb: 400 MP exceeds the limit of {MAX_PIXELS / 1e6:.0f} MP"


def test_large_jpeg_decodes_through_draft_near_the_target_size():
    painting = Image.open(sample_paintings(1)[0]).convert("RGB").resize((2000, 1500))
    buf = io.BytesIO()
    painting.save(buf, format="JPEG", quality=90)
    decoded = decode_bytes(Path("big.jpg"), buf.getvalue(), draft_size=(256, 256))
    assert (decoded.info.width, decoded.info.height) == (2000, 1500)
    assert 256 <= min(decoded.image.size) < 1500
    full = decode_bytes(Path("big.jpg"), buf.getvalue())
    assert full.image.size == (2000, 1500)


def test_scan_follows_symlinks_once_and_skips_the_workspace(tmp_path):
    root = tmp_path / "root"
    (root / "A").mkdir(parents=True)
    src = sample_paintings(1)[0]
    (root / "A" / "x.jpg").write_bytes(src.read_bytes())
    os.symlink(root, root / "A" / "loop")  # a loop back to the root
    os.symlink(root / "A" / "x.jpg", root / "A" / "link.jpg")
    os.symlink(root / "A" / "gone.jpg", root / "A" / "broken.jpg")
    (root / "curated").mkdir()
    (root / "curated" / "manifest.parquet").write_bytes(b"PAR1")
    found = [p.relative_to(root).as_posix() for p in scan(root, exclude=[root / "curated"])]
    assert found == ["A/broken.jpg", "A/link.jpg", "A/x.jpg"]
    broken = read_image(root / "A" / "broken.jpg").info
    assert broken.status == "ignored" and "broken symbolic link" in broken.reason
    assert read_image(root / "A" / "link.jpg").info.ok


def test_natural_sort():
    names = ["img10.jpg", "img2.jpg", "Img1.jpg"]
    assert sorted(names, key=natural_key) == ["Img1.jpg", "img2.jpg", "img10.jpg"]


def test_read_source_never_opens_what_it_must_not(hostile_tree):
    root, reasons = hostile_tree
    policy = ReadPolicy(root=root)
    for path in scan(root):
        rel = path.relative_to(root).as_posix()
        if rel in reasons:
            data, row = read_source(path, policy)
            assert data is None and reasons[rel] in row.info.reason, (rel, row.info.reason)
            assert row.info.sha256 is None and row.image is None
    outside = read_image(root / "Baroque" / "to_image.jpg", policy=policy)
    assert outside.info.status == "ignored" and "secret.jpg" in outside.info.reason
    inside = read_image(root / "Baroque" / "inside_link.jpg", policy=policy)
    assert inside.info.ok  # links that stay inside the root keep working
    followed = read_image(root / "Baroque" / "to_image.jpg", policy=ReadPolicy(root=root, follow_symlinks=True))
    assert followed.info.ok


def test_listing_does_not_descend_into_folders_outside_the_root(hostile_tree):
    root, _ = hostile_tree
    listed = {p.relative_to(root).as_posix() for p in scan(root)}
    assert "Rococo/outside_folder" in listed
    assert not any(name.startswith("Rococo/outside_folder/") for name in listed)
    followed = {p.relative_to(root).as_posix() for p in scan(root, follow_symlinks=True)}
    assert "Rococo/outside_folder/secret.txt" in followed


def test_size_cap_and_sniffing_bound_what_is_read(tmp_path, monkeypatch):
    painting = sample_paintings(1)[0]
    big = tmp_path / "big.jpg"
    big.write_bytes(painting.read_bytes())
    data, row = read_source(big, ReadPolicy(max_bytes=1000))
    assert data is None and row.info.status == "corrupt" and "exceeds --max-bytes 1,000" in row.info.reason
    assert read_source(big, ReadPolicy(max_bytes=10**6))[0] == painting.read_bytes()
    video = tmp_path / "film.mov"
    with open(video, "wb") as fh:
        fh.truncate(200 << 20)

    def must_not_read(*args):
        raise AssertionError("a non-image was read past its header")

    monkeypatch.setattr(images, "_read_bounded", must_not_read)
    data, row = read_source(video)
    assert row.info.status == "ignored" and row.info.bytes == 200 << 20 and "not an image file (.mov)" in row.info.reason
    with pytest.raises(UsageError, match="--max-bytes must be a positive"):
        ReadPolicy(max_bytes=0)
