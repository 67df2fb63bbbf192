from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from classify.cli import app
from classify.evaluate import compute_metrics, evaluate
from classify.train import TrainSettings, train
from curator.errors import UsageError
from tests.conftest import MARKER, SAMPLE, files_containing, write_hostile_tree

FAST = dict(model="efficientnet_lite0", epochs=1, unfreeze=1, batch_size=16, workers=0, probe_l2=(1e-2,),
            probe_steps=50)


@pytest.fixture(scope="module")
def model(sample_ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalruns") / "m"
    train(sample_ws / "splits.parquet", out, TrainSettings(**FAST))
    return out


def test_eval_outputs_exist_and_agree_with_the_predictions(model, sample_ws):
    result = evaluate(model, workers=0)
    files = result.files
    for key in ("metrics", "predictions", "confusion_matrix", "curves", "errors"):
        assert files[key].is_file() and files[key].stat().st_size > 0
    metrics = json.loads(files["metrics"].read_text())
    pred = pl.read_parquet(files["predictions"])
    test_rows = pl.read_parquet(sample_ws / "splits.parquet").filter(pl.col("split") == "test")
    assert pred.height == test_rows.height == metrics["images"]
    assert metrics["accuracy"] == pytest.approx(pred["correct"].mean())
    cm = np.array(metrics["confusion_matrix"])
    assert cm.sum() == pred.height and np.trace(cm) == pred["correct"].sum()
    wrong = pred.filter(~pl.col("correct"))
    page = files["errors"].read_text()
    assert page.count('class="item"') == wrong.height
    if wrong.height:  # worst first: the first shown mistake is the most confident one
        top = wrong.sort("confidence", descending=True).row(0, named=True)
        assert page.index(top["rel_path"]) == min(page.index(p) for p in wrong["rel_path"].to_list())
    for name, row in metrics["per_class"].items():
        assert row["support"] == test_rows.filter(pl.col("label") == name).height
    assert 0 <= metrics["top3_accuracy"] <= 1 and metrics["top3_accuracy"] >= metrics["accuracy"]


def test_eval_on_a_folder_gives_an_error_row_for_a_corrupt_file(model, tmp_path):
    tree = tmp_path / "tree"
    for style in ("Baroque", "Ukiyo_e"):
        (tree / style).mkdir(parents=True)
        for p in sorted((SAMPLE / style).glob("*.jpg"))[:3]:
            shutil.copy(p, tree / style / p.name)
    good = sorted((SAMPLE / "Baroque").glob("*.jpg"))[5].read_bytes()
    (tree / "Baroque" / "broken.jpg").write_bytes(good[: len(good) // 3])
    (tree / "Cubism").mkdir()
    shutil.copy(sorted((SAMPLE / "Rococo").glob("*.jpg"))[0], tree / "Cubism" / "x.jpg")
    result = evaluate(model, directory=tree, out_dir=tmp_path / "out", workers=0)
    pred = result.predictions
    assert pred.height == 7
    broken = pred.filter(pl.col("rel_path") == "Baroque/broken.jpg").row(0, named=True)
    assert broken["predicted"] is None and "truncated" in broken["error"]
    assert pred.filter(pl.col("error").is_null())["predicted"].null_count() == 0
    assert result.metrics["images"] == 6 and result.metrics["errors"] == 1 and result.metrics["skipped"] == 1


def test_compute_metrics_binary_threshold():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    y = np.array([0, 1, 1, 0])
    m = compute_metrics(y, probs, ["not a", "a"], threshold=0.35)
    assert m["positive"]["recall"] == 1.0 and m["positive"]["precision"] == pytest.approx(2 / 3)
    m2 = compute_metrics(y, probs, ["not a", "a"], threshold=0.75)
    assert m2["positive"]["recall"] == 0.0


def test_cli_train_then_eval(sample_ws, tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "cli-run"
    res = runner.invoke(app, ["train", "--splits", str(sample_ws / "splits.parquet"), "--out", str(run_dir),
                              "--epochs", "0", "--workers", "0", "--model", "efficientnet_lite0"])
    assert res.exit_code == 0, res.output
    assert "best epoch 0" in res.output.replace("\n", " ") and "where the time went" in res.output
    res = runner.invoke(app, ["eval", "--model", str(run_dir), "--workers", "0"])
    assert res.exit_code == 0, res.output
    flat = res.output.replace("\n", "")
    assert "accuracy" in flat and "errors.html" in flat
    assert (run_dir / "eval-test" / "metrics.json").is_file()


def test_cli_errors_are_one_line(sample_ws, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--splits", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "no splits file" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["eval", "--model", str(tmp_path)])
    assert res.exit_code != 0 and "not a trained model" in res.output
    res = runner.invoke(app, ["train", "--splits", str(sample_ws), "--balance", "magic"])
    assert res.exit_code == 2 and "--balance" in res.output


def test_eval_unknown_split_name(model):
    with pytest.raises(UsageError):
        evaluate(model, split="holdout", workers=0)


def test_eval_on_a_hostile_folder_reads_only_what_it_may(model, tmp_path):
    root, reasons = write_hostile_tree(tmp_path)
    out = tmp_path / "out"
    result = evaluate(model, directory=root, out_dir=out, workers=0)
    pred = result.predictions
    odd = pred.row(by_predicate=pl.col("path_escaped"), named=True)
    assert odd["rel_path"] == "Rococo/caf\\xe9_non-utf8.jpg" and odd["predicted"] is not None and odd["error"] is None
    assert result.metrics["skipped_files"]["Baroque/fifo.jpg"].startswith("not a regular file")
    assert "outside the scanned folder" in result.metrics["skipped_files"]["Baroque/to_image.jpg"]
    assert files_containing(out, MARKER) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metrics.json").write_text("the user's")
    with pytest.raises(UsageError, match="did not write"):
        evaluate(model, directory=root, out_dir=tmp_path / "mine", workers=0)
    assert (tmp_path / "mine" / "metrics.json").read_text() == "the user's"
