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
    estimate_text,
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
#: An atypical but correctly filed work: a woodcut-looking image filed as Baroque under Rembrandt's name, so that the
#: probe and the other artists' neighbours say Ukiyo_e while Rembrandt's 12 other works (all Baroque) back the label.
ATYPICAL = ("Ukiyo_e/kitagawa-utamaro_courtesan-karakot.jpg", "Baroque/rembrandt_courtesan-karakot.jpg")


def swapped_paths() -> list[str]:
    return [f"{wrong}/{rel.split('/')[-1]}" for rel, wrong in SWAPS.items()]


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    """The sample with 6 swapped labels and one atypical Rembrandt, cleaned three times in one workspace: by the
    library (remove, the default) and by the CLI with --flag-only and --relabel (the embeddings and the scores are
    reused: only what is done with the flags differs)."""
    from typer.testing import CliRunner

    from curator.cli import app
    from curator.core import manifest

    root = tmp_path_factory.mktemp("swaps") / "raw"
    shutil.copytree(SAMPLE, root)
    for rel, wrong in SWAPS.items():
        (root / rel).rename(root / wrong / rel.split("/")[-1])
    (root / ATYPICAL[0]).rename(root / ATYPICAL[1])
    workspace = root.parent / "ws"
    result = clean(CleanSettings(root=root, workspace=workspace, group_pattern=r"^([^_]+)_", workers=1))
    runs = {"remove": result.manifest, "result": result}
    for action in ("flag-only", "relabel"):
        out = CliRunner().invoke(app, ["clean", str(root), "--out", str(workspace), "--group-pattern", r"^([^_]+)_",
                                       "--workers", "1", f"--{action}"])
        assert out.exit_code == 0, out.output
        assert "Traceback" not in out.output
        runs[action] = manifest.read(workspace)
    return runs


def test_planted_swaps_are_removed_and_the_rest_is_kept(cleaned):
    df = cleaned["remove"]
    swapped = df.filter(pl.col("path").is_in(swapped_paths()))
    others = df.filter(~pl.col("path").is_in(swapped_paths()))
    assert swapped["mislabel_score"].min() > others["mislabel_score"].quantile(0.9)
    outliers = df.filter(pl.col("mislabel_tier") == "outlier")
    assert outliers["path"].is_in(swapped_paths()).sum() >= 4  # most swaps removed ...
    assert not outliers.filter(~pl.col("path").is_in(swapped_paths())).height  # ... and nothing else
    assert df.filter(pl.col("is_mislabel_issue"))["path"].is_in(swapped_paths()).sum() == len(SWAPS)  # all flagged
    for row in outliers.iter_rows(named=True):
        assert row["status"] == "outlier" and not row["keep"] and row["is_mislabel_issue"]
        assert row["reason"].startswith(f"filed as {row['label']}; ")
        assert f"say {row['suggested_label']}" in row["reason"] and "kept for review" not in row["reason"]
        assert row["mislabel_margin"] > 0
        assert row["mislabel_group_share"] is None or row["mislabel_group_share"] < 0.5
    for row in df.filter(pl.col("mislabel_tier") == "review").iter_rows(named=True):
        assert row["status"] == "ok" and row["keep"] and row["is_mislabel_issue"]
        assert row["reason"].startswith(f"filed as {row['label']}; ") and "kept for review" in row["reason"]
    assert df.filter(pl.col("mislabel_tier").is_null())["is_mislabel_issue"].sum() == 0
    dragon = df.filter(pl.col("path") == "Baroque/katsushika-hokusai_dragon.jpg").row(0, named=True)
    assert dragon["suggested_label"] == "Ukiyo_e" and dragon["mislabel_tier"] == "outlier"
    assert "of katsushika-hokusai's 9 other works" in dragon["reason"]


def test_an_atypical_work_backed_by_its_artists_other_works_is_not_removed(cleaned):
    row = cleaned["remove"].filter(pl.col("path") == ATYPICAL[1]).row(0, named=True)
    # Rembrandt's 13 other works: 12 Baroque, and the-syndics, planted as Pointillism
    assert row["group"] == "rembrandt" and row["mislabel_group_share"] == pytest.approx(12 / 13)
    assert row["suggested_label"] == "Ukiyo_e" and row["mislabel_score"] > 0.5  # it does look like a woodcut
    assert row["keep"] and row["status"] == "ok" and row["mislabel_tier"] in (None, "review")
    assert row["mislabel_margin"] < 0  # its group does not favour Ukiyo_e
    if row["mislabel_tier"] == "review":
        assert "against it: 12 of rembrandt's 13 other works are filed as Baroque; kept for review" in row["reason"]


