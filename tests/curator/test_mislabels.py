from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest

from curator.clean import CleanSettings, clean
from curator.mislabels import (
    MislabelSettings,
    cached_score,
    estimate_noise_rate,
    out_of_fold_probabilities,
    score_mislabels,
)
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


def test_single_group_class_is_left_unscored():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 8))
    y = np.repeat([0, 1, 2], 20)
    groups = np.array([f"a{i % 4}" for i in range(40)] + ["solo"] * 20, dtype=object)
    _, has_probe = out_of_fold_probabilities(x, y, groups, 3, 5, 1.0, 0)
    assert has_probe[:40].all() and not has_probe[40:].any()
    result = score_mislabels(x, [str(v) for v in y], list(groups), MislabelSettings(neighbours=5))
    assert result.unscored_classes == ["2"]
    assert result.scored[:40].all() and not result.scored[40:].any() and not result.flagged[40:].any()
    assert np.isnan(result.score[40:]).all() and np.isfinite(result.score[:40]).all()


def test_a_dominant_artist_is_unscored_but_a_stray_file_in_its_class_is_scored():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 8))
    labels = ["a"] * 20 + ["b"] * 20
    groups = [f"g{i % 5}" for i in range(20)] + ["solo"] * 17 + ["x", "y", "z"]
    result = score_mislabels(x, labels, groups, MislabelSettings(neighbours=5))
    assert result.scored[:20].all() and not result.scored[20:37].any() and result.scored[37:].all()


def test_rows_without_a_group_are_scored_as_groups_of_their_own():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 8)) * 4
    y = np.repeat([0, 1, 2], 20)
    x = centres[y] + rng.normal(size=(60, 8))
    groups: list[str | None] = [f"a{i % 6}" for i in range(60)]
    groups[5] = groups[25] = None  # names the --group-pattern did not match
    labels = [str(v) for v in y]
    labels[5] = "2"  # and one of them filed under the wrong class
    result = score_mislabels(x, labels, groups, MislabelSettings(neighbours=5))
    assert result.scored.all() and result.score[5] == result.score.max() > 0.9
    assert result.score[25] < 0.5 and result.suggested[5] == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled", "wrong-shapes", "wrong-classes", "nan"])
def test_a_damaged_score_cache_is_recomputed_with_a_warning(tmp_path, damage):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 8))
    labels = [str(v) for v in np.repeat([0, 1, 2], 10)]
    groups = [f"g{i % 5}" for i in range(30)]
    settings = MislabelSettings(neighbours=5)
    first, notes = cached_score(tmp_path, ["k"], x, labels, groups, settings)
    assert notes == []
    (path,) = tmp_path.glob("mislabels-*.npz")
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip file")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "pickled":
        np.savez(path, meta=np.array([{"a": 1}], dtype=object))
    else:
        with np.load(path) as saved:
            arrays = dict(saved)
        if damage == "wrong-shapes":
            arrays["evidence"] = arrays["evidence"][:5]
        elif damage == "wrong-classes":
            arrays["meta"] = np.array(json.dumps({"classes": ["x"], "unscored": [], "noise_rate": 0.1}))
        else:
            arrays["evidence"][0, 0] = np.nan
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
    again, notes = cached_score(tmp_path, ["k"], x, labels, groups, settings)
    assert len(notes) == 1 and "damaged" in notes[0] and "recomputed" in notes[0] and "\n" not in notes[0]
    assert np.array_equal(again.flagged, first.flagged) and np.allclose(again.evidence, first.evidence)
    assert cached_score(tmp_path, ["k"], x, labels, groups, settings)[1] == []


@pytest.fixture(scope="module")
def one_artist_classes(tmp_path_factory):
    """The sample with every Rembrandt and every Childe Hassam filed as a class of its own (one artist each), and one
    file whose name the group pattern does not match."""
    root = tmp_path_factory.mktemp("one-artist") / "raw"
    shutil.copytree(SAMPLE, root, ignore=shutil.ignore_patterns("*.md"))
    for artist in ("rembrandt", "childe-hassam"):
        (root / artist).mkdir()
        for path in list(root.rglob(f"{artist}_*.jpg")):
            path.rename(root / artist / path.name)
    (root / "Ukiyo_e" / "katsushika-hokusai_dragon.jpg").rename(root / "Ukiyo_e" / "nameless.jpg")
    settings = CleanSettings(root=root, workspace=root.parent / "ws", group_pattern=r"^([^_]+)_", workers=1)
    return settings, clean(settings)


def test_one_artist_classes_are_not_flagged_wholesale(one_artist_classes):
    _, result = one_artist_classes
    df = result.manifest
    for artist in ("rembrandt", "childe-hassam"):
        rows = df.filter(pl.col("label") == artist)
        assert len(rows) >= 13 and rows["group"].n_unique() == 1
        assert rows["is_mislabel_issue"].sum() < 0.1 * len(rows)
        assert rows["mislabel_score"].null_count() == len(rows)  # not judged: no other artist can vouch for them
    assert df["is_mislabel_issue"].sum() <= 0.15 * len(df)
    assert any("not checked for mislabels" in w and "rembrandt (13 of 13)" in w for w in result.warnings)
    nameless = df.filter(pl.col("path") == "Ukiyo_e/nameless.jpg").row(0, named=True)
    assert nameless["group"] is None and nameless["mislabel_score"] is not None


def test_a_garbage_score_cache_does_not_break_reruns(one_artist_classes):
    settings, first = one_artist_classes
    (path,) = (settings.workspace / "cache").rglob("mislabels-*.npz")
    path.write_bytes(b"garbage")
    again = clean(settings)
    assert again.manifest.equals(first.manifest)
    assert any("mislabel cache" in w and "recomputed" in w for w in again.warnings)
    assert not any("mislabel cache" in w for w in clean(settings).warnings)


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
