from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest

from curator.stages.clean import CleanSettings, clean
from curator.stages.mislabels import (
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
    import curator.stages.mislabels

    root = tmp_path / "raw"
    shutil.copytree(SAMPLE, root)
    settings = CleanSettings(root=root, workspace=tmp_path / "ws", group_pattern=r"^([^_]+)_", workers=1)
    first = clean(settings).manifest
    assert list((tmp_path / "ws" / "cache").rglob("mislabels-*.npz"))

    def refit(*args, **kwargs):
        raise AssertionError("the probe was refit on an unchanged collection")

    monkeypatch.setattr(curator.stages.mislabels, "score_mislabels", refit)
    assert clean(settings).manifest.equals(first)


def slow_vote(unit: np.ndarray, y: np.ndarray, groups: np.ndarray | None, n_classes: int, k: int,
              exclude: set[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The vote as a loop over rows (the implementation before it was vectorised): exact search, skip itself, its
    own group and excluded pairs, first k voters of the 5k + 1 nearest."""
    import faiss

    n = len(unit)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit.astype(np.float32))
    sims, ids = index.search(unit.astype(np.float32), min(n, 5 * k + 1))
    shares = np.zeros((n, n_classes))
    counts = np.zeros((n, n_classes), dtype=np.int64)
    for row in range(n):
        taken = 0
        for sim, other in zip(sims[row], ids[row]):
            if other < 0 or other == row:
                continue
            if groups is not None and groups[other] == groups[row]:
                continue
            if (min(row, other), max(row, other)) in exclude:
                continue
            shares[row, y[other]] += max(float(sim), 0.0) + 1e-6
            counts[row, y[other]] += 1
            taken += 1
            if taken == k:
                break
    total = shares.sum(axis=1, keepdims=True)
    return np.where(total > 0, shares / np.maximum(total, 1e-12), 1.0 / n_classes), counts


def test_the_vectorised_vote_equals_the_row_loop():
    from curator.core.neighbours import knn, normalise
    from curator.stages.mislabels import group_codes, neighbour_labels

    rng = np.random.default_rng(5)
    n, k = 400, 6
    centres = rng.normal(size=(4, 16)) * 2
    y = rng.integers(0, 4, n)
    unit = normalise(centres[y] + rng.normal(size=(n, 16)))
    groups = group_codes([f"a{i % 23}" if i % 7 else None for i in range(n)])
    exclude = {(i, i + 1) for i in range(0, n - 1, 3)}
    graph = knn(unit, 5 * k)
    for g, ex in ((groups, exclude), (None, set()), (groups, set())):
        shares, counts = neighbour_labels(graph, y, g, 4, k, ex)
        want_shares, want_counts = slow_vote(unit, y, g, 4, k, ex)
        assert np.array_equal(counts, want_counts)
        assert np.allclose(shares, want_shares, rtol=0, atol=1e-6)  # the same votes; cosines from two searches
    # a row whose candidates are all of its own group votes with none: uniform shares, no voters
    alone = group_codes(["same"] * n)
    shares, counts = neighbour_labels(graph, y, alone, 4, k)
    assert (counts == 0).all() and np.allclose(shares, 0.25)


def test_the_vote_reads_the_shared_graph_mapped_to_the_kept_rows():
    from curator.core.neighbours import build, exact_knn, normalise
    from curator.stages.mislabels import voting_graph

    rng = np.random.default_rng(6)
    x = normalise(rng.normal(size=(500, 24)))
    x[250:300] = normalise(x[:50] + rng.normal(scale=0.01, size=(50, 24)))  # copies the duplicate stage removes
    space = build(lambda a, b: x[a:b], 500, 24, 40)
    kept = np.setdiff1d(np.arange(500), np.arange(250, 300))
    graph = voting_graph(space.subset(kept), 40)
    # rows that lost neighbours to removed copies were searched again among the kept rows: as a fresh search
    assert np.array_equal(graph.ids, exact_knn(x[kept], 40).ids)
    assert graph.exact and (graph.ids >= 0).all()


def test_the_fast_probe_for_large_collections_flags_what_the_full_probe_flags():
    from curator.core.neighbours import synthetic_embeddings

    data = synthetic_embeddings(3000, dim=256, seed=7, classes=4, per_artist=25)
    labels = [str(v) for v in data["labels"]]
    groups = [str(g) for g in data["groups"]]
    rng = np.random.default_rng(8)
    swapped = rng.choice(3000, 150, replace=False)
    for row in swapped:
        labels[row] = str((int(labels[row]) + 1 + rng.integers(0, 3)) % 4)
    settings = MislabelSettings(neighbours=10)
    full = score_mislabels(data["vectors"], labels, groups, settings)
    fast = score_mislabels(data["vectors"], labels, groups, settings, probe_limit=100)
    truth = np.zeros(3000, dtype=bool)
    truth[swapped] = True
    for result in (full, fast):
        assert (result.flagged & truth).sum() >= 0.8 * truth.sum()
        assert (result.flagged & ~truth).sum() <= 0.25 * result.flagged.sum()
    assert (fast.flagged == full.flagged).mean() > 0.97


def test_probe_training_folds_can_be_capped():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(600, 8))
    y = (x[:, 0] > 0).astype(np.int64)
    full, used = out_of_fold_probabilities(x, y, None, 2, 5, 1.0, 0)
    capped, used_capped = out_of_fold_probabilities(x, y, None, 2, 5, 1.0, 0, max_train=60)
    assert used.all() and used_capped.all()
    assert not np.allclose(full, capped)  # trained on 60 rows a fold, not 480
    assert (capped.argmax(axis=1) == y).mean() > 0.9


def test_a_large_collection_is_scored_on_the_compressed_graph_and_names_witnesses_from_it(tmp_path):
    from curator.core.neighbours import build, synthetic_embeddings

    data = synthetic_embeddings(2500, dim=128, seed=10, classes=3, per_artist=20)
    x = data["vectors"]
    space = build(lambda a, b: x[a:b], 2500, 128, 64, exact_limit=500)
    assert not space.graph.exact
    labels = [str(v) for v in data["labels"]]
    labels[0] = str((int(labels[0]) + 1) % 3)
    frame = pl.DataFrame({"path": [f"{v}/{i}.jpg" for i, v in enumerate(labels)], "label": labels,
                          "group": [str(g) for g in data["groups"]], "sha256": [f"{i:064x}" for i in range(2500)],
                          "status": ["ok"] * 2500, "reason": [None] * 2500, "keep": [True] * 2500},
                         schema_overrides={"reason": pl.String})
    from curator.stages.mislabels import apply_mislabels

    out, notes = apply_mislabels(frame, space, MislabelSettings(neighbours=10), cache_dir=tmp_path)
    flagged = out.filter(pl.col("is_mislabel_issue"))
    assert "0.jpg" in "".join(flagged["path"].to_list())
    for row in flagged.iter_rows(named=True):
        assert 1 <= len(row["mislabel_neighbours"]) <= 3
        assert all(p.split("/")[0] == row["suggested_label"] for p in row["mislabel_neighbours"])
