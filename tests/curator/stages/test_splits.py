from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from curator.cli import app
from curator.core import manifest
from curator.core.errors import ManifestError, UsageError
from curator.core.neighbours import (
    Neighbourhood,
    UnitRows,
    knn,
    normalise,
    synthetic_embeddings,
)
from curator.stages import splits as splits_module
from curator.stages.clean import CleanSettings, clean
from curator.stages.duplicates import DuplicateSettings
from curator.stages.planting import KINDS, plant_tree
from curator.stages.splits import (
    LEAK_K,
    SPLITS,
    LeakError,
    SplitSettings,
    assign_parts,
    balance_weights,
    certify,
    cross_split_pairs,
    leak_candidates,
    make_splits,
)
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
    defaults = DuplicateSettings()  # the thresholds clean would have used: they catch the copies it kept here
    off = make_splits(copies_kept, SplitSettings(respect_groups=False, seed=1), defaults)
    df = off.frame
    assert df.filter(pl.col("path").str.contains("__copy-")).height >= 10  # most copies are kept rows here
    assert off.report["certificate"]["pairs_above_cosine_or_phash"] > 0
    assert off.report["certificate"]["min_cross_split_phash_distance"] <= 4
    assert off.report["certificate"]["thresholds_from"] == "given"
    on = make_splits(copies_kept, SplitSettings(seed=1), defaults)
    assert on.report["certificate"]["pairs_above_cosine_or_phash"] == 0
    blind = make_splits(copies_kept, SplitSettings(seed=1))  # without `defaults`: the thresholds clean ran with
    assert blind.report["certificate"]["phash_radius"] == 0
    assert blind.report["certificate"]["thresholds_from"] == "settings.json"


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


BAD_SETTINGS = {
    "nan-ratio": {"ratios": (float("nan"), 0.1, 0.1)},
    "inf-ratio": {"ratios": (float("inf"), 0.1, 0.1)},
    "negative-ratio": {"ratios": (1.2, -0.1, -0.1)},
    "zero-sum": {"ratios": (0.0, 0.0, 0.0)},
    "two-ratios": {"ratios": (0.5, 0.5)},
    "text-ratio": {"ratios": ("0.8", 0.1, 0.1)},
    "cap-zero": {"balance": "cap:0"},
    "cap-negative": {"balance": "cap:-1"},
    "cap-text": {"balance": "cap:abc"},
    "cap-empty": {"balance": "cap:"},
    "bad-regex": {"group_pattern": "^([^_]+_"},
    "empty-regex": {"group_pattern": ""},
    "one-fold": {"folds": 1},
    "negative-folds": {"folds": -3},
    "fractional-folds": {"folds": 2.5},
}


@pytest.mark.parametrize("kwargs", list(BAD_SETTINGS.values()), ids=list(BAD_SETTINGS))
def test_settings_refuse_bad_input_in_one_line(kwargs):
    with pytest.raises(UsageError) as refused:
        SplitSettings(**kwargs)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("--")


BAD_ARGS = {
    "nan-ratio": ["--ratios", "nan,0.1,0.1"],
    "inf-ratio": ["--ratios", "inf,0.1,0.1"],
    "negative-ratio": ["--ratios", "1.2,-0.1,-0.1"],
    "zero-ratios": ["--ratios", "0,0,0"],
    "cap-zero": ["--balance", "cap:0"],
    "cap-negative": ["--balance", "cap:-1"],
    "cap-text": ["--balance", "cap:abc"],
    "bad-regex": ["--group-pattern", "(["],
    "one-fold": ["--folds", "1"],
    "more-folds-than-groups": ["--folds", "500"],
}


