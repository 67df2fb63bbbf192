from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
from typer.testing import CliRunner

from classify.cli import app
from classify.predict import PredictSettings, classify_dir
from classify.train import TrainSettings, train
from curator.errors import UsageError
from curator.images import iter_files, scan
from tests.conftest import REPO, SAMPLE, write_odd_tree


def test_one_row_per_file_with_the_loaders_reasons(tmp_path):
    root = tmp_path / "raw"
    expected = write_odd_tree(root)
    result = classify_dir(root, tmp_path / "p.parquet", PredictSettings(workers=1, batch_size=4, flush_every=8))
    df = pl.read_parquet(result.out)
    assert sorted(df["path"].to_list()) == sorted(expected)
    assert df["path"].n_unique() == df.height == len(expected) == result.files
    for row in df.iter_rows(named=True):
        status, fragment = expected[row["path"]]
        if status == "ok":
            assert row["error"] is None and row["label"] is not None, row
            assert len(row["topk_labels"]) == 5 and row["topk_scores"][0] == pytest.approx(row["confidence"])
            assert row["topk_scores"] == sorted(row["topk_scores"], reverse=True)
        else:
            assert fragment in row["error"] and row["label"] is None and row["topk_labels"] is None, row
    assert result.errors == sum(1 for s, _ in expected.values() if s != "ok")
    assert not (tmp_path / "p.parquet.parts").exists()


def test_imagenet_names_without_a_model(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("coffee.jpg", "chelsea.jpg"):
        shutil.copy(REPO / "tests" / "data" / name, root / name)
    df = pl.read_parquet(classify_dir(root, tmp_path / "p.parquet", PredictSettings(workers=0)).out)
    labels = dict(zip(df["path"], df["label"]))
    assert labels["coffee.jpg"] == "espresso"
    assert "cat" in labels["chelsea.jpg"]


def test_lazy_listing_matches_the_scan_order(tmp_path):
    root = tmp_path / "t"
    for rel in ("b/img10.jpg", "b/img2.jpg", "a.jpg", "a/x1.jpg", "A2/z.png", "c10/q.jpg", "c9/q.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    assert list(iter_files(root)) == scan(root)


KILL_SCRIPT = """
import sys
from classify.predict import PredictSettings, classify_dir
classify_dir(sys.argv[1], sys.argv[2], PredictSettings(workers=0, batch_size=4, flush_every=8, resume=True,
             embeddings=True))
"""


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    root = tmp_path / "paintings"
    for p in sorted(SAMPLE.rglob("*.jpg"))[::4]:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    (root / "Baroque" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    n_files = len(scan(root))
    settings = PredictSettings(workers=0, batch_size=4, flush_every=8, embeddings=True)
    whole = pl.read_parquet(classify_dir(root, tmp_path / "whole.parquet", settings).out)
    out = tmp_path / "killed.parquet"
    parts = tmp_path / "killed.parquet.parts"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    flushed = pl.concat([pl.read_parquet(p) for p in sorted(parts.glob("part-*.parquet"))])
    assert 0 < flushed.height < n_files and flushed.height % 8 == 0
    with pytest.raises(UsageError, match="interrupted run"):
        classify_dir(root, out, settings)
    resumed = classify_dir(root, out, PredictSettings(workers=0, batch_size=4, flush_every=8, embeddings=True,
                                                      resume=True))
    assert resumed.resumed_rows == flushed.height
    final = pl.read_parquet(out)
    assert final.height == n_files and final["path"].n_unique() == n_files
    assert final.equals(whole)


def test_existing_output_is_an_error_not_an_overwrite(tmp_path, small_tree):
    out = tmp_path / "p.parquet"
    out.write_bytes(b"precious")
    with pytest.raises(UsageError, match="exists"):
        classify_dir(small_tree, out, PredictSettings(workers=0))
    assert out.read_bytes() == b"precious"
    with pytest.raises(UsageError, match="not a folder"):
        classify_dir(tmp_path / "nowhere", tmp_path / "q.parquet", PredictSettings(workers=0))


def test_model_checkpoint_class_names_and_embedding_width(sample_ws, small_tree, tmp_path):
    run = train(sample_ws / "splits.parquet", tmp_path / "run",
                TrainSettings(model="efficientnet_lite0", epochs=0, workers=0, probe_l2=(1e-2,), probe_steps=50))
    result = classify_dir(small_tree, tmp_path / "p.parquet",
                          PredictSettings(model=str(run.run_dir), workers=0, embeddings=True, top_k=3))
    df = pl.read_parquet(result.out)
    assert set(df["label"]) <= set(run.classes)
    assert all(len(t) == 3 and set(t) <= set(run.classes) for t in df["topk_labels"])
    assert {len(e) for e in df["embedding"]} == {2304}
    # a trained model gets most of the sample's own paintings right
    truth = [p.split("/")[0] for p in df["path"]]
    assert sum(a == b for a, b in zip(truth, df["label"])) >= 6


def test_cli_dir(small_tree, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.parquet"
    res = runner.invoke(app, ["dir", str(small_tree), "--out", str(out), "--workers", "0", "--top-k", "2"])
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(out).height == 8 and "predictions" in res.output
    res = runner.invoke(app, ["dir", str(small_tree), "--out", str(out), "--workers", "0"])
    assert res.exit_code == 2 and "exists" in res.output and "Traceback" not in res.output


def test_cuda_asked_for_without_a_gpu_is_a_clear_error(small_tree, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="no CUDA device"):
        classify_dir(small_tree, tmp_path / "p.parquet", PredictSettings(device="cuda", workers=0))
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "p.parquet.parts").exists()
