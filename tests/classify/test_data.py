from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from classify.data import PixelCache, fill_pixel_cache, read_split_table, square_pixels
from curator.core.errors import UsageError
from curator.embedding.preprocess import Preprocess
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

    from curator.core.images import read_image

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


def _shift(square: np.ndarray, seed: int) -> np.ndarray:
    """A toy augmentation: the centre crop, rolled by an amount the seed decides (picklable, for worker processes)."""
    return np.roll(PRE.crop_square(square), seed % 7, axis=2)


def test_streamed_batches_give_the_centre_crops_in_the_order_asked_and_write_nothing(tmp_path):
    from classify.data import StreamedBatches
    from curator.core.images import read_image

    items = _items(5)
    batches = StreamedBatches(items, PRE, batch_size=2, order=lambda: [4, 0, 3, 1, 2])
    got = list(batches)
    assert [len(rows) for _, rows in got] == [2, 2, 1] and len(batches) == 3
    assert [int(i) for _, rows in got for i in rows] == [4, 0, 3, 1, 2]
    for pixels, rows in got:
        assert pixels.dtype == torch.uint8 and pixels.shape[1:] == (3, 56, 56)
        for crop, i in zip(pixels, rows.tolist()):
            expected = PRE.pixels(read_image(Path(items[i][0]), PRE.draft_size).image)
            assert np.array_equal(crop.numpy(), expected)
    assert batches.failures == {} and list(tmp_path.iterdir()) == []
    dropped = StreamedBatches(items, PRE, batch_size=2, drop_last=True)
    assert [len(rows) for _, rows in dropped] == [2, 2] and len(dropped) == 2


def test_streamed_batches_leave_out_missing_and_changed_files_and_say_why(tmp_path):
    from classify.data import StreamedBatches

    items = _items(4)
    changed = tmp_path / "changed.jpg"
    changed.write_bytes(Path(items[2][0]).read_bytes()[:-10] + b"0123456789")
    broken = [items[0], (str(tmp_path / "gone.jpg"), items[1][1]), (str(changed), items[2][1]), items[3]]
    batches = StreamedBatches(broken, PRE, batch_size=4)
    (pixels, rows), = list(batches)
    assert rows.tolist() == [0, 3] and len(pixels) == 2
    assert batches.failures[items[1][1]] == "file is missing" and "changed" in batches.failures[items[2][1]]
    assert list(StreamedBatches(broken, PRE, batch_size=2, min_rows=2)) == []  # no batch keeps two rows


def test_streamed_augmentation_is_seeded_per_row_from_the_generator_whatever_the_workers(tmp_path):
    from classify.data import StreamedBatches

    items = _items(6)

    def run(workers: int) -> tuple[list[int], np.ndarray]:
        generator = torch.Generator().manual_seed(5)
        batches = StreamedBatches(items, PRE, batch_size=4, workers=workers, augment=_shift, generator=generator,
                                  order=lambda: torch.randperm(len(items), generator=generator).tolist())
        rows, crops = [], []
        for pixels, positions in batches:
            rows += positions.tolist()
            crops.append(pixels.numpy())
        return rows, np.concatenate(crops)

    rows0, crops0 = run(0)
    rows1, crops1 = run(1)
    assert rows0 == rows1 and sorted(rows0) == list(range(6)) and rows0 != list(range(6))
    assert np.array_equal(crops0, crops1)
    centre = np.stack([PRE.crop_square(square_pixels(Path(items[i][0]), PRE)[0]) for i in rows0])
    assert not np.array_equal(crops0, centre)  # the augmentation ran (some seed % 7 is not 0)


def test_the_pixel_cache_gives_the_same_seeded_crops_as_decoding_on_the_fly(tmp_path):
    """`Crops` under a `SeededBatches` batch sampler and `StreamedBatches` draw the same order and crop seeds from
    the same generator, so stage 2 trains on the same crops whichever path its pixels take; neither draws from the
    process's default generator."""
    from classify.data import Crops, SeededBatches, StreamedBatches

    items = _items(6)
    cache = PixelCache(tmp_path / "cache", PRE)
    assert fill_pixel_cache(cache, items, workers=0) == {}

    def cached(seed: int) -> tuple[list[int], np.ndarray]:
        generator = torch.Generator().manual_seed(seed)
        batches = SeededBatches(lambda: torch.randperm(6, generator=generator).tolist(), 6, 4, generator,
                                drop_last=True)
        loader = torch.utils.data.DataLoader(Crops(cache, cache.rows([s for _, s in items]), _shift),
                                             batch_sampler=batches, generator=torch.Generator())
        got = [(positions.tolist(), pixels.numpy()) for pixels, positions in loader]
        assert len(loader) == len(got) == 1  # the short last batch dropped
        return got[0]

    def streamed(seed: int) -> tuple[list[int], np.ndarray]:
        generator = torch.Generator().manual_seed(seed)
        batches = StreamedBatches(items, PRE, batch_size=4, augment=_shift, generator=generator, drop_last=True,
                                  order=lambda: torch.randperm(6, generator=generator).tolist())
        (pixels, positions), = list(batches)
        return positions.tolist(), pixels.numpy()

    state = torch.get_rng_state()
    rows, crops = cached(5)
    assert torch.equal(torch.get_rng_state(), state)
    other_rows, other_crops = streamed(5)
    assert rows == other_rows and np.array_equal(crops, other_crops)
    assert cached(6)[0] != rows  # another seed, another order
