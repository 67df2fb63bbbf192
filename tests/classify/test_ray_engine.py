"""`classify dir --engine ray`: the local engine's rows from Ray Data, shards that survive a killed driver or actor.

The Ray tests share one local Ray (2 CPUs, no dashboard) started by a module fixture and shut down after; they are
skipped with a reason where the ray extra is not installed. The checks of options and of the missing extra run
without starting Ray.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from classify.cli import app
from classify.predict import PredictSettings, classify_dir
from classify.ray_engine import classify_dir_ray
from curator.core.errors import UsageError
from curator.core.images import scan
from curator.embedding.ray_embed import INSTALL_HINT, RaySettings
from tests.conftest import REPO, SAMPLE, sample_paintings, write_odd_tree
from tests.curator.embedding.test_ray_embed import kill_when, one_line_error

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="the ray extra is not installed (pip install 'atelier[ray]')")


# --- without starting Ray ---------------------------------------------------------------------------------------


def test_without_the_extra_engine_ray_says_how_to_install_it(monkeypatch, small_tree, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as without the extra
    out = tmp_path / "p.parquet"
    result = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(out), "--engine", "ray"])
    assert one_line_error(result) == f"error: {INSTALL_HINT}"
    assert not out.exists() and not (tmp_path / "p.parquet.parts").exists()
    with pytest.raises(UsageError, match=r"pip install 'atelier\[ray\]'"):
        classify_dir_ray(small_tree, out)


@pytest.mark.parametrize("args, fragment", [
    (["--engine", "dask"], "unknown --engine 'dask'"),
    (["--address", "ray://head:10001"], "--address is for --engine ray"),
    (["--concurrency", "3"], "--concurrency is for --engine ray"),
])
def test_engine_options_are_checked_before_anything_is_written(args, fragment, small_tree, tmp_path):
    out = tmp_path / "p.parquet"
    result = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(out), *args])
    assert fragment in one_line_error(result)
    assert not out.exists() and not (tmp_path / "p.parquet.parts").exists()


@needs_ray
@pytest.mark.parametrize("args, fragment", [
    (["--workers", "2"], "leave --workers out"),
    (["--gpu-decode"], "--gpu-decode is the local engine's"),
    (["--address", "two words"], "--address must be auto"),
    (["--num-gpus-per-worker", "-0.5"], "--num-gpus-per-worker must be 0 or more"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_options_with_engine_ray_are_one_line_exit_2(args, fragment, small_tree, tmp_path):
    out = tmp_path / "p.parquet"
    result = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(out), "--engine", "ray", *args])
    assert fragment in one_line_error(result)
    assert not out.exists() and not (tmp_path / "p.parquet.parts").exists()


@needs_ray
def test_an_unreachable_cluster_is_one_line_and_leaves_nothing(small_tree, tmp_path):
    out = tmp_path / "p.parquet"
    result = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(out), "--engine", "ray", "--address",
                                      "127.0.0.1:1"])
    assert one_line_error(result).startswith("error: cannot reach a Ray cluster at 127.0.0.1:1: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [small_tree.name]  # no OUT, no OUT.parts


# --- on a local Ray ---------------------------------------------------------------------------------------------


def messy_sample(base: Path, every: int = 1) -> Path:
    """data/sample (every `every`-th painting) with the safe loader's odd and corrupt files, a FIFO, a link to a
    file outside the folder and a name that is not UTF-8."""
    root = base / "raw"
    write_odd_tree(root)
    for p in sorted(SAMPLE.rglob("*.jpg"))[::every]:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    os.mkfifo(root / "Rococo" / "fifo.jpg")
    (base / "outside.jpg").write_bytes(sample_paintings(1)[0].read_bytes())
    os.symlink(base / "outside.jpg", root / "Rococo" / "outside_link.jpg")
    with open(os.path.join(os.fsencode(root / "Baroque"), b"caf\xe9.jpg"), "wb") as fh:
        fh.write(sample_paintings(2)[1].read_bytes())
    return root


EXACT = ["path", "path_escaped", "predicted", "pred_top_classes", "error", "model"]


def assert_same_rows(ray_rows: pl.DataFrame, local_rows: pl.DataFrame) -> None:
    """Row for row (as sets of paths): names, labels, top-k labels, errors and model equal; scores and embeddings
    within float16 tolerance."""
    a, b = ray_rows.sort("path"), local_rows.sort("path")
    assert a.columns == b.columns
    assert a.select(EXACT).equals(b.select(EXACT))
    for column in ("confidence", "pred_top_scores", *(["embedding"] if "embedding" in a.columns else [])):
        x = np.array(a[column].drop_nulls().to_list(), dtype=np.float32)
        y = np.array(b[column].drop_nulls().to_list(), dtype=np.float32)
        assert x.shape == y.shape
        assert np.allclose(x, y, rtol=1e-3, atol=1e-3), column


@needs_ray
@pytest.mark.slow
def test_rows_equal_the_local_engines_on_the_sample_and_damaged_files(local_ray, tmp_path):
    root = messy_sample(tmp_path)
    settings = PredictSettings(embeddings=True, batch_size=16)
    local = classify_dir(root, tmp_path / "local.parquet", PredictSettings(embeddings=True, batch_size=16, workers=0))
    result = classify_dir_ray(root, tmp_path / "ray.parquet", settings, RaySettings(concurrency=1))
    ray_rows, local_rows = pl.read_parquet(result.out), pl.read_parquet(local.out)
    assert ray_rows["path"].to_list() == local_rows["path"].to_list()  # one fresh run: listing order
    assert_same_rows(ray_rows, local_rows)
    assert pq.read_schema(result.out).names == pq.read_schema(local.out).names
    assert (result.files, result.errors, result.predicted) == (local.files, local.errors, local.predicted)
    assert result.files == len(scan(root)) and local_rows["path_escaped"].sum() == 1
    errors = dict(zip(ray_rows["path"], ray_rows["error"]))
    assert "not a regular file: a FIFO" in errors["Rococo/fifo.jpg"]
    assert "outside the scanned folder" in errors["Rococo/outside_link.jpg"]
    assert "truncated JPEG" in errors["Rococo/truncated.jpg"]
    assert not (tmp_path / "ray.parquet.parts").exists()


@needs_ray
def test_cli_engine_ray_and_a_finished_run_reused(local_ray, small_tree, tmp_path):
    out = tmp_path / "p.parquet"
    args = ["dir", str(small_tree), "--out", str(out), "--engine", "ray", "--concurrency", "1", "--batch-size", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "engine ray: 1 model actors (0 GPU each), batch 4, 1 shards of up to 2048 files" in result.output
    rows = pl.read_parquet(out)
    assert rows.height == 8 and rows["error"].null_count() == 8 and rows["path"].n_unique() == 8
    assert not (tmp_path / "p.parquet.parts").exists()
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0 and "already complete" in again.output
    assert "exists; pass --resume" in one_line_error(CliRunner().invoke(app, args))
    local = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(out), "--resume"])
    assert "made by another run (different engine)" in one_line_error(local)


@needs_ray
@pytest.mark.slow
def test_a_trained_model_gives_the_local_engines_rows(local_ray, sample_ws, small_tree, tmp_path):
    from classify.train import TrainSettings, train

    run = train(sample_ws / "splits.parquet", tmp_path / "run",
                TrainSettings(model="efficientnet_lite0", epochs=0, workers=0, probe_l2=(1e-2,), probe_steps=50))
    settings = dict(model=str(run.run_dir), embeddings=True, top_k=3, batch_size=4)
    local = classify_dir(small_tree, tmp_path / "local.parquet", PredictSettings(**settings, workers=0))
    result = classify_dir_ray(small_tree, tmp_path / "ray.parquet", PredictSettings(**settings),
                              RaySettings(concurrency=1))
    rows = pl.read_parquet(result.out)
    assert set(rows["predicted"]) <= set(run.classes) and rows["model"][0].startswith("run (efficientnet_lite0")
    assert_same_rows(rows, pl.read_parquet(local.out))


DRIVER = """
import sys
from classify.predict import PredictSettings
from classify.ray_engine import classify_dir_ray
from curator.embedding.ray_embed import RaySettings
classify_dir_ray(sys.argv[1], sys.argv[2], PredictSettings(batch_size=4, flush_every=8, resume=True),
                 RaySettings(address=sys.argv[3], concurrency=1))
