from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

from curator.clean import CleanSettings, clean
from curator.mislabels import MislabelSettings, estimate_noise_rate, out_of_fold_probabilities, score_mislabels
from tests.conftest import SAMPLE

SWAPS = {  # file -> the wrong style it is filed under
    "Ukiyo_e/katsushika-hokusai_dragon.jpg": "Baroque",
    "Ukiyo_e/utagawa-kuniyoshi_a-man.jpg": "Impressionism",
    "Pointillism/georges-seurat_the-seine-at-courbevoie-1885.jpg": "Ukiyo_e",
    "Baroque/rembrandt_the-syndics.jpg": "Pointillism",
    "Impressionism/alfred-sisley_the-forest-at-boulogne.jpg": "Ukiyo_e",
    "Rococo/william-hogarth_before.jpg": "Ukiyo_e",
}


def swapped_paths() -> list[str]:
    return [f"{wrong}/{rel.split('/')[-1]}" for rel, wrong in SWAPS.items()]


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    root = tmp_path_factory.mktemp("swaps") / "raw"
    shutil.copytree(SAMPLE, root)
    for rel, wrong in SWAPS.items():
        (root / rel).rename(root / wrong / rel.split("/")[-1])
    runs = {}
    for action in ("remove", "flag-only", "relabel"):
        runs[action] = clean(CleanSettings(root=root, workspace=root.parent / f"ws-{action}",
                                           group_pattern=r"^([^_]+)_", workers=1,
                                           mislabels=MislabelSettings(action=action))).manifest
    return runs


def test_planted_swaps_score_high_and_most_are_flagged(cleaned):
    df = cleaned["remove"]
    swapped = df.filter(pl.col("path").is_in(swapped_paths()))
    others = df.filter(~pl.col("path").is_in(swapped_paths()))
    assert swapped["mislabel_score"].min() > others["mislabel_score"].median()
    assert swapped["is_mislabel_issue"].sum() >= 4
    flagged = df.filter(pl.col("is_mislabel_issue"))
    assert len(flagged) <= 0.25 * len(df)  # the count follows the estimated noise, not a fixed share
    for row in flagged.iter_rows(named=True):
        assert row["status"] == "outlier" and not row["keep"]
        assert row["reason"].startswith(f"filed as {row['label']}; ")
        assert f"say {row['suggested_label']}" in row["reason"]
    dragon = df.filter(pl.col("path") == "Baroque/katsushika-hokusai_dragon.jpg").row(0, named=True)
    assert dragon["suggested_label"] == "Ukiyo_e"


def test_flag_only_changes_keep_only(cleaned):
    removed, flagged = cleaned["remove"], cleaned["flag-only"]
    assert removed.drop("keep").equals(flagged.drop("keep"))
    outliers = flagged.filter(pl.col("status") == "outlier")
    assert len(outliers) > 0 and outliers["keep"].all()


def test_relabel_keeps_strong_cases_under_the_suggested_label(cleaned):
    df = cleaned["relabel"]
    relabelled = df.filter(pl.col("original_label").is_not_null())
    for row in relabelled.iter_rows(named=True):
        assert row["label"] == row["suggested_label"] != row["original_label"]
        assert row["keep"] and row["status"] == "ok" and row["reason"].startswith("relabelled: ")
        assert row["mislabel_score"] >= MislabelSettings().relabel_min
    weak = df.filter(pl.col("is_mislabel_issue") & pl.col("original_label").is_null())
    assert (weak["status"] == "outlier").all() and not weak["keep"].any()
    assert len(relabelled) + len(weak) == cleaned["remove"]["is_mislabel_issue"].sum()


def test_noise_rate_estimate_tracks_planted_noise():
    rng = np.random.default_rng(0)
    n, k = 5000, 5
    truth = rng.integers(0, k, n)
    evidence = rng.dirichlet(np.ones(k) * 0.3, n) * 0.3
    evidence[np.arange(n), truth] += 0.7  # a confident, mostly right witness
    evidence /= evidence.sum(axis=1, keepdims=True)
    for rate in (0.0, 0.05, 0.2):
        given = truth.copy()
        wrong = rng.random(n) < rate
        given[wrong] = (truth[wrong] + rng.integers(1, k, wrong.sum())) % k
        assert abs(estimate_noise_rate(evidence, given, tau=0.05) - rate) < 0.03, rate


def test_single_group_class_is_left_to_the_neighbours():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 8))
    y = np.repeat([0, 1, 2], 20)
    groups = np.array([f"a{i % 4}" for i in range(40)] + ["solo"] * 20, dtype=object)
    _, has_probe = out_of_fold_probabilities(x, y, groups, 3, 5, 1.0, 0)
    assert has_probe[:40].all() and not has_probe[40:].any()
    result = score_mislabels(x, [str(v) for v in y], list(groups), MislabelSettings(neighbours=5))
    assert result.knn_only_classes == ["2"]


def test_flagged_rows_name_their_nearest_images_of_the_suggested_class_in_the_report(cleaned):
    df = cleaned["remove"]
    flagged = df.filter(pl.col("is_mislabel_issue"))
    by_path = {row["path"]: row for row in df.iter_rows(named=True)}
    for row in flagged.iter_rows(named=True):
        assert len(row["mislabel_neighbours"]) == 3
        assert all(by_path[p]["label"] == row["suggested_label"] for p in row["mislabel_neighbours"])
    assert df.filter(~pl.col("is_mislabel_issue"))["mislabel_neighbours"].null_count() == len(df) - len(flagged)


def test_rerun_reuses_the_scores_instead_of_refitting(tmp_path, monkeypatch):
    import curator.mislabels

    root = tmp_path / "raw"
    shutil.copytree(SAMPLE, root)
    settings = CleanSettings(root=root, workspace=tmp_path / "ws", group_pattern=r"^([^_]+)_", workers=1)
    first = clean(settings).manifest
    assert list((tmp_path / "ws" / "cache").rglob("mislabels-*.npz"))

    def refit(*args, **kwargs):
        raise AssertionError("the probe was refit on an unchanged collection")

    monkeypatch.setattr(curator.mislabels, "score_mislabels", refit)
    assert clean(settings).manifest.equals(first)
