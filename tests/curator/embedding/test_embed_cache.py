"""The embedding cache is verified, not trusted: non-finite vectors and metadata that disagrees with the backbone."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from curator.core import manifest
from curator.core.errors import UsageError
from curator.embedding.backbones import load_backbone
from curator.embedding.embed import EmbeddingCache, cache_for, open_cache
from curator.stages.clean import CleanSettings, clean

LAYOUT = {"pooled": (0, 4), "stats": (4, 8)}


def shas(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def vectors(n: int) -> np.ndarray:
    return np.arange(n * 8, dtype=np.float32).reshape(n, 8) / 10


def poison(cache: EmbeddingCache, record: int, value: float) -> None:
    """Overwrite one float16 of the vector in record number `record`, as bit rot or a foreign writer would."""
    offset = record * cache.record.itemsize + 32 + 2 * 3
    with open(cache.path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.float16(value).tobytes())


def test_nan_and_inf_vectors_are_dropped_with_a_warning_and_not_counted_as_cached(tmp_path):
    cache = EmbeddingCache(tmp_path, "k", 8, LAYOUT)
    cache.append(shas(3), vectors(3))
    poison(cache, 0, float("nan"))
    poison(cache, 2, float("inf"))
    reopened = EmbeddingCache(tmp_path, "k", 8, LAYOUT)
    assert len(reopened.warnings) == 1 and "2 of 3" in reopened.warnings[0] and "NaN" in reopened.warnings[0]
    assert reopened.shas() == {shas(3)[1]} and shas(3)[0] not in reopened and len(reopened) == 1
    with pytest.raises(KeyError):
        reopened.get([shas(3)[0]])
    assert np.array_equal(reopened.get([shas(3)[1]]), vectors(3)[1:2].astype(np.float16).astype(np.float32))
    assert reopened.path.stat().st_size == reopened.record.itemsize  # the writer rewrote the file without them
    reopened.append([shas(3)[0], shas(3)[2]], vectors(3)[[0, 2]])  # what the next embedding pass does
    again = EmbeddingCache(tmp_path, "k", 8, LAYOUT)
    assert again.warnings == [] and again.shas() == set(shas(3))


def test_non_finite_model_output_is_not_stored(tmp_path):
    cache = EmbeddingCache(tmp_path, "k", 8, LAYOUT)
    bad = vectors(2)
    bad[1, 5] = np.nan
    cache.append(shas(2), bad)
    assert cache.shas() == {shas(2)[0]} and "NaN" in cache.warnings[0]
    assert EmbeddingCache(tmp_path, "k", 8, LAYOUT).shas() == {shas(2)[0]}


def test_a_reader_never_truncates_or_rewrites(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache" / "embeddings", "k", 8, LAYOUT)
    cache.append(shas(3), vectors(3))
    poison(cache, 1, float("nan"))
    with open(cache.path, "ab") as fh:
        fh.write(b"\x01" * 7)  # a torn tail
    before = cache.path.read_bytes()
    reader = open_cache(tmp_path, "k")
    assert reader.path.read_bytes() == before
    assert reader.shas() == {shas(3)[0], shas(3)[2]} and "run `curator clean` again" in reader.warnings[0]


@pytest.mark.parametrize("edit", [
    lambda meta: {**meta, "dim": 6},
    lambda meta: {**meta, "dim": 16},
    lambda meta: {**meta, "layout": {"pooled": [0, 3], "stats": [3, 8]}},
    lambda meta: {**meta, "layout": {"pooled": [0, 4], "stats": [4, 9]}},
    lambda meta: {**meta, "key": "other"},
    lambda meta: {**meta, "record_bytes": 99},
    lambda meta: ["not", "an", "object"],
    None,  # unreadable
], ids=["narrower", "wider", "layout", "layout-past-width", "key", "record-bytes", "not-object", "garbage"])
def test_metadata_that_disagrees_sets_the_cache_aside_never_truncating_it(tmp_path, edit):
    directory = tmp_path / "cache" / "embeddings"
    cache = EmbeddingCache(directory, "k", 8, LAYOUT)
    cache.append(shas(3), vectors(3))
    records = cache.path.read_bytes()
    meta = json.loads(cache.meta_path.read_text())
    cache.meta_path.write_text("{not json" if edit is None else json.dumps(edit(meta)))

    with pytest.raises(UsageError) as refused:  # `curator split`'s reader: a one-line refusal, files untouched
        open_cache(tmp_path, "k", LAYOUT)
    assert "\n" not in str(refused.value) and "run `curator clean` again" in str(refused.value)
    assert cache.path.read_bytes() == records

    writer = EmbeddingCache(directory, "k", 8, LAYOUT)  # `curator clean`'s writer: set aside and rebuilt
    assert len(writer) == 0 and "set aside" in writer.warnings[0] and "\n" not in writer.warnings[0]
    assert (directory / "k.emb.unusable-1").read_bytes() == records
    assert json.loads(writer.meta_path.read_text())["dim"] == 8
    assert open_cache(tmp_path, "k", LAYOUT).warnings == []


def test_records_without_metadata_are_set_aside_and_an_earlier_aside_copy_is_kept(tmp_path):
    cache = EmbeddingCache(tmp_path, "k", 8, LAYOUT)
    cache.append(shas(2), vectors(2))
    records = cache.path.read_bytes()
    (tmp_path / "k.emb.unusable-1").write_bytes(b"an earlier one")
    cache.meta_path.unlink()
    writer = EmbeddingCache(tmp_path, "k", 8, LAYOUT)
    assert len(writer) == 0 and "no metadata" in writer.warnings[0]
    assert (tmp_path / "k.emb.unusable-1").read_bytes() == b"an earlier one"
    assert (tmp_path / "k.emb.unusable-2").read_bytes() == records


def test_clean_recomputes_damaged_vectors_and_rebuilds_a_cache_with_tampered_width(small_tree, tmp_path):
    ws = tmp_path / "ws"
    settings = CleanSettings(root=small_tree, workspace=ws, workers=0)
    first = clean(settings).manifest
    backbone = load_backbone()
    cache = cache_for(ws, backbone)
    wanted = first["sha256"].to_list()
    good = cache.get(wanted)
    poison(cache, 2, float("nan"))

    again = clean(settings)
    assert again.embed.computed == 1
    assert again.manifest.select("path", "status", "keep").equals(first.select("path", "status", "keep"))
    assert np.isfinite(cache_for(ws, backbone).get(wanted)).all()

    meta_path = cache.meta_path
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "dim": meta["dim"] - 100}))  # edited by hand
    size = cache.path.stat().st_size
    third = clean(settings)
    assert third.embed.computed == 8  # rebuilt from scratch, not read at the wrong width
    assert (cache.directory / f"{cache.key}.emb.unusable-1").stat().st_size == size
    assert np.allclose(cache_for(ws, backbone).get(wanted), good, atol=0.05)
    assert manifest.read(ws)["sha256"].to_list() == wanted


@pytest.mark.parametrize("key", ["../../outside", "", None, ".hidden"])
def test_a_backbone_key_that_is_not_a_plain_name_is_refused(tmp_path, key):
    with pytest.raises(UsageError, match="not one atelier writes"):
        open_cache(tmp_path, key)
