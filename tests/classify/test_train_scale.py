"""`classify train` at scale: the probe reads the embedding store (no pixels), stage 2 caches pixels only within its
budget and otherwise decodes on the fly through the data plane."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from classify import checkpoint
from classify.augment import SeededAugment, augmentation
from classify.data import SplitTable, read_split_table
from classify.probe import read_features, train_probe
from classify.train import TrainSettings, train
from classify.trainset import PIXEL_CACHE, STREAMED, stage2_pixels
from curator.core.images import read_image
from curator.embedding.backbones import load_backbone
from curator.embedding.embed import cache_for

PROBE = dict(model="efficientnet_lite0", epochs=0, workers=0, probe_l2=(1e-2,), probe_steps=50)


def _workspace(sample_ws: Path, tmp_path: Path) -> SplitTable:
    """A copy of the sample workspace (its embedding store included, no pixel cache) whose table points at copies
    of the images, which a test may damage without touching the shared ones."""
    ws = tmp_path / "ws"
    shutil.copytree(sample_ws, ws, ignore=shutil.ignore_patterns("pixels", "thumbs", "report*"))
    table = read_split_table(ws / "splits.parquet")
    paths = []
    for path, rel in zip(table.frame["path"].to_list(), table.frame["rel_path"].to_list()):
        copy = tmp_path / "files" / rel
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
        paths.append(str(copy))
    return replace(table, frame=table.frame.with_columns(pl.Series("path", paths)))


def _pixel_files(table: SplitTable) -> list[Path]:
    folder = table.workspace / "cache" / "pixels"
    return sorted(folder.iterdir()) if folder.exists() else []


def _meta(result) -> dict:
    return json.loads((result.run_dir / "model.json").read_text())


@pytest.mark.slow  # reads the cleaned sample (session fixture sample_ws)
def test_probe_only_reads_the_embedding_store_and_writes_no_pixel_cache(sample_ws, tmp_path):
    table = _workspace(sample_ws, tmp_path)
    result = train(table.splits_path, tmp_path / "run", TrainSettings(**PROBE), table=table)
    assert _pixel_files(table) == []
    data = _meta(result)["data"]
    assert data["stage 2"] is None and data["embeddings computed"] == 0 and data["val"].startswith("embeddings")
    assert "decode to pixel cache" not in result.timings
    # the val metrics are the probe's own on the stored embeddings, well above chance (5 styles) as before
    assert result.val["accuracy"] == pytest.approx(result.history[0]["val_accuracy"], abs=1e-5)
    assert result.val["macro_f1"] == pytest.approx(result.history[0]["val_macro_f1"], abs=1e-5)
    assert result.val["accuracy"] > 0.5 and result.history[0]["data"] == "embeddings"
    # and the same as the kept model gives on the val images' decoded centre crops (the pixel path, without flip)
    loaded = checkpoint.load(result.run_dir)
    val = table.rows("val")
    pre = loaded.preprocess
    crops = torch.stack([torch.from_numpy(pre.pixels(read_image(Path(p), pre.draft_size).image))
                         for p in val["path"].to_list()])
    with torch.inference_mode():
        pred = loaded.classifier.eval()(crops).argmax(1).numpy()
    labels = np.array([result.classes.index(c) for c in val["label"].to_list()])
    assert float((pred == labels).mean()) == pytest.approx(result.val["accuracy"])


@pytest.mark.slow
def test_a_cleared_store_is_refilled_through_the_data_plane_and_gives_the_same_probe(sample_ws, tmp_path):
    table = _workspace(sample_ws, tmp_path)
    first = train(table.splits_path, tmp_path / "first", TrainSettings(**PROBE), table=table)
    shutil.rmtree(table.workspace / "cache" / "embeddings")
    events = []
    again = train(table.splits_path, tmp_path / "again", TrainSettings(**PROBE), lambda k, i: events.append((k, i)),
                  table=table)
    used = table.frame.filter(pl.col("split").is_in(["train", "val"]))
    assert _meta(again)["data"]["embeddings computed"] == used["sha256"].n_unique()
    assert ("stage", {"name": "embeddings", "total": used["sha256"].n_unique()}) in events
    assert _pixel_files(table) == []
    # recomputed from the same pixels by the same model: equal to the stored float16 vectors within their precision
    a = load_file(str(first.run_dir / "model.safetensors"))
    b = load_file(str(again.run_dir / "model.safetensors"))
    for name in ("head.fc.weight", "head.fc.bias", "head.mean", "head.std"):
        np.testing.assert_allclose(b[name].numpy(), a[name].numpy(), rtol=1e-2, atol=1e-3)
    assert again.val == pytest.approx(first.val)
    # appended to the store: a rerun computes nothing and trains exactly the same probe
    rerun = train(table.splits_path, tmp_path / "rerun", TrainSettings(**PROBE), table=table)
    assert _meta(rerun)["data"]["embeddings computed"] == 0
    c = load_file(str(rerun.run_dir / "model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.mark.slow  # reads the cleaned sample (session fixture sample_ws)
def test_a_missing_file_is_skipped_by_the_probe_without_reading_the_others(sample_ws, tmp_path):
    table = _workspace(sample_ws, tmp_path)
    victim = table.rows("val")["path"][0]
    Path(victim).unlink()
    result = train(table.splits_path, tmp_path / "run", TrainSettings(**PROBE), table=table)
    assert list(result.skipped.values()) == ["file is missing"] and "1 images skipped" in result.warnings[0]
    assert result.val["images"] == len(table.rows("val")) - 1 and _pixel_files(table) == []


@pytest.mark.slow
def test_stage2_above_the_budget_decodes_on_the_fly_and_leaves_out_a_file_that_changed(sample_ws, tmp_path):
    table = _workspace(sample_ws, tmp_path)
    changed = Path(table.rows("train")["path"][0])  # its embedding is stored, so only stage 2 reads it
    changed.write_bytes(changed.read_bytes() + b"trailing bytes")
    settings = TrainSettings(**{**PROBE, "epochs": 1, "unfreeze": 1, "batch_size": 16, "pixel_cache_max_gb": 0})
    events = []
    result = train(table.splits_path, tmp_path / "run", settings, lambda k, i: events.append((k, i)), table=table)
    assert _pixel_files(table) == []
    data = _meta(result)["data"]
    assert data["stage 2"] == STREAMED and data["val"] == STREAMED and data["pixel cache bytes"] == 0
    assert "over --pixel-cache-max-gb 0" in data["why"]
    assert any(k == "note" and "decodes on the fly" in i["text"] for k, i in events)
    assert [r["data"] for r in result.history] == ["embeddings", STREAMED]
    assert np.isfinite(result.history[1]["train_loss"]) and 0 <= result.val["accuracy"] <= 1
    assert _meta(result)["complete"] is True and (result.run_dir / "model.safetensors").is_file()
    rel = table.rows("train")["rel_path"][0]
    assert "changed" in result.skipped[rel]
    assert any("left out of their batches" in w and "\n" not in w for w in result.warnings)


def test_where_stage2_reads_pixels_follows_the_budget(tmp_path):
    pre = load_backbone("efficientnet_lite0", pretrained=False).preprocess
    shas = {f"{i:064x}" for i in range(1000)}
    assert stage2_pixels(TrainSettings(epochs=0), pre, shas, tmp_path)[0] is None
    path, why = stage2_pixels(TrainSettings(epochs=1), pre, shas, tmp_path / "cache")
    assert path == PIXEL_CACHE and "0.20 GB" in why  # 1000 x 256 x 256 x 3 bytes + 36 per record
    path, why = stage2_pixels(TrainSettings(epochs=1, pixel_cache_max_gb=0.1), pre, shas, tmp_path)
    assert path == STREAMED and "over --pixel-cache-max-gb 0.1" in why
    assert not (tmp_path / "cache").exists()  # deciding writes nothing


def test_a_crop_is_timms_training_transform_seeded_by_its_own_seed_and_leaves_the_process_rngs_alone():
    import pickle
    import random

    from timm.data.transforms import RandomResizedCropAndInterpolation

    from classify.rng import private_rng
    from curator.embedding.preprocess import Preprocess

    settings = TrainSettings(min_scale=0.5)
    pre = Preprocess(64, 56, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    transform = augmentation(settings, pre)
    crop = transform.transforms[0]
    assert isinstance(crop, RandomResizedCropAndInterpolation) and crop.scale == (0.5, 1.0)
    assert crop.size == (56, 56) and crop.interpolation.value == "bicubic"  # the model's data config
    square = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    augment = SeededAugment(settings, pre)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    a, b, other = augment(square, 7), augment(square, 7), augment(square, 8)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert a.dtype == np.uint8 and a.shape == (3, 56, 56) and np.array_equal(a, b) and not np.array_equal(a, other)
    with private_rng(7):
        direct = transform(torch.from_numpy(square).permute(2, 0, 1)).numpy()
    assert np.array_equal(a, direct)
    assert np.array_equal(pickle.loads(pickle.dumps(augment))(square, 7), a)  # as a worker process gets it


@pytest.mark.slow  # reads the cleaned sample (session fixture sample_ws)
def test_read_features_copies_the_store_rows_in_chunks(sample_ws):
    emb = cache_for(sample_ws, load_backbone("efficientnet_lite0"))
    shas = read_split_table(sample_ws / "splits.parquet").rows("val")["sha256"].to_list()[::-1]
    got = read_features(emb, shas, chunk=3)
    assert got.dtype == np.float32 and got.shape == (len(shas), emb.dim)
    assert np.array_equal(got, emb.vectors()[emb.rows(shas)].astype(np.float32))
    with pytest.raises(KeyError):
        read_features(emb, ["0" * 64])


def test_the_probe_standardising_in_place_trains_the_same_head():
    from classify.classifier import FeatureHead

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((60, 8)).astype(np.float32) * 3 + 1)
    y = torch.from_numpy(rng.integers(0, 3, 60))
    settings = TrainSettings(probe_l2=(1e-2, 1e-1), probe_steps=20)
    states = []
    for in_place in (False, True):
        head = FeatureHead(8, 3)
        head.set_statistics(x)
        features = x.clone()
        state, records = train_probe(features, y, torch.ones(60), x[:20], y[:20].numpy(), head, settings, in_place)
        states.append((state, records))
        assert torch.equal(features, x) != in_place  # consumed only when asked
    assert states[0][1] == states[1][1]
    assert all(torch.equal(states[0][0][k], states[1][0][k]) for k in states[0][0])


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_bad_pixel_cache_budget_is_a_one_line_usage_error(tmp_path, value):
    from classify.cli import app

    result = CliRunner().invoke(app, ["train", "--splits", str(tmp_path / "splits.parquet"),
                                      "--pixel-cache-max-gb", value])
    assert result.exit_code == 2
    assert "pixel-cache-max-gb" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