@pytest.mark.parametrize("args", list(BAD_ARGS.values()), ids=list(BAD_ARGS))
def test_cli_refuses_bad_input_with_one_line_and_exit_2(workspace, args):
    before = (workspace / "manifest.parquet").read_bytes()
    result = CliRunner().invoke(app, ["split", "--workspace", str(workspace), *args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert result.output.startswith("error:")
    assert (workspace / "manifest.parquet").read_bytes() == before


@pytest.fixture
def ws_copy(workspace, tmp_path):
    copy = tmp_path / "ws"
    shutil.copytree(workspace, copy)
    return copy


def test_wrong_column_types_in_the_manifest_are_one_line(ws_copy):
    path = ws_copy / manifest.MANIFEST_NAME
    df, meta = manifest.read(path), manifest.read_metadata(path)
    meta.pop("schema_version")
    manifest.write_atomic(df.with_columns(pl.col("bytes").cast(pl.String)), path, meta)
    with pytest.raises(ManifestError, match="bytes is String"):
        make_splits(ws_copy)
    result = CliRunner().invoke(app, ["split", "--workspace", str(ws_copy)])
    assert result.exit_code == 1 and "bytes" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def _cache_files(ws):
    meta = manifest.read_metadata(ws / manifest.MANIFEST_NAME)
    directory = ws / "cache" / "embeddings"
    return directory / f"{meta['backbone_key']}.emb", directory / f"{meta['backbone_key']}.json"


def test_no_certificate_from_nan_vectors(ws_copy):
    emb, meta_path = _cache_files(ws_copy)
    dim = json.loads(meta_path.read_text())["dim"]
    with open(emb, "r+b") as fh:  # every cached vector gets a NaN: none of them may reach the certificate
        for record in range(emb.stat().st_size // (32 + 2 * dim)):
            fh.seek(record * (32 + 2 * dim) + 32 + 10)
            fh.write(np.float16(np.nan).tobytes())
    splits = ws_copy / "splits.parquet"
    before, splits_before = emb.read_bytes(), splits.read_bytes() if splits.exists() else None
    with pytest.raises(UsageError, match=r"no usable cached embedding .* run `curator clean` again"):
        make_splits(ws_copy)
    result = CliRunner().invoke(app, ["split", "--workspace", str(ws_copy)])
    assert result.exit_code == 2 and "no usable cached embedding" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert emb.read_bytes() == before and (splits.read_bytes() if splits.exists() else None) == splits_before


def test_tampered_cache_width_is_refused_never_truncated(ws_copy):
    emb, meta_path = _cache_files(ws_copy)
    before = emb.read_bytes()
    meta = json.loads(meta_path.read_text())
    for tampered in ({**meta, "dim": meta["dim"] - 7},
                     {**meta, "dim": 1000, "layout": {"pooled": [0, 500], "stats": [500, 1000]}}):
        meta_path.write_text(json.dumps(tampered))
        result = CliRunner().invoke(app, ["split", "--workspace", str(ws_copy)])
        assert result.exit_code == 2 and "unusable" in result.output and "curator clean" in result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert emb.read_bytes() == before


def test_file_names_the_group_pattern_misses_are_counted(workspace):
    result = make_splits(workspace, SplitSettings(group_pattern=r"^(?:rembrandt|katsushika-hokusai|[a-g][^_]*)_"))
    assert len(result.warnings) == 1 and "matched no group in" in result.warnings[0]
    assert result.report["warnings"] == result.warnings


def _greedy_one_by_one(labels, units, ratios, seed):
    """The placement before vectorisation: every unit, singletons included, placed in turn (no repair pass)."""
    classes, y = np.unique(labels, return_inverse=True)
    target = np.outer(np.asarray(ratios), np.bincount(y, minlength=len(classes)))
    have = np.zeros_like(target)
    unit_ids, unit_of_row = np.unique(units, return_inverse=True)
    content = np.zeros((len(unit_ids), len(classes)))
    np.add.at(content, (unit_of_row, y), 1)
    order = np.lexsort((np.random.default_rng(seed).random(len(unit_ids)), -content.sum(axis=1)))
    part_of_unit = np.zeros(len(unit_ids), dtype=np.int64)
    for u in order:
        fill = ((have + content[u]) / np.maximum(target, 1e-9)) @ (content[u] / content[u].sum())
        part_of_unit[u] = int(np.argmin(fill))
        have[part_of_unit[u]] += content[u]
    return part_of_unit[unit_of_row]


def test_vectorised_singleton_placement_equals_placing_one_by_one():
    rng = np.random.default_rng(3)
    for trial in range(12):
        n = int(rng.integers(200, 2000))
        labels = rng.integers(0, int(rng.integers(2, 9)), n).astype(str)
        units = np.where(rng.random(n) < 0.4, rng.integers(0, n // 8, n), np.arange(n) + n)  # groups + singletons
        ratios = [0.7, 0.15, 0.15] if trial % 2 else [0.25] * 4
        assert (assign_parts(labels, units, ratios, trial) == _greedy_one_by_one(labels, units, ratios, trial)).all()


def _leaky_rows(n: int = 3000, dim: int = 64):
    """Real-like embeddings with planted near-copies, a clump of 41 near-identical rows (more than the graph's
    `LEAK_K` neighbours a row), random pHashes with one planted near pair, and a random split."""
    data = synthetic_embeddings(n, dim=dim, seed=1, duplicate_share=0.02)
    emb = data["vectors"]
    rng = np.random.default_rng(0)
    emb[1:41] = normalise(emb[0] + 0.02 * rng.standard_normal((40, dim)).astype(np.float32))
    phash = rng.integers(0, 2**63, n, dtype=np.uint64)
    phash[100] = phash[200] ^ np.uint64(0b10110)  # 3 bits apart
    split = rng.choice(np.array(list(SPLITS)), n)
    split[100], split[200] = "train", "test"
    return emb, phash, split, data["planted"]


def test_graph_path_finds_the_same_leaks_as_the_exact_search():
    emb, phash, split, planted = _leaky_rows()
    exact_report, exact = cross_split_pairs(emb, phash, split, 0.95, 8)
    forced = leak_candidates(emb, phash, 0.95, 8, exact_limit=100)  # the compressed graph path on 3,000 rows
    assert not forced.exact and forced.graph.k == LEAK_K
    assert ((forced.graph.sims >= 0.95).all(axis=1)).sum() >= 41  # the clump's rows need the exact re-search
    graph_report, leaks = certify(forced, split)
    assert [tuple(p) for p in leaks.tolist()] == exact
    assert len(exact) >= 400 and exact_report["search"] == "exact (flat)"
    assert graph_report["max_cross_split_cosine"] == exact_report["max_cross_split_cosine"]
    assert (100, 200) in exact and graph_report["min_cross_split_phash_distance"] == 3
    unit = normalise(emb)
    close = (unit[planted[:, 0]] * unit[planted[:, 1]]).sum(axis=1) >= 0.95
    crossing = [tuple(sorted(p)) for p in planted[close].tolist() if split[p[0]] != split[p[1]]]
    assert len(crossing) >= 10 and set(crossing) <= set(exact)  # every close planted copy in another split leaks


def test_a_planted_leak_is_found_in_a_neighbourhood_above_the_exact_limit():
    emb, phash, split, planted = _leaky_rows(n=2500)
    original, copy = (int(x) for x in planted[0])
    split = np.full(len(emb), "train")
    split[copy] = "val"  # only this copy is apart from its original
    store = UnitRows(len(emb), emb.shape[1])
    store.put(0, emb)
    space = Neighbourhood(store.rows, knn(store, LEAK_K, exact_limit=100), None, store)
    report, leaks = certify(leak_candidates(space, phash, 0.95, 8, exact_limit=100), split)
    assert (min(original, copy), max(original, copy)) in [tuple(p) for p in leaks.tolist()]
    assert report["max_cross_split_cosine"] >= 0.95 and "neighbour graph" in report["search"]
    assert report["min_cross_split_phash_distance_exact"] is False  # more than the radius is all that is known


def _with_recorded(ws, **duplicates):
    path = ws / "settings.json"
    recorded = json.loads(path.read_text())
    recorded["duplicates"].update(duplicates)
    path.write_text(json.dumps(recorded))


def test_certificate_uses_the_thresholds_clean_recorded(ws_copy):
    default = make_splits(ws_copy, SplitSettings(seed=4)).report
    _with_recorded(ws_copy, phash_radius=3, embed_relative=0.25)
    recorded = make_splits(ws_copy, SplitSettings(seed=4)).report
    assert default["certificate"]["thresholds_from"] == "settings.json"
    assert recorded["duplicate_thresholds"] == {"phash_radius": 3, "embed_relative": 0.25, "embed_neighbours": 8}
    assert recorded["certificate"]["phash_radius"] == 3 and default["certificate"]["phash_radius"] == 8
    gap_default = 1 - default["certificate"]["cosine_threshold"]
    assert (1 - recorded["certificate"]["cosine_threshold"]) == pytest.approx(gap_default / 2, abs=2e-4)


@pytest.mark.parametrize("damage", ["missing", "not-json", "text-radius", "no-duplicates"])
def test_missing_or_damaged_recorded_thresholds_are_one_line(ws_copy, damage):
    path = ws_copy / "settings.json"
    if damage == "missing":
        path.unlink()
    elif damage == "not-json":
        path.write_text("{oops")
    elif damage == "text-radius":
        _with_recorded(ws_copy, phash_radius="eight")
    else:
        path.write_text(json.dumps({"root": "x"}))
    with pytest.raises(ManifestError, match="run `curator clean` again"):
        make_splits(ws_copy)
    result = CliRunner().invoke(app, ["split", "--workspace", str(ws_copy)])
    assert result.exit_code == 1 and "settings.json" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.fixture
def leaky_copy(copies_kept, tmp_path, monkeypatch):
    """The workspace whose copies clean kept, recorded as if clean had used the default thresholds (which catch
    them), with one placement round only, so that leaks remain after the rounds."""
    ws = tmp_path / "leaky"
    shutil.copytree(copies_kept, ws, ignore=shutil.ignore_patterns("splits.parquet", "split_report.json"))
    _with_recorded(ws, phash_radius=8, embed_relative=0.5)
    monkeypatch.setattr(splits_module, "MAX_ROUNDS", 1)
    return ws


def test_split_with_leaks_left_fails_loudly_and_writes_nothing(leaky_copy):
    with pytest.raises(LeakError, match=r"^\d+ near-duplicate pairs still cross the splits after 1 rounds"):
        make_splits(leaky_copy, SplitSettings(seed=1, use_groups=False))
    result = CliRunner().invoke(app, ["split", "--workspace", str(leaky_copy), "--seed", "1", "--no-groups"])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert "still cross the splits" in result.output and "--allow-leaks" in result.output
    assert not (leaky_copy / "splits.parquet").exists() and not (leaky_copy / "split_report.json").exists()


def test_allow_leaks_writes_the_split_and_says_how_many(leaky_copy):
    result = CliRunner().invoke(app, ["split", "--workspace", str(leaky_copy), "--seed", "1", "--no-groups",
                                      "--allow-leaks"])
    assert result.exit_code == 0, result.output
    report = json.loads((leaky_copy / "split_report.json").read_text())
    leaks = report["certificate"]["pairs_above_cosine_or_phash"]
    assert leaks > 0 and len(report["leaks"]) == leaks and f"{leaks} near-duplicate pairs cross" in result.output
    split_of = dict(pl.read_parquet(leaky_copy / "splits.parquet").select("path", "split").iter_rows())
    assert all(split_of[a] != split_of[b] for a, b in report["leaks"])
