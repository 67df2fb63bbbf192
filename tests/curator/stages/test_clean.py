from __future__ import annotations

import json
import os
import shutil

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from curator.cli import app
from curator.core import manifest
from curator.core.images import scan
from curator.core.paths import to_text
from curator.embedding.backbones import load_backbone
from curator.embedding.embed import open_cache
from curator.stages.clean import CleanSettings, clean, later_stages
from tests.conftest import MARKER, files_containing, sample_paintings, tree_checksums

runner = CliRunner()


def test_clean_writes_one_row_per_file_and_leaves_sources_untouched(odd_tree, tmp_path):
    root, expected = odd_tree
    before = tree_checksums(root)
    result = clean(CleanSettings(root=root, workspace=tmp_path / "ws", group_pattern=r"^([^_]+)_", workers=1))
    assert tree_checksums(root) == before
    df = manifest.read(tmp_path / "ws")
    assert sorted(df["path"].to_list()) == sorted(expected)
    for row in df.iter_rows(named=True):
        status, fragment = expected[row["path"]]
        # images re-saved from one painting (CMYK, gray, 16-bit, palette, RGBA, animated, renamed) are duplicates
        assert row["status"] == status or (status, row["status"]) == ("ok", "duplicate"), row
        assert row["keep"] == (row["status"] == "ok")
        assert row["label"] == row["path"].split("/")[0]
        if fragment:
            assert fragment in row["reason"]
    derived = df.filter(pl.col("cluster").is_not_null())
    assert set(derived["path"]) == {f"Baroque/{n}" for n in (
        "cmyk.jpg", "gray.png", "sixteen_bit.png", "palette_alpha.png", "rgba.png", "animated.gif", "animated.webp",
        "名前 with space.jpeg")}
    assert derived["keep"].sum() == 1 and derived["cluster"].n_unique() == 1
    assert df.filter(pl.col("path") == "Baroque/sixteen_bit.png")["is_exact_issue"].item()  # same pixels as gray
    assert df.filter(pl.col("path") == "Baroque/UPPER CASE.JPG")["group"].item() is None
    assert df.filter(pl.col("path") == "Rococo/notes_as.png")["group"].item() == "notes"
    assert result.embed.computed == 11  # every ok image once


def test_rerun_recomputes_nothing_and_new_files_only_themselves(small_tree, tmp_path):
    ws = tmp_path / "ws"
    first = clean(CleanSettings(root=small_tree, workspace=ws, workers=1))
    assert (first.embed.computed, first.embed.reused) == (8, 0)
    again = clean(CleanSettings(root=small_tree, workspace=ws, workers=1))
    assert (again.embed.computed, again.embed.reused) == (0, 8)
    assert again.manifest.equals(first.manifest)
    for path in sample_paintings(10)[8:]:
        shutil.copy(path, small_tree / path.parent.name / path.name)
    third = clean(CleanSettings(root=small_tree, workspace=ws, workers=0))
    assert (third.embed.computed, third.embed.reused) == (2, 8)


