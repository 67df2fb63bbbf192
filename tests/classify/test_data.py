from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from classify.data import PixelCache, fill_pixel_cache, read_split_table, square_pixels
from curator.errors import UsageError
from tests.conftest import sample_paintings


def test_pixel_cache_cuts_a_torn_record_and_appends_after_it(tmp_path):
    paths = sample_paintings(3)
    import hashlib

    items = [(str(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
    cache = PixelCache(tmp_path, 64)
    failures = fill_pixel_cache(cache, items[:2], workers=0)
    assert failures == {} and len(cache) == 2
    expected, _ = square_pixels(paths[0], 64)
    assert np.array_equal(cache.pixels(int(cache.rows([items[0][1]])[0])), expected)
    with open(cache.path, "ab") as fh:  # a run killed half way through a record
        fh.write(b"\x01" * 100)
    reopened = PixelCache(tmp_path, 64)
    assert len(reopened) == 2 and reopened.path.stat().st_size == 2 * reopened.record.itemsize
    fill_pixel_cache(reopened, items, workers=0)
    assert len(PixelCache(tmp_path, 64)) == 3


def test_missing_changed_and_broken_files_are_reported_not_cached(tmp_path):
    good = sample_paintings(1)[0]
    changed = tmp_path / "changed.jpg"
    changed.write_bytes(good.read_bytes())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:200])
    import hashlib

    items = [(str(tmp_path / "gone.jpg"), "0" * 64), (str(changed), "1" * 64),
             (str(broken), hashlib.sha256(broken.read_bytes()).hexdigest())]
    cache = PixelCache(tmp_path / "c", 64)
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
    cache = PixelCache(tmp_path, 64)
    fill_pixel_cache(cache, items, workers=0)
    row = int(cache.rows([items[1][1]])[0])
    with open(cache.path, "r+b") as fh:  # bit rot in the middle of the second record's pixels
        fh.seek(row * cache.record.itemsize + 36 + 500)
        fh.write(b"\xff\x00\xff")
    reopened = PixelCache(tmp_path, 64)
    assert reopened.warnings == [] and len(reopened) == 3  # found when the records are about to be used
    failures = fill_pixel_cache(reopened, items, workers=0)
    assert failures == {} and len(reopened.warnings) == 1 and "1 damaged" in reopened.warnings[0]
    expected, _ = square_pixels(Path(items[1][0]), 64)
    assert np.array_equal(reopened.pixels(int(reopened.rows([items[1][1]])[0])), expected)
    assert reopened.verify([sha for _, sha in items]) == []
    final = PixelCache(tmp_path, 64)
    assert final.verify([sha for _, sha in items]) == [] and final.warnings == []


@pytest.mark.parametrize("meta", [
    {"side": 32}, {"record_bytes": 12}, {"format": 1}, None, "garbage",
], ids=["side", "record-bytes", "format", "no-metadata", "garbage"])
def test_pixel_cache_whose_metadata_disagrees_is_set_aside_and_rebuilt(tmp_path, meta):
    import json

    items = _items(2)
    cache = PixelCache(tmp_path, 64)
    fill_pixel_cache(cache, items, workers=0)
    records = cache.path.read_bytes()
    if meta is None:
        cache.meta_path.unlink()  # e.g. a cache written before records carried checksums
    elif meta == "garbage":
        cache.meta_path.write_bytes(b"\x00\x01 not json")
    else:
        cache.meta_path.write_text(json.dumps({**json.loads(cache.meta_path.read_text()), **meta}))
    reopened = PixelCache(tmp_path, 64)
    assert len(reopened) == 0 and "set aside" in reopened.warnings[0] and "\n" not in reopened.warnings[0]
    assert (tmp_path / "pixels-64.u8.unusable-1").read_bytes() == records
    assert fill_pixel_cache(reopened, items, workers=0) == {} and len(PixelCache(tmp_path, 64)) == 2
