"""The cascade end to end through `clean`, on planted copies of real sample paintings."""

from __future__ import annotations

import polars as pl
import pytest

from curator.stages.clean import CleanSettings, clean
from curator.stages.planting import KINDS, plant_tree
from tests.conftest import SAMPLE


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted") / "raw"
    originals = sorted(SAMPLE.rglob("*.jpg"))[::6][:20]  # 20 paintings across the five styles, 4 per copy kind
    truth = plant_tree(SAMPLE, root, originals, KINDS, seed=3)
    # the same painting filed under a second style: a label conflict
    conflict_src = root / "Baroque" / originals[0].name
    (root / "Rococo" / f"refiled_{originals[0].name}").write_bytes(conflict_src.read_bytes())
    result = clean(CleanSettings(root=root, workspace=root.parent / "ws", workers=1))
    return root, truth, result


def test_every_planted_copy_clusters_with_its_original_and_one_is_kept(planted):
    root, truth, result = planted
    df = result.manifest
    by_path = {row["path"]: row for row in df.iter_rows(named=True)}
    for row in truth.iter_rows(named=True):
        copy, original = by_path[row["copy"]], by_path[row["original"]]
        if row["original"].endswith(sorted(SAMPLE.rglob("*.jpg"))[0].name):
            continue  # the conflicted painting is checked below
        assert copy["cluster"] is not None and copy["cluster"] == original["cluster"], row
        members = df.filter(pl.col("cluster") == copy["cluster"])
        assert members["keep"].sum() == 1, (row, members.select("path", "status", "reason").rows())


def test_keeper_is_the_larger_original_over_a_smaller_copy(planted):
    _, truth, result = planted
    df = result.manifest
    for row in truth.filter(pl.col("kind") == "resize").iter_rows(named=True):
        copy = df.filter(pl.col("path") == row["copy"]).row(0, named=True)
        assert copy["status"] == "duplicate" and copy["duplicate_of"] == row["original"]
        assert copy["reason"].startswith(f"duplicate of {row['original']}")


def test_distinct_paintings_do_not_merge(planted):
    _, truth, result = planted
    df = result.manifest
    involved = set(truth["copy"]) | set(truth["original"])
    strays = df.filter(pl.col("cluster").is_not_null() & ~pl.col("path").is_in(list(involved))
                       & ~pl.col("path").str.contains("refiled_"))
    # the sample holds no real duplicates, so nothing outside the planted pairs may cluster
    assert strays.is_empty(), strays.select("path", "reason").rows()


def test_a_painting_filed_under_two_styles_is_a_conflict(planted):
    _, _, result = planted
    df = result.manifest
    refiled = df.filter(pl.col("path").str.contains("refiled_")).row(0, named=True)
    assert refiled["status"] == "conflict"
    assert "Baroque and Rococo" in refiled["reason"]
    members = df.filter(pl.col("cluster") == refiled["cluster"])
    assert set(members["status"]) == {"conflict"} and not members["keep"].any()