def test_the_noise_estimate_comes_with_an_interval(cleaned):
    from curator.embedding.embed import embedding_matrix, open_cache
    from curator.stages.mislabels import apply_mislabels

    result = cleaned["result"]
    df = result.manifest.filter(pl.col("status").is_in(["ok", "outlier"]))
    cache = open_cache(result.manifest_path.parent, result.backbone_key)
    x = embedding_matrix(cache.get(df["sha256"].to_list()), cache.layout)
    summary: dict = {}
    again, _ = apply_mislabels(df.with_columns(pl.lit("ok").alias("status"), pl.lit(True).alias("keep"),
                                               pl.lit(None, pl.String).alias("reason")), x, summary=summary)
    # the same rows, the same verdicts; 6 of about 150 labels (4%) were planted wrong
    assert again["mislabel_tier"].to_list() == df["mislabel_tier"].to_list()
    low, high = summary["noise_interval"]
    assert 0.0 <= low <= summary["noise_rate"] <= high <= 0.2 and low < 0.04 < high
    assert summary["reliable"] and summary["judged"] >= 100
    assert summary["outliers"] == (df["mislabel_tier"] == "outlier").sum()
    assert summary["review"] == (df["mislabel_tier"] == "review").sum()


def test_the_estimate_reads_the_same_in_the_cli_and_the_report():
    summary = {"noise_rate": 0.0042, "noise_interval": [0.002, 0.0071], "judged": 3030, "reliable": True}
    assert estimate_text(summary) == "estimated 0.4% of labels wrong (90% interval 0.2-0.7%)"
    assert estimate_text({**summary, "reliable": False}) == ("estimated 0.4% of labels wrong (90% interval 0.2-0.7%)"
                                                            "; too few images to trust it: nothing removed")
    assert estimate_text({}) is None and estimate_text({"noise_rate": 0.1}) is None


def test_flag_only_changes_keep_only(cleaned):
    removed, flagged = cleaned["remove"], cleaned["flag-only"]
    assert removed.drop("keep").equals(flagged.drop("keep"))
    outliers = flagged.filter(pl.col("status") == "outlier")
    assert len(outliers) > 0 and outliers["keep"].all()
    assert (outliers["mislabel_tier"] == "outlier").all()


def test_relabel_keeps_strong_cases_under_the_suggested_label(cleaned):
    df = cleaned["relabel"]
    relabelled = df.filter(pl.col("original_label").is_not_null())
    assert len(relabelled) >= 1
    for row in relabelled.iter_rows(named=True):
        assert row["label"] == row["suggested_label"] != row["original_label"]
        assert row["keep"] and row["status"] == "ok" and row["reason"].startswith("relabelled: ")
        assert row["mislabel_score"] >= MislabelSettings().relabel_min and row["mislabel_tier"] == "outlier"
    weak = df.filter((pl.col("mislabel_tier") == "outlier") & pl.col("original_label").is_null())
    assert (weak["status"] == "outlier").all() and not weak["keep"].any()
    removed = cleaned["remove"]
    assert len(relabelled) + len(weak) == (removed["mislabel_tier"] == "outlier").sum()
    review = df.filter(pl.col("mislabel_tier") == "review")  # the review tier is never relabelled
    assert review["original_label"].null_count() == len(review) and review["keep"].all()


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
    (path,) = (tmp_path / "ws" / "cache").rglob("mislabels-*.npz")
    # the sample is correctly labelled: the estimate is near zero and (almost) nothing is removed
    with np.load(path) as saved:
        meta = json.loads(str(saved["meta"]))
    assert meta["noise_rate"] <= 0.01 and meta["noise_interval"][1] <= 0.03 and meta["reliable"]
    assert (first["mislabel_tier"] == "outlier").sum() <= 2 and (first["status"] == "outlier").sum() <= 2
    assert first["is_mislabel_issue"].sum() <= 0.05 * len(first)

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
        assert (result.flagged & truth).sum() >= 0.85 * truth.sum()
        assert (result.outlier & truth).sum() >= 0.6 * truth.sum()
        assert (result.outlier & ~truth).sum() <= 0.1 * result.outlier.sum()
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

    out, _ = apply_mislabels(frame, space, MislabelSettings(neighbours=10), cache_dir=tmp_path)
    flagged = out.filter(pl.col("is_mislabel_issue"))
    assert "0.jpg" in "".join(flagged["path"].to_list())
    for row in flagged.iter_rows(named=True):
        assert 1 <= len(row["mislabel_neighbours"]) <= 3
        assert all(p.split("/")[0] == row["suggested_label"] for p in row["mislabel_neighbours"])


