from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from curator.clean import CleanSettings, clean
from curator.cli import app
from curator.duplicates import DuplicateSettings
from curator.errors import UsageError
from curator.planting import KINDS, plant_tree
from curator.splits import SplitSettings, assign_parts, balance_weights, make_splits
from tests.conftest import SAMPLE

PATTERN = r"^([^_]+)_"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("split") / "raw"
    originals = sorted(SAMPLE.rglob("*.jpg"))[1::7][:15]
    plant_tree(SAMPLE, root, originals, [k for k in KINDS if k != "byte"], seed=5)
    ws = root.parent / "ws"
    clean(CleanSettings(root=root, workspace=ws, group_pattern=PATTERN, workers=1))
    return ws


def artist(path: str) -> str:
    return path.rsplit("/", 1)[-1].split("_", 1)[0]


def test_no_group_and_no_cluster_crosses_splits_and_every_class_is_everywhere(workspace):
    result = make_splits(workspace, SplitSettings(group_pattern=PATTERN))
    df = result.frame.with_columns(pl.col("path").map_elements(artist, return_dtype=pl.String).alias("artist"))
    assert df.group_by("artist").agg(pl.col("split").n_unique().alias("n"))["n"].max() == 1
    clustered = df.filter(pl.col("cluster").is_not_null())
    assert len(clustered) > 0
    assert clustered.group_by("cluster").agg(pl.col("split").n_unique().alias("n"))["n"].max() == 1
    for label in df["label"].unique():
        assert set(df.filter(pl.col("label") == label)["split"]) == {"train", "val", "test"}
    assert result.report["certificate"]["pairs_above_cosine_or_phash"] == 0
    assert (workspace / "split_report.json").is_file()


@pytest.fixture(scope="module")
def copies_kept(tmp_path_factory):
    """A workspace whose planted copies were NOT removed (near-duplicate detection turned off)."""
    root = tmp_path_factory.mktemp("leaky") / "raw"
    originals = sorted(SAMPLE.rglob("*.jpg"))[::5][:30]
    plant_tree(SAMPLE, root, originals, ["reencode", "resize", "jitter"], seed=2)
    ws = root.parent / "ws"
    blind = DuplicateSettings(phash_radius=0, dhash_radius=0, crop_radius=0, verify_radius=0, embed_relative=0.001)
    clean(CleanSettings(root=root, workspace=ws, group_pattern=PATTERN, workers=1, duplicates=blind))
    return ws


def test_certificate_catches_planted_cross_split_copies_when_grouping_is_off(copies_kept):
    off = make_splits(copies_kept, SplitSettings(respect_groups=False, seed=1))
    df = off.frame
    assert df.filter(pl.col("path").str.contains("__copy-")).height >= 10  # most copies are kept rows here
    assert off.report["certificate"]["pairs_above_cosine_or_phash"] > 0
    assert off.report["certificate"]["min_cross_split_phash_distance"] <= 4
    on = make_splits(copies_kept, SplitSettings(seed=1))
    assert on.report["certificate"]["pairs_above_cosine_or_phash"] == 0


def test_proportions_follow_the_ratios_when_groups_are_small():
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b", "c", "d"], size=4000)
    units = np.arange(4000) // 4  # 1,000 groups of 4
    parts = assign_parts(labels, units, [0.8, 0.1, 0.1], seed=0)
    shares = np.bincount(parts, minlength=3) / len(parts)
    assert np.abs(shares - [0.8, 0.1, 0.1]).max() < 0.02
    for unit in range(0, 1000, 97):
        assert len(set(parts[units == unit])) == 1


def test_folds_are_disjoint_and_cover_every_row_once(workspace):
    result = make_splits(workspace, SplitSettings(folds=3))
    df = result.frame
    assert "split" not in df.columns and sorted(df["fold"].unique()) == [0, 1, 2]
    assert df["path"].is_unique().all()
    assert df.group_by("group").agg(pl.col("fold").n_unique().alias("n"))["n"].max() == 1


def test_too_small_class_is_named_with_its_group_count(workspace):
    with pytest.raises(UsageError, match=r"too small: .*\(\d+ images in [12] groups\)"):
        make_splits(workspace, SplitSettings(group_pattern=r"^(\w)"))  # a group per first letter: few groups


def test_same_manifest_and_seed_give_the_same_file(workspace):
    first = make_splits(workspace, SplitSettings(seed=3)).path.read_bytes()
    second = make_splits(workspace, SplitSettings(seed=3)).path.read_bytes()
    assert first == second


def test_balancing_touches_train_only_and_records_weights():
    labels = np.array(["a"] * 6 + ["b"] * 2 + ["a"] * 3 + ["b"])
    split = np.array(["train"] * 8 + ["val"] * 4)
    over = balance_weights(labels, split, "oversample", False, 0)
    assert over[:6].tolist() == [1.0] * 6 and over[6:8].tolist() == [3.0, 3.0] and (over[8:] == 1).all()
    under = balance_weights(labels, split, "undersample", False, 0)
    assert (under[:6] == 0).sum() == 4 and (under[8:] == 1).all()
    capped = balance_weights(labels, split, "cap:3", True, 0)
    assert (capped[:6] > 0).sum() == 3 and (capped[8:11] > 0).sum() == 3


def test_cli_split_and_its_errors(workspace, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["split", "--workspace", str(workspace), "--group-pattern", PATTERN])
    assert result.exit_code == 0, result.output
    assert "certificate:" in result.output and "splits.parquet" in result.output
    missing = runner.invoke(app, ["split", "--workspace", str(tmp_path)])
    assert missing.exit_code == 1 and "run `curator clean" in missing.output
    bad = runner.invoke(app, ["split", "--workspace", str(workspace), "--ratios", "0.5,0.5"])
    assert bad.exit_code == 2 and "--ratios" in bad.output
