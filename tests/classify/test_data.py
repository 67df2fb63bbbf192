from __future__ import annotations

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