"""


@needs_ray
@pytest.mark.slow
def test_a_driver_killed_mid_run_then_resume_gives_every_row_once(local_ray, tmp_path):
    root = messy_sample(tmp_path, every=4)
    out, parts = tmp_path / "ray.parquet", tmp_path / "ray.parquet.parts"
    address = local_ray.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(root), str(out), address], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(parts.glob("part-*.parquet")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = sorted(parts.glob("part-*.parquet"))
    assert finished and not out.exists(), "the driver was not killed mid-run"
    kept = sum(pq.read_metadata(f).num_rows for f in finished)
    refused = CliRunner().invoke(app, ["dir", str(root), "--out", str(out), "--engine", "ray"])
    assert "holds an interrupted run; pass --resume" in one_line_error(refused)
    result = classify_dir_ray(root, out, PredictSettings(batch_size=4, flush_every=8, resume=True),
                              RaySettings(concurrency=1))
    assert result.resumed_rows == kept and result.files == len(scan(root))
    local = classify_dir(root, tmp_path / "local.parquet", PredictSettings(batch_size=4, workers=0))
    rows = pl.read_parquet(out)
    assert rows["path"].n_unique() == rows.height == result.files
    assert_same_rows(rows, pl.read_parquet(local.out))
    assert not parts.exists()


@needs_ray
@pytest.mark.slow
def test_an_actor_killed_mid_run_still_gives_every_row_once(local_ray, tmp_path):
    root = messy_sample(tmp_path, every=3)
    out, parts = tmp_path / "ray.parquet", tmp_path / "ray.parquet.parts"
    settings = PredictSettings(batch_size=4, flush_every=8, resume=True)
    killed: list[int] = []
    watcher = kill_when(lambda: any(parts.glob("part-*.parquet")), "_ClassifyActor", killed)
    try:
        result = classify_dir_ray(root, out, settings, RaySettings(concurrency=1))
    except Exception as exc:  # noqa: BLE001 - Ray gave up on the task: --resume finishes the run
        assert "\n" not in str(exc) and "--resume" in str(exc), exc
        result = classify_dir_ray(root, out, settings, RaySettings(concurrency=1))
    watcher.join(1)
    assert killed, "no actor was killed: the run ended before the watcher saw the first part"
    rows = pl.read_parquet(out)
    assert rows["path"].n_unique() == rows.height == result.files == len(scan(root))
    local = classify_dir(root, tmp_path / "local.parquet", PredictSettings(batch_size=4, workers=0))
    assert_same_rows(rows, pl.read_parquet(local.out))
