from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from classify.data import PixelCache, fill_pixel_cache, read_split_table, square_pixels
from curator.errors import UsageError
from curator.preprocess import Preprocess
from tests.conftest import sample_paintings

#: small squares keep these tests fast; the geometry is the same at any size
PRE = Preprocess(64, 56, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_pixel_cache_cuts_a_torn_record_and_appends_after_it(tmp_path):
    paths = sample_paintings(3)
    import hashlib

    items = [(str(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
    cache = PixelCache(tmp_path, PRE)
    failures = fill_pixel_cache(cache, items[:2], workers=0)
    assert failures == {} and len(cache) == 2
    expected, _ = square_pixels(paths[0], PRE)
    assert np.array_equal(cache.pixels(int(cache.rows([items[0][1]])[0])), expected)
    with open(cache.path, "ab") as fh:  # a run killed half way through a record
        fh.write(b"\x01" * 100)
    reopened = PixelCache(tmp_path, PRE)
    assert len(reopened) == 2 and reopened.path.stat().st_size == 2 * reopened.record.itemsize
    fill_pixel_cache(reopened, items, workers=0)
    assert len(PixelCache(tmp_path, PRE)) == 3


def test_missing_changed_and_broken_files_are_reported_not_cached(tmp_path):
    good = sample_paintings(1)[0]
    changed = tmp_path / "changed.jpg"
    changed.write_bytes(good.read_bytes())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:200])
    import hashlib

    items = [(str(tmp_path / "gone.jpg"), "0" * 64), (str(changed), "1" * 64),
             (str(broken), hashlib.sha256(broken.read_bytes()).hexdigest())]
    cache = PixelCache(tmp_path / "c", PRE)
    failures = fill_pixel_cache(cache, items, workers=0)
    assert failures["0" * 64] == "file is missing"
    assert "changed" in failures["1" * 64]
    assert "truncated" in failures[items[2][1]]
    assert len(cache) == 0


def test_no_splits_file_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="no splits file"):
        read_split_table(tmp_path / "splits.parquet")


def _items(n: int) -> list[tuple[str, str]]:
    import hashlib

    return [(str(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in sample_paintings(n)]


def test_a_damaged_pixel_record_is_dropped_with_a_warning_and_decoded_again(tmp_path):
    items = _items(3)
    cache = PixelCache(tmp_path, PRE)
    fill_pixel_cache(cache, items, workers=0)
    row = int(cache.rows([items[1][1]])[0])
    with open(cache.path, "r+b") as fh:  # bit rot in the middle of the second record's pixels
        fh.seek(row * cache.record.itemsize + 36 + 500)
        fh.write(b"\xff\x00\xff")
    reopened = PixelCache(tmp_path, PRE)
    assert reopened.warnings == [] and len(reopened) == 3  # found when the records are about to be used
    failures = fill_pixel_cache(reopened, items, workers=0)
    assert failures == {} and len(reopened.warnings) == 1 and "1 damaged" in reopened.warnings[0]
    expected, _ = square_pixels(Path(items[1][0]), PRE)
    assert np.array_equal(reopened.pixels(int(reopened.rows([items[1][1]])[0])), expected)
    assert reopened.verify([sha for _, sha in items]) == []
    final = PixelCache(tmp_path, PRE)
    assert final.verify([sha for _, sha in items]) == [] and final.warnings == []


@pytest.mark.parametrize("meta", [
    {"side": 32}, {"record_bytes": 12}, {"format": 1}, {"preprocess": "interpolation=bilinear"}, None, "garbage",
], ids=["side", "record-bytes", "format", "preprocessing", "no-metadata", "garbage"])
def test_pixel_cache_whose_metadata_disagrees_is_set_aside_and_rebuilt(tmp_path, meta):
    import json

    items = _items(2)
    cache = PixelCache(tmp_path, PRE)
    fill_pixel_cache(cache, items, workers=0)
    records = cache.path.read_bytes()
    if meta is None:
        cache.meta_path.unlink()  # e.g. a cache written before records carried checksums
    elif meta == "garbage":
        cache.meta_path.write_bytes(b"\x00\x01 not json")
    else:
        cache.meta_path.write_text(json.dumps({**json.loads(cache.meta_path.read_text()), **meta}))
    reopened = PixelCache(tmp_path, PRE)
    assert len(reopened) == 0 and "set aside" in reopened.warnings[0] and "\n" not in reopened.warnings[0]
    assert (tmp_path / f"{cache.path.name}.unusable-1").read_bytes() == records
    assert fill_pixel_cache(reopened, items, workers=0) == {} and len(PixelCache(tmp_path, PRE)) == 2


def test_the_cache_stores_the_preprocessing_square_and_is_keyed_by_it(tmp_path):
    """A record's centre crop is exactly what timm's eval transform gives for the model's data config (what `curator
    clean` embeds); a model with other preprocessing (here bilinear) gets a cache of its own and never reads those
    records, nor the earlier path's `pixels-SIDE.u8`."""
    import json

    import timm.data
    from torchvision.transforms import Compose

    from curator.images import read_image

    items = _items(2)
    config = {"input_size": (3, 56, 56), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
              "mean": PRE.mean, "std": PRE.std}
    assert Preprocess.from_data_config(config) == PRE
    legacy = tmp_path / "pixels-64.u8"  # the cache of the hand-written bicubic path, before the preprocessing key
    legacy.write_bytes(b"\x07" * 1000)
    cache = PixelCache(tmp_path, PRE)
    assert cache.path != legacy and cache.warnings == []
    fill_pixel_cache(cache, items, workers=0)
    image = read_image(Path(items[0][0]), PRE.draft_size).image
    steps = timm.data.create_transform(**config, is_training=False).transforms[:-2]  # cut before ToTensor, Normalize
    timm_pixels = np.asarray(Compose(steps)(image)).transpose(2, 0, 1)
    stored = cache.pixels(int(cache.rows([items[0][1]])[0]))
    assert stored.shape == (64, 64, 3) and np.array_equal(PRE.crop_square(stored), timm_pixels)

    bilinear = Preprocess(64, 56, "bilinear", PRE.mean, PRE.std)
    other = PixelCache(tmp_path, bilinear)
    assert other.path not in (cache.path, legacy) and len(other) == 0 and other.warnings == []
    assert fill_pixel_cache(other, items, workers=0) == {}
    assert not np.array_equal(other.pixels(int(other.rows([items[0][1]])[0])), stored)  # interpolation shows
    assert json.loads(other.meta_path.read_text())["preprocess"] == bilinear.key()
    assert len(PixelCache(tmp_path, PRE)) == 2 and legacy.read_bytes() == b"\x07" * 1000