def test_group_shares_are_the_labels_of_the_groups_other_works():
    from curator.stages.mislabels import group_codes, group_shares

    y = np.array([0, 0, 1, 2, 0, 1, 1])
    groups = group_codes(["a", "a", "a", "b", None, "c", "c"])
    shares, others = group_shares(y, groups, 3)
    assert others.tolist() == [2, 2, 2, 0, 0, 1, 1]
    assert np.allclose(shares[0], [0.5, 0.5, 0]) and np.allclose(shares[2], [1.0, 0, 0])
    assert not shares[3].any() and not shares[4].any()  # alone in its group, or no group: no group witness
    assert np.allclose(shares[5], [0, 1, 0])
    none, zero = group_shares(y, None, 3)
    assert not none.any() and not zero.any()


def _collection(n: int = 800, seed: int = 11, per_artist: int = 16):
    """Synthetic "real-like" embeddings: 4 classes, artists of about `per_artist` works each, one class per artist."""
    from curator.core.neighbours import synthetic_embeddings

    data = synthetic_embeddings(n, dim=64, seed=seed, classes=4, per_artist=per_artist, duplicate_share=0.0)
    return data["vectors"], [str(v) for v in data["labels"]], [f"artist{g}" for g in data["groups"]]


def test_group_evidence_decides_between_removal_and_review():
    x, labels, groups = _collection()
    rng = np.random.default_rng(12)
    swapped = rng.choice(len(labels), 40, replace=False)
    for row in swapped:
        labels[row] = str((int(labels[row]) + 1) % 4)
    # an atypical work: it looks like class "2" (its embedding is a class-2 work's), filed under its artist's class
    donor = next(i for i in range(len(labels)) if labels[i] == "2" and i not in swapped)
    atypical = next(i for i in range(len(labels)) if labels[i] == "0" and i not in swapped)
    x = x.copy()
    x[atypical] = x[donor] + 0.01 * rng.normal(size=x.shape[1]).astype(np.float32)
    result = score_mislabels(x, labels, groups, MislabelSettings(neighbours=10))
    truth = np.zeros(len(labels), dtype=bool)
    truth[swapped] = True
    assert result.reliable and (result.outlier & truth).sum() >= 0.7 * len(swapped)
    assert (result.outlier & ~truth).sum() <= 2 and (result.flagged & truth).sum() >= 0.85 * len(swapped)
    assert result.suggested[atypical] == result.classes.index("2") and result.score[atypical] > 0.5
    assert not result.outlier[atypical]  # the neighbours and probe say "2", its artist's other works say "0"
    assert result.group[atypical, result.classes.index("0")] > 0.8


def test_the_noise_estimate_is_near_zero_on_a_correct_collection_and_tracks_planted_noise():
    x, labels, groups = _collection(seed=13)
    clean_result = score_mislabels(x, labels, groups, MislabelSettings(neighbours=10))
    assert clean_result.noise_rate <= 0.01 and clean_result.noise_interval[1] <= 0.02
    assert clean_result.outlier.sum() <= 1 and clean_result.flagged.sum() <= 0.05 * len(labels)
    rng = np.random.default_rng(14)
    noisy = list(labels)
    swapped = rng.random(len(labels)) < 0.1
    for row in np.flatnonzero(swapped):
        noisy[row] = str((int(noisy[row]) + 1 + rng.integers(0, 3)) % 4)
    result = score_mislabels(x, noisy, groups, MislabelSettings(neighbours=10))
    low, high = result.noise_interval
    assert low <= swapped.mean() <= high and high - low < 0.1
    assert abs(result.noise_rate - swapped.mean()) < 0.04


def test_a_small_collection_removes_nothing_and_says_why():
    from curator.stages.mislabels import apply_mislabels

    x, labels, groups = _collection(n=80, seed=15, per_artist=4)
    labels[0] = str((int(labels[0]) + 2) % 4)
    frame = pl.DataFrame({"path": [f"{v}/{i}.jpg" for i, v in enumerate(labels)], "label": labels, "group": groups,
                          "sha256": [f"{i:064x}" for i in range(80)], "status": ["ok"] * 80,
                          "reason": [None] * 80, "keep": [True] * 80}, schema_overrides={"reason": pl.String})
    summary: dict = {}
    out, notes = apply_mislabels(frame, x, MislabelSettings(neighbours=10), summary=summary)
    assert not summary["reliable"] and summary["outliers"] == 0 and summary["judged"] < 100
    assert out["keep"].all() and (out["status"] == "ok").all()
    assert out.filter(pl.col("path") == f"{labels[0]}/0.jpg")["mislabel_tier"].to_list() == ["review"]
    (note,) = [n for n in notes if "unreliable" in n]
    assert "\n" not in note and "nothing removed" in note and "kept for review" in note


@pytest.mark.parametrize("bad", [{"tau": 0.0}, {"review_recall": 1.0}, {"outlier_margin": -0.1}, {"bootstrap": -1}])
def test_bad_mislabel_settings_are_one_line_errors(bad):
    with pytest.raises(ValueError) as error:
        MislabelSettings(**bad)
    assert "\n" not in str(error.value) and next(iter(bad)) in str(error.value)
