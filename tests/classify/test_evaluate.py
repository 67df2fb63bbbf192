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
from curator.core.errors import UsageError
from tests.conftest import MARKER, SAMPLE, files_containing, write_hostile_tree

FAST = dict(model="efficientnet_lite0", epochs=1, unfreeze=1, batch_size=16, workers=0, probe_l2=(1e-2,),
            probe_steps=50)


@pytest.fixture(scope="module")
def model(sample_ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalruns") / "m"
    train(sample_ws / "splits.parquet", out, TrainSettings(**FAST))
    return out


@pytest.mark.slow  # trains a model (module fixture) or cleans the sample
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


@pytest.mark.slow  # trains a model (module fixture) or cleans the sample
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


@pytest.mark.slow  # trains a model (module fixture) or cleans the sample
def test_cli_train_then_eval(sample_ws, tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "cli-run"
    res = runner.invoke(app, ["train", "--splits", str(sample_ws / "splits.parquet"), "--out", str(run_dir),
                              "--epochs", "0", "--workers", "0", "--backbone", "efficientnet_lite0"])
    assert res.exit_code == 0, res.output
    assert "best epoch 0" in res.output.replace("\n", " ") and "where the time went" in res.output
    res = runner.invoke(app, ["eval", "--run", str(run_dir), "--workers", "0"])
    assert res.exit_code == 0, res.output
    flat = res.output.replace("\n", "")
    assert "accuracy" in flat and "errors.html" in flat
    metrics = json.loads((run_dir / "eval-test" / "metrics.json").read_text())
    # probe only (--epochs 0) over the default four L2 strengths: the curve is the probe's, said so
    assert metrics["curves"]["file"] == "curves.png" and "probe-only" in metrics["curves"]["note"]
    assert (run_dir / "eval-test" / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # trains a model (module fixture) or cleans the sample
def test_cli_errors_are_one_line(sample_ws, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--splits", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "no splits file" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["eval", "--run", str(tmp_path)])
    assert res.exit_code != 0 and "not a trained model" in res.output
    res = runner.invoke(app, ["train", "--splits", str(sample_ws), "--balance", "magic"])
    assert res.exit_code == 2 and "--balance" in res.output


@pytest.mark.slow  # trains a model (module fixture) or cleans the sample
def test_eval_unknown_split_name(model):
    with pytest.raises(UsageError):
        evaluate(model, split="holdout", workers=0)


@pytest.mark.slow  # trains a model (module fixture) or cleans the sample
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


# ------------------------------------------------------------------------------------ issue 21: pages that explain


def _mislabelled_tree(root) -> list[str]:
    """Two paintings per style in their own folder plus one from the next style filed under the wrong one (named
    with HTML-hostile characters): whatever else the model gets wrong, those five are mistakes."""
    styles = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    hostile = []
    for i, style in enumerate(styles):
        (root / style).mkdir(parents=True)
        for p in sorted((SAMPLE / style).glob("*.jpg"))[:2]:
            shutil.copy(p, root / style / p.name)
        other = styles[(i + 1) % len(styles)]
        name = f"<img src=x onerror=alert(1)> {other} & 'filed' as {style}.jpg"
        shutil.copy(sorted((SAMPLE / other).glob("*.jpg"))[-1], root / style / name)
        hostile.append(f"{style}/{name}")
    return hostile


def _cards(page: str) -> list[str]:
    """The misclassified-image cards of errors.html, in page order."""
    return page.split('<figure class="item"')[1:]


@pytest.fixture(scope="module")
def explained(model, tmp_path_factory):
    """`evaluate` on the mislabelled tree, run while matplotlib's backend is svg (not Agg): (result, the hostile
    file names, the backend after the run)."""
    import matplotlib

    base = tmp_path_factory.mktemp("explained")
    hostile = _mislabelled_tree(base / "tree")
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # an evaluate that switched the backend to Agg would show here
    try:
        result = evaluate(model, directory=base / "tree", out_dir=base / "out", workers=0)
        after = matplotlib.get_backend()
    finally:
        matplotlib.use(before)
    return result, hostile, after


@pytest.mark.slow  # trains a model (module fixture) or cleans the sample
def test_errors_html_explains_metrics_pairs_and_each_errors_top_k(explained):
    from markupsafe import escape

    result, hostile, backend = explained
    assert backend == "svg"  # evaluate left matplotlib's backend alone
    metrics, pred = result.metrics, result.predictions
    page = result.files["errors"].read_text()
    # the metrics at the top
    assert f"<div class=\"v\">{metrics['accuracy']:.3f}</div><div class=\"k\">accuracy</div>" in page
    assert f"<div class=\"v\">{metrics['macro_f1']:.3f}</div><div class=\"k\">macro-F1</div>" in page
    for name, row in metrics["per_class"].items():
        assert (f"<tr><td>{name}</td><td>{row['precision']:.3f}</td><td>{row['recall']:.3f}</td>"
                f"<td>{row['f1']:.3f}</td><td>{row['support']}</td></tr>") in page
    # the most confused pairs, agreeing with the confusion matrix
    cm = np.array(metrics["confusion_matrix"])
    pairs = metrics["confused_pairs"]
    assert pairs and pairs[0]["count"] == (cm - np.diag(np.diag(cm))).max()
    classes = list(metrics["per_class"])
    for p in pairs:
        assert cm[classes.index(p["true"]), classes.index(p["predicted"])] == p["count"]
        assert f"<tr><td>{p['true']}</td><td>&rarr;</td><td>{p['predicted']}</td><td>{p['count']}</td>" in page
    # every misclassified image, most confident first, with its top-k and the probability of its true class
    wrong = pred.filter(~pl.col("correct") & pl.col("error").is_null()).sort("confidence", descending=True)
    cards = _cards(page)
    assert len(cards) == wrong.height >= len(hostile)
    for card, row in zip(cards, wrong.iter_rows(named=True)):
        assert str(escape(row["rel_path"])) in card
        assert f"(p = {row['label_probability']:.2f})" in card
        assert row["pred_top_classes"][0] == row["predicted"] and len(row["pred_top_classes"]) == len(classes)
        for name, score in zip(row["pred_top_classes"], row["pred_top_scores"]):
            assert f"<td>{name}</td><td class=\"s\">{score:.3f}</td>" in card
        true_at = row["pred_top_classes"].index(row["label"])
        assert row["label_probability"] == pytest.approx(row["pred_top_scores"][true_at])
    # file names with markup are shown as text, never as markup
    for rel in hostile:
        assert rel not in page and str(escape(rel)) in page
    assert "http://" not in page and "https://" not in page  # offline: no remote assets
    # the confusion matrix: counts in the cells, class names on the axes, a title that is not a path
    from PIL import Image

    with Image.open(result.files["confusion_matrix"]) as im:
        assert im.format == "PNG" and min(im.size) > 300
    assert metrics["source_name"] == "folder tree"  # the page and plot name the folder, not its path


@pytest.mark.slow  # trains a model (module fixture) or cleans the sample
@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_errors_html_in_a_browser_loads_offline_and_filters_by_pair(explained):
    sync_api = pytest.importorskip("playwright.sync_api")
    result, _, _ = explained
    pair = result.metrics["confused_pairs"][0]
    wrong = result.predictions.filter(~pl.col("correct") & pl.col("error").is_null())
    requested: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(result.files["errors"].as_uri())
            page.wait_for_function("[...document.images].every(i => i.complete)", timeout=30_000)
            broken = page.evaluate("[...document.images].filter(i => !i.naturalWidth).map(i => i.src)")
            assert broken == [] and page.locator("img").count() >= wrong.height + 2  # thumbs, matrix, curves
            visible = ".grid .item:not(.hidden)"
            assert page.locator(visible).count() == wrong.height
            page.locator(".pairs button").first.click()
            assert page.locator(visible).count() == pair["count"]
            shown = page.evaluate(f"[...document.querySelectorAll('{visible}')].map(e => [e.dataset.true, "
                                  f"e.dataset.pred])")
            assert shown == [[pair["true"], pair["predicted"]]] * pair["count"]
            page.click("#show-all")
            assert page.locator(visible).count() == wrong.height
        finally:
            browser.close()
    assert all(url.startswith("file://") for url in requested)  # offline: nothing fetched from anywhere else


def test_confusion_figure_has_counts_names_and_a_plain_title():
    from classify.evaluate import confusion_figure

    m = np.array([[5, 1, 0], [0, 7, 2], [3, 0, 4]])
    fig = confusion_figure(m, ["Baroque", "Rococo", "cost $5 <b>"], "run on the test split: 22 images")
    ax = fig.axes[0]
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts == {(0, 0): "5", (0, 1): "1", (1, 1): "7", (1, 2): "2", (2, 0): "3", (2, 2): "4"}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Baroque", "Rococo", r"cost \$5 <b>"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Baroque", "Rococo", r"cost \$5 <b>"]
    assert ax.get_title() == "run on the test split: 22 images"
    shade = ax.images[0].get_array()
    assert shade[2, 0] == pytest.approx(3 / 7) and shade[1, 2] == pytest.approx(2 / 9)  # row-normalised


def test_curves_only_when_there_is_a_curve(tmp_path):
    from classify.evaluate import _draw_curves, curve_kind

    probe_row = {"epoch": 0, "stage": "probe", "train_loss": 0.4, "val_loss": None, "val_accuracy": 0.7,
                 "val_macro_f1": 0.68}
    one = [{"l2": 1e-2, "val_accuracy": 0.7, "val_macro_f1": 0.68, "train_loss": 0.4}]
    four = [{"l2": l2, "val_accuracy": a, "val_macro_f1": a - 0.02, "train_loss": 0.4}
            for l2, a in ((1e-3, 0.6), (3e-3, 0.65), (1e-2, 0.7), (3e-2, 0.66))]
    tuned = [probe_row, {"epoch": 1, "stage": "fine-tune", "train_loss": 1.1, "val_loss": 0.9, "val_accuracy": 0.72,
                         "val_macro_f1": 0.7, "train_accuracy": 0.6}]
    assert curve_kind([probe_row], one) is None
    assert curve_kind([probe_row], four) == "probe"
    assert curve_kind(tuned, one) == "epochs"
    path = tmp_path / "curves.png"
    path.write_bytes(b"a stale plot from an earlier evaluation")
    drawn, note = _draw_curves({"history": [probe_row], "probe": one}, path)
    assert drawn is None and not path.exists() and "probe-only" in note and "\n" not in note
    drawn, note = _draw_curves({"history": [probe_row], "probe": four}, path)
    assert drawn == path and path.read_bytes()[:4] == b"\x89PNG" and "L2 0.01 kept" in note
    drawn, note = _draw_curves({"history": tuned, "probe": one}, path)
    assert drawn == path and "per fine-tune epoch (1 epoch)" in note


def test_errors_html_escapes_class_names(tmp_path):
    from classify.evaluate import compute_metrics, confused_pairs, write_errors_html

    classes = ["<script>alert(1)</script>", "a&b"]
    painting = sorted((SAMPLE / "Baroque").glob("*.jpg"))[0]
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7]])
    y = np.array([0, 0, 1])
    metrics = compute_metrics(y, probs, classes, None)
    metrics.update(confused_pairs=confused_pairs(np.array(metrics["confusion_matrix"]), classes),
                   model_name="<i>m</i>", source_name="folder <u>x</u>")
    pred = pl.DataFrame({
        "path": [str(painting)] * 3, "path_escaped": [False] * 3, "rel_path": ["<img src=x onerror=alert(2)>.jpg",
                                                                               "b.jpg", "c.jpg"],
        "sha256": ["a" * 64, "b" * 64, "c" * 64], "label": [classes[0], classes[0], classes[1]],
        "predicted": [classes[1], classes[0], classes[1]], "confidence": [0.8, 0.9, 0.7],
        "label_probability": [0.2, 0.9, 0.7],
        "pred_top_classes": [[classes[1], classes[0]], [classes[0], classes[1]], [classes[1], classes[0]]],
        "pred_top_scores": [[0.8, 0.2], [0.9, 0.1], [0.7, 0.3]],
        "correct": [False, True, True], "error": pl.Series([None] * 3, dtype=pl.String)})
    page = write_errors_html(pred, metrics, classes, tmp_path, "<h1>run</h1>").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;.jpg" in page
    assert "a&amp;b" in page and "<i>m</i>" not in page and "<u>x</u>" not in page and "<h1>run</h1>" not in page
    assert len(_cards(page)) == 1 and (tmp_path / "thumbs").is_dir()
    assert metrics["confused_pairs"] == [{"true": classes[0], "predicted": classes[1], "count": 1, "share": 0.5}]
    # a one-vs-rest model: its positive class's numbers at the threshold, escaped too
    binary = {**metrics, **compute_metrics(y, probs, classes, 0.5)}
    page = write_errors_html(pred, binary, classes, tmp_path, "run").read_text()
    assert ("one-vs-rest, positive class <b>a&amp;b</b> at threshold 0.500:\nprecision 0.500, recall 1.000, "
            "F1 0.667, average precision 0.500.") in page