def _calibrated_weights(name: str, path) -> None:
    """Random weights for timm model `name` with batch-norm statistics measured on sample paintings, saved as
    safetensors: features of a healthy scale (an uncalibrated random LCNet's are ~1e-7, below float16's range), so
    that the comparison below tells preprocessings apart (bilinear vs bicubic changes a third of the values)."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from curator.embedding.embed import pixel_scale

    torch.manual_seed(0)
    backbone = load_backbone(name, pretrained=False)
    model, pre = backbone.model, backbone.preprocess
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batch
    mean, std = pixel_scale(pre.mean, pre.std)
    pixels = torch.stack([torch.from_numpy(pre.pixels(Image.open(p).convert("RGB"))) for p in sample_paintings(16)])
    model.train()
    with torch.no_grad():
        model((pixels.float() - mean) / std)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


@pytest.mark.parametrize("backbone", [None, "resnet18", "lcnet_035"],
                         ids=["default", "resnet18-crop-0.95", "lcnet-bilinear"])
def test_cached_embeddings_equal_classify_dir_embeddings(small_tree, tmp_path, backbone):
    """One preprocessing path: `curator clean`'s cached embedding of a file equals `classify dir --embeddings`'s for
    the same file, to float16 precision, for the default backbone and for timm models whose data config differs
    (resnet18: crop_pct 0.95 and ImageNet's mean/std; LCNet: bilinear), with random weights given as --weights."""
    from PIL import Image

    from classify.predict import PredictSettings, classify_dir
    from curator.embedding.embed import open_cache

    big = small_tree / "Baroque" / "big.jpg"  # large enough for JPEG draft decoding, and not square
    with Image.open(sample_paintings(12)[11]) as image:
        image.convert("RGB").resize((900, 640), Image.Resampling.BICUBIC).save(big, quality=90)
    weights = None
    if backbone is not None:
        weights = tmp_path / "w.safetensors"
        _calibrated_weights(backbone, weights)
    name = backbone or "efficientnet_lite0"
    ws = tmp_path / "ws"
    clean(CleanSettings(root=small_tree, workspace=ws, backbone=name, weights=weights, dtype="fp32", workers=0))
    df = manifest.read(ws).filter(pl.col("sha256").is_not_null())
    meta = manifest.read_metadata(ws / "manifest.parquet")
    cached = open_cache(ws, meta["backbone_key"]).get(df["sha256"].to_list())
    out = tmp_path / "pred.parquet"
    classify_dir(small_tree, out, PredictSettings(backbone=name, weights=str(weights) if weights else None,
                                                  embeddings=True, dtype="fp32", workers=0, batch_size=4,
                                                  flush_every=8))
    pred = pl.read_parquet(out)
    by_path = dict(zip(pred["path"].to_list(), pred["embedding"].to_list()))
    assert len(df) == 9 and set(df["path"].to_list()) <= set(by_path)
    from_dir = np.array([by_path[p] for p in df["path"].to_list()], dtype=np.float32)
    assert from_dir.shape == cached.shape and np.isfinite(cached).all()
    np.testing.assert_allclose(from_dir.astype(np.float16).astype(np.float32), cached, rtol=2e-3, atol=1e-3)


def test_torn_cache_tail_is_cut_and_recomputed(small_tree, tmp_path):
    ws = tmp_path / "ws"
    clean(CleanSettings(root=small_tree, workspace=ws, workers=1))
    cache_file = next((ws / "cache" / "embeddings").glob("*.emb"))
    size = cache_file.stat().st_size
    with open(cache_file, "r+b") as fh:  # a run killed in the middle of writing its last record
        fh.truncate(size - 100)
    rerun = clean(CleanSettings(root=small_tree, workspace=ws, workers=1))
    assert (rerun.embed.computed, rerun.embed.reused) == (1, 7)


def test_cli_clean_prints_summary_and_manifest_path(small_tree, tmp_path):
    out = tmp_path / "ws"
    result = runner.invoke(app, ["clean", str(small_tree), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "total" in result.output and "manifest:" in result.output
    assert (out / "manifest.parquet").is_file() and (out / "settings.json").is_file()


@pytest.mark.parametrize(
    "make_root, message",
    [
        (lambda tmp: tmp / "nope", "does not exist"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "is empty"),
        (lambda tmp: ((tmp / "txt").mkdir(), (tmp / "txt" / "a.txt").write_text("x"))[0] or tmp / "txt",
         "no image files"),
    ],
)
def test_cli_clean_bad_roots_give_one_line_and_nonzero_exit(tmp_path, make_root, message):
    root = make_root(tmp_path)
    result = runner.invoke(app, ["clean", str(root), "--out", str(tmp_path / "ws")])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_bad_options_are_usage_errors(small_tree, tmp_path):
    result = runner.invoke(app, ["clean", str(small_tree), "--out", str(tmp_path / "ws"), "--device", "tpu"])
    assert result.exit_code == 2 and "unknown device" in result.output
    result = runner.invoke(app, ["clean", str(small_tree), "--group-pattern", "([", "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and "not a valid regular expression" in result.output


def test_help_explains_every_option():
    result = runner.invoke(app, ["clean", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--group-pattern", "--backbone", "--weights", "--device", "--dtype", "--batch-size",
                   "--workers"):
        assert option in result.output


def test_cli_timm_backbone_offline_without_weights_exits_2(small_tree, tmp_path, monkeypatch):
    import curator.embedding.backbones

    monkeypatch.setattr(curator.embedding.backbones, "_hub_reachable", lambda timeout=3.0: False)
    result = runner.invoke(app, ["clean", str(small_tree), "--out", str(tmp_path / "ws"), "--backbone", "resnet18"])
    assert result.exit_code == 2
    assert "cannot be reached; pass --weights FILE" in result.output
    assert "Traceback" not in result.output


def test_cli_timm_backbone_with_weights_file(small_tree, tmp_path):
    from safetensors.torch import save_file

    model = load_backbone("tf_efficientnet_lite0", pretrained=False).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    out = tmp_path / "ws"
    result = runner.invoke(app, ["clean", str(small_tree), "--out", str(out), "--backbone", "tf_efficientnet_lite0",
                                 "--weights", str(tmp_path / "w.safetensors"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert manifest.read_metadata(out / "manifest.parquet")["weights"].startswith("file:w.safetensors")


def test_a_root_of_only_broken_images_gives_rows_not_a_crash(tmp_path):
    root = tmp_path / "raw" / "A"
    root.mkdir(parents=True)
    (root / "x.jpg").write_bytes(b"garbage")
    (root / "y.png").write_bytes(b"")
    result = runner.invoke(app, ["clean", str(root.parent), "--out", str(tmp_path / "ws"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    df = manifest.read(tmp_path / "ws")
    assert df["status"].to_list() == ["corrupt", "corrupt"] and not df["keep"].any()
    assert "mislabel check skipped" in result.output


@pytest.fixture
def deadline():
    """Fail instead of hanging: a FIFO that is opened for reading would block forever."""
    import signal

    def expire(signum, frame):
        raise TimeoutError("the run hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_hostile_tree_gives_one_row_per_entry_and_leaks_nothing(hostile_tree, tmp_path, deadline):
    root, reasons = hostile_tree
    before = tree_checksums(root)
    ws, export = tmp_path / "ws", tmp_path / "export"
    result = runner.invoke(app, ["clean", str(root), "--out", str(ws), "--workers", "1", "--export", str(export)])
    assert result.exit_code == 0, result.output
    df = manifest.read(ws)
    listed = {to_text(p.relative_to(root).as_posix())[0] for p in scan(root)}
    assert sorted(df["path"]) == sorted(listed)
    for rel, fragment in reasons.items():
        row = df.row(by_predicate=pl.col("path") == rel, named=True)
        assert row["status"] == "ignored" and fragment in row["reason"] and row["sha256"] is None, row
    odd = df.row(by_predicate=pl.col("path_escaped"), named=True)
    assert (odd["path"], odd["label"], odd["status"]) == ("Rococo/caf\\xe9_non-utf8.jpg", "Rococo", "ok")
    assert df.filter(pl.col("path") == "Baroque/inside_link.jpg")["status"].item() in ("ok", "duplicate")
    assert files_containing(ws, MARKER) == [] and files_containing(export, MARKER) == []
    assert tree_checksums(root) == before
    exported = {p.relative_to(export) for p in export.rglob("*") if p.is_file() or p.is_symlink()}
    assert not any((export / p).is_symlink() for p in exported)
    assert os.path.join(os.fsencode(export), b"Rococo", b"caf\xe9_non-utf8.jpg") in {
        os.fsencode(export / p) for p in exported}
    again = clean(CleanSettings(root=root, workspace=ws, workers=0))  # escaped rows are read back on a rerun
    assert again.embed.computed == 0 and again.manifest.equals(df)


def _one_line_exit_2(result) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_folders_atelier_did_not_write_are_refused_and_left_byte_identical(small_tree, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.parquet").write_bytes(b"the user's own table")
    (mine / "report.html").write_text("the user's page")
    before = tree_checksums(mine)
    _one_line_exit_2(runner.invoke(app, ["clean", str(small_tree), "--out", str(mine)]))
    _one_line_exit_2(runner.invoke(app, ["clean", str(small_tree), "--out", str(tmp_path / "ws"),
                                         "--export", str(mine)]))
    assert tree_checksums(mine) == before
    result = runner.invoke(app, ["clean", str(small_tree), "--out", str(tmp_path / "ws"),
                                 "--export", str(tmp_path / "ws")])
    _one_line_exit_2(result)
    assert "is the workspace" in result.output
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(app, ["clean", str(small_tree), "--out", str(tmp_path / "afile")])
    _one_line_exit_2(result)
    assert "is a file" in result.output


def test_out_equal_to_the_root_says_what_is_wrong(small_tree):
    result = runner.invoke(app, ["clean", str(small_tree), "--out", str(small_tree)])
    _one_line_exit_2(result)
    assert "is the folder being cleaned" in result.output


def test_names_the_group_pattern_misses_get_a_null_group_and_a_counted_warning(small_tree, tmp_path):
    result = clean(CleanSettings(root=small_tree, workspace=tmp_path / "ws", group_pattern=r"^([a-f][^_-]*)-",
                                 workers=0))
    grouped = result.manifest["group"].is_not_null().sum()
    missed = len(result.manifest) - grouped
    assert 0 < missed < len(result.manifest)
    assert any(f"matched no group in {missed} of {len(result.manifest)}" in w for w in result.warnings)


def test_outputs_are_written_with_the_users_umask(small_tree, tmp_path):
    old = os.umask(0o027)
    try:
        clean(CleanSettings(root=small_tree, workspace=tmp_path / "ws", workers=0))
    finally:
        os.umask(old)
    for name in ("manifest.parquet", "settings.json", "report.html"):
        assert (tmp_path / "ws" / name).stat().st_mode & 0o777 == 0o640, name


def test_later_stages_on_the_embedding_store_give_the_manifest_clean_wrote(small_tree, tmp_path):
    ws = tmp_path / "ws"
    result = clean(CleanSettings(root=small_tree, workspace=ws, workers=1))
    written = manifest.read(ws)
    stage1 = written.select(*manifest.schema(), "path_escaped", *manifest.STATS_COLUMNS)
    meta = manifest.read_metadata(ws / manifest.MANIFEST_NAME)
    cache = open_cache(ws, meta["backbone_key"], meta["feature_layout"])
    later = later_stages(stage1, cache, meta["feature_layout"], CleanSettings(root=small_tree, workspace=ws),
                         tmp_path / "scores")
    assert manifest.validate(later.frame).equals(written)
    assert later.pairs.equals(result.pairs)
    assert set(later.timings) == {"quality", "neighbours", "duplicates", "mislabels"}
    ok = (written["status"] == "ok").to_numpy()
    assert later.ok_rows.tolist() == np.flatnonzero(ok).tolist() and later.vectors.shape[0] == ok.sum()
    assert later.quality == json.loads((ws / "settings.json").read_text())["quality"]["thresholds"]
