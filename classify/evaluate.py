"""`classify eval`: a trained model's numbers on a split (or a class-folder tree), with plots and a page that explains.

Outputs, in one folder:
- `metrics.json`: accuracy, top-k accuracy, macro and per-class precision/recall/F1, the confusion matrix, the most
  confused pairs (`confused_pairs`: true, predicted, count, share of the true class), and `curves` (which curve
  file was drawn, or why none); for one-vs-rest models precision/recall/F1 of the positive class at the model's
  threshold and average precision.
- `predictions.parquet`: one row per image: `label` (the true class), `predicted`, `confidence` (its probability),
  `label_probability` (the probability given to the true class), `pred_top_classes`/`pred_top_scores` (the
  `TOP_K` most probable classes), `correct`, and `error` for a file that could not be read. The vocabulary is
  `classify dir`'s (`classify.predict`): `label` is always the given (true) class, predictions are `predicted` and
  `pred_*`; `classify.predict.read_predictions` reads either file, including the previous release's names.
- `confusion_matrix.png`: counts in the cells, shaded by the share of the true class (row-normalised).
- `curves.png`, only when there is a curve to draw: loss and accuracy per epoch when stage 2 (fine-tune) ran; in a
  probe-only run the probe's val accuracy and macro-F1 per L2 strength when it tried two or more; otherwise no file
  (and `metrics.json`'s `curves.note` says why).
- `pr_curve.png` (one-vs-rest models).
- `errors.html` (from `templates/errors.html`, autoescaped, offline): the metrics, the per-class table, the most
  confused pairs, the plots, and the misclassified images, most confident mistakes first, each with its top-k
  classes and scores and the probability given to its true class.

Plots are drawn on explicit Agg figures (`matplotlib.figure.Figure` with its own `FigureCanvasAgg`): evaluating
never switches matplotlib's backend or touches pyplot's global state. Nor does it change any other process-wide
state: the allocator setting is the CLI's (`curator.core.runtime.configure_allocator`), and the model is rebuilt and the
batches loaded without drawing from the process's random generators. Probabilities, the flip TTA, the label a row
gets and its top-k come from `classify.inference`, the code `classify train` and `classify dir` use.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from classify import checkpoint
from classify.data import Crops, PixelCache, file_items, fill_pixel_cache, folder_images, read_split_table
from classify.inference import decide, predict_loader, top_k
from curator.core import manifest
from curator.core.atomic import atomic_path
from curator.core.errors import UsageError
from curator.core.images import write_thumbnail
from curator.core.ownership import claim
from curator.core.paths import from_text
from curator.core.progress import Event
from curator.core.runtime import Runtime, select_runtime
from curator.embedding.embed import default_workers

ERRORS_SHOWN = 300
#: How many of its most probable classes each prediction keeps (predictions.parquet, errors.html).
TOP_K = 5
#: How many of the most frequent (true, predicted) mistakes metrics.json and errors.html list.
CONFUSED_PAIRS = 10


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    predictions: pl.DataFrame
    files: dict[str, Path]


def _is_eval_folder(folder: Path) -> bool:
    """An unmarked folder an earlier `classify eval` wrote (its metrics.json names the model and the source)."""
    try:
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and {"model", "source", "accuracy"} <= metrics.keys()


def _items_from_dir(directory: Path, classes: list[str]) -> tuple[pl.DataFrame, dict[str, str]]:
    """A class-folder tree: label = first folder; files under unknown folders are skipped with a reason."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a folder")
    frame, skipped = folder_images(directory, classes)
    skipped.update({rel: "not under a folder named for one of the model's classes"
                    for rel in frame.filter(pl.col("label").is_null())["rel_path"].to_list()})
    frame = frame.filter(pl.col("label").is_not_null())
    if frame.is_empty():
        raise UsageError(f"no images under {directory} in folders named for the model's classes ({', '.join(classes)})")
    return frame, skipped


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float | None) -> dict:
    """Accuracy, top-k, macro and per-class P/R/F1, confusion matrix; for a binary model with a threshold, the
    positive class's numbers at that threshold and average precision."""
    from sklearn.metrics import (
        average_precision_score,
        confusion_matrix,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    labels = list(range(len(classes)))
    pred = decide(probs, threshold)
    p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, pred, labels=labels, average="macro", zero_division=0)
    out = {
        "images": len(y_true),
        "accuracy": float((pred == y_true).mean()),
        "macro_precision": float(mp), "macro_recall": float(mr), "macro_f1": float(mf),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
    }
    for k in (3, 5):
        if k < len(classes):
            out[f"top{k}_accuracy"] = float(top_k_accuracy_score(y_true, probs, k=k, labels=labels))
    if threshold is not None:
        out["threshold"] = threshold
        out["positive"] = {"class": classes[1], "precision": float(p[1]), "recall": float(r[1]), "f1": float(f[1]),
                           "support": int(s[1]),
                           "average_precision": float(average_precision_score(y_true == 1, probs[:, 1]))
                           if (y_true == 1).any() else None}
    return out


def confused_pairs(matrix: np.ndarray, classes: list[str], n: int = CONFUSED_PAIRS) -> list[dict]:
    """The `n` most frequent mistakes as {true, predicted, count, share of the true class's images}, most first
    (ties in class order)."""
    m = np.asarray(matrix, dtype=np.int64)
    totals = m.sum(axis=1)
    cells = [(-int(m[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes)) if i != j and m[i, j]]
    return [{"true": classes[i], "predicted": classes[j], "count": -c, "share": -c / max(int(totals[i]), 1)}
            for c, i, j in sorted(cells)[:n]]


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by its own Agg canvas: no pyplot, no global backend switch (a library call must
    not change process-wide state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _plain(text: str) -> str:
    """`text` as matplotlib shows it literally (a `$` would start mathtext)."""
    return text.replace("$", r"\$")


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Write `confusion_figure` as a PNG."""
    _save_fig(confusion_figure(matrix, classes, title), path)


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str):
    """The confusion matrix with its counts in the cells, shaded by the share of each true class (row-normalised),
    class names on both axes."""
    m = np.asarray(matrix, dtype=np.int64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = max(5.0, 0.55 * n + 2.5)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = [_plain(c) for c in classes]
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(n), names, fontsize=9)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(_plain(title), fontsize=10)
    if n <= 40:
        size = 9 if n <= 12 else 7 if n <= 25 else 5.5
        for i in range(n):
            for j in range(n):
                if m[i, j] or i == j:
                    ax.text(j, i, f"{m[i, j]:,}", ha="center", va="center", fontsize=size,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class (row)")
    fig.tight_layout()
    return fig


def curve_kind(history: list[dict], probe: list[dict]) -> str | None:
    """What curves.png can show for a run: "epochs" when stage 2 ran (fine-tune rows with losses), "probe" when
    only the probe ran but over two or more L2 strengths (its val scores per strength), else None (nothing to draw:
    a single probe fit is one number, already in metrics)."""
    if any(r.get("stage") == "fine-tune" and r.get("train_loss") is not None and r.get("val_loss") is not None
           for r in history):
        return "epochs"
    if len([r for r in probe if r.get("l2") is not None and r.get("val_accuracy") is not None]) >= 2:
        return "probe"
    return None


def plot_curves(history: list[dict], path: Path) -> None:
    """Write `curves_figure` as a PNG."""
    _save_fig(curves_figure(history), path)


def curves_figure(history: list[dict]):
    """Loss and accuracy per fine-tune epoch (train and val), with the stage-1 probe's val accuracy for reference."""
    tuned = [r for r in history if r.get("stage") == "fine-tune"]
    probe = [r for r in history if r.get("stage") == "probe"]
    fig = _figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    ep = [r["epoch"] for r in tuned]
    ax1.plot(ep, [r["train_loss"] for r in tuned], "o-", label="train")
    ax1.plot(ep, [r["val_loss"] for r in tuned], "o-", label="val")
    ax2.plot(ep, [r.get("train_accuracy") for r in tuned], "o-", label="train (augmented)")
    ax2.plot(ep, [r["val_accuracy"] for r in tuned], "o-", label="val")
    ax2.plot(ep, [r.get("val_macro_f1") for r in tuned], "s--", label="val macro-F1")
    if probe and probe[0].get("val_accuracy") is not None:
        ax2.axhline(probe[0]["val_accuracy"], color="grey", ls=":", label="val, stage-1 probe")
    ax1.set(title="loss per fine-tune epoch", xlabel="epoch")
    ax2.set(title="accuracy per fine-tune epoch", xlabel="epoch", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_probe(records: list[dict], chosen: float | None, path: Path) -> None:
    """Write `probe_figure` as a PNG."""
    _save_fig(probe_figure(records, chosen), path)


def probe_figure(records: list[dict], chosen: float | None):
    """A probe-only run's curve: val accuracy and macro-F1 of the linear probe per L2 strength, the kept one
    marked."""
    rows = sorted((r for r in records if r.get("l2") is not None), key=lambda r: r["l2"])
    l2 = [r["l2"] for r in rows]
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ax.plot(l2, [r["val_accuracy"] for r in rows], "o-", label="val accuracy")
    ax.plot(l2, [r.get("val_macro_f1") for r in rows], "s--", label="val macro-F1")
    if chosen is not None:
        ax.axvline(chosen, color="grey", ls=":", label=f"kept: L2 {chosen:g}")
    ax.set_xscale("log")
    ax.set(title="linear probe (no fine-tune epochs): val score per L2", xlabel="L2 strength", ylim=(0, 1))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_pr(y_true: np.ndarray, scores: np.ndarray, threshold: float, positive: str, path: Path) -> None:
    """Precision against recall of the positive class, the model's threshold marked."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y_true, scores)
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    ax.plot(recall, precision)
    i = min(int(np.searchsorted(thresholds, threshold)), len(thresholds) - 1)
    ax.plot(recall[i], precision[i], "ro", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title=f"{_plain(positive)} vs the rest", xlim=(0, 1),
           ylim=(0, 1.02))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _page_env():
    from jinja2 import Environment, FileSystemLoader

    return Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)


def write_errors_html(pred: pl.DataFrame, metrics: dict, classes: list[str], out_dir: Path, heading: str,
                      plots: list[dict] | None = None, curves_note: str = "") -> Path:
    """errors.html: the metrics (accuracy, macro-F1, per class precision/recall/F1), the most confused pairs, the
    misclassified images (most confident mistakes first) with each one's top-k classes and the probability given to
    its true class, and the plots (`plots`: {file, caption, inline}: inline ones beside the tables, the others under
    "Training curves" with `curves_note`). From `templates/errors.html`, autoescaped; offline (no remote assets)."""
    thumbs = out_dir / "thumbs"
    thumbs.mkdir(exist_ok=True)
    wrong = pred.filter(~pl.col("correct") & pl.col("error").is_null()).sort("confidence", descending=True)
    errors = []
    for row in wrong.head(ERRORS_SHOWN).iter_rows(named=True):
        name = f"{row['sha256'][:20]}.webp"
        shown = write_thumbnail(Path(from_text(row["path"], row.get("path_escaped"))), thumbs / name, 190)
        top = [{"name": c, "score": s, "css": "true" if c == row["label"] else "pred" if c == row["predicted"] else ""}
               for c, s in zip(row["pred_top_classes"] or [], row["pred_top_scores"] or [])]
        errors.append({**row, "thumb": f"thumbs/{name}" if shown else None, "top": top})
    cards = [("accuracy", f"{metrics['accuracy']:.3f}"), ("macro-F1", f"{metrics['macro_f1']:.3f}")]
    cards += [(f"top-{k} accuracy", f"{metrics[f'top{k}_accuracy']:.3f}") for k in (3, 5)
              if f"top{k}_accuracy" in metrics]
    cards += [("images scored", f"{metrics['images']:,}"), ("misclassified", f"{wrong.height:,}")]
    page = _page_env().get_template("errors.html").render(
        heading=heading, model=metrics.get("model_name", ""), source=metrics.get("source_name", ""),
        images=metrics["images"], unreadable=metrics.get("errors", 0), skipped=metrics.get("skipped", 0),
        cards=[{"name": k, "value": v} for k, v in cards],
        per_class=[{"name": c, **metrics["per_class"][c]} for c in classes],
        macro={"precision": metrics["macro_precision"], "recall": metrics["macro_recall"], "f1": metrics["macro_f1"]},
        pairs=metrics.get("confused_pairs", []), positive=metrics.get("positive"), threshold=metrics.get("threshold"),
        plots=plots or [], curves_note=curves_note, errors=errors, wrong_total=wrong.height, shown=len(errors),
        top_k=min(TOP_K, len(classes)))
    path = out_dir / "errors.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def evaluate(run_dir: Path, splits: Path | None = None, split: str = "test", directory: Path | None = None,
             out_dir: Path | None = None, device: str = "auto", dtype: str = "auto", batch_size: int = 64,
             workers: int | None = None, events: Event | None = None) -> EvalResult:
    """Evaluate the model in `run_dir` on `split` of `splits` (default: the splits it was trained on) or on the
    class-folder tree `directory`, and write the outputs listed in the module docstring to `out_dir`."""
    emit = events or (lambda kind, info: None)
    loaded = checkpoint.load(run_dir)
    meta, classes, classifier = loaded.meta, loaded.classes, loaded.classifier
    settings = meta["settings"]
    runtime: Runtime = select_runtime(device, dtype)
    workers = default_workers() if workers is None else workers
    skipped: dict[str, str] = {}
    if directory is not None:
        if settings.get("positive"):
            raise UsageError("a one-vs-rest model is evaluated on a splits file (its labels come from the splits)")
        frame, skipped = _items_from_dir(Path(directory), classes)
        cache_dir = (Path(out_dir) if out_dir else Path(run_dir) / f"eval-{Path(directory).name}") / "cache"
        source = str(directory)
    else:
        if split not in ("train", "val", "test"):
            raise UsageError(f"--split must be train, val or test, not {split!r}")
        splits = Path(splits or meta["splits"]["path"])
        table = read_split_table(splits, need=(split,))
        frame = table.rows(split)
        cache_dir = table.workspace / "cache"
        source = f"{splits} [{split}]"
        if table.splits_sha256 != meta["splits"]["sha256"] and Path(splits) == Path(meta["splits"]["path"]):
            emit("note", {"text": f"{splits} changed since training (sha256 differs): test rows may have been "
                                  f"seen in training"})
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / (f"eval-{split}" if directory is None
                                                             else f"eval-{Path(directory).name}")
    claim(out_dir, "eval", "--out", adopt=_is_eval_folder(out_dir))
    if settings.get("positive"):
        truth = (frame[settings.get("positive_column", "label")] == settings["positive"]).fill_null(False)
        y_all = truth.to_numpy().astype(np.int64)
        label_names = [classes[v] for v in y_all]
        frame = frame.with_columns(pl.Series("label", label_names))
    else:
        unknown = sorted(set(frame["label"].to_list()) - set(classes))
        if unknown:
            raise UsageError(f"labels the model does not know: {', '.join(unknown[:5])}")
        index = {c: i for i, c in enumerate(classes)}
        y_all = np.array([index[c] for c in frame["label"].to_list()], dtype=np.int64)

    t = time.perf_counter()
    pixels = PixelCache(cache_dir / "pixels", loaded.preprocess)
    items = file_items(frame)
    emit("stage", {"name": "decode", "total": len(items)})
    failed = fill_pixel_cache(pixels, items, workers, events=emit)
    good = np.array([s not in failed for s in frame["sha256"].to_list()], dtype=bool)
    # the loader's own generator: a DataLoader draws a base seed on every pass, from torch's default generator unless
    # given one, and evaluating must leave the process's generators alone
    loader = torch.utils.data.DataLoader(
        Crops(pixels, pixels.rows([s for s, g in zip(frame["sha256"].to_list(), good) if g])),
        batch_size=batch_size, generator=torch.Generator())
    classifier.to(torch.device(runtime.device))
    emit("stage", {"name": "predict", "total": None})
    probs, _ = predict_loader(classifier, loader, runtime, loaded.tta)
    seconds = time.perf_counter() - t
    threshold = meta.get("threshold") if settings.get("positive") else None
    y = y_all[good]
    metrics = compute_metrics(y, probs, classes, threshold)
    metrics.update(source=source, model=str(run_dir), errors=int((~good).sum()), skipped=len(skipped),
                   skipped_files=dict(sorted(skipped.items())),
                   seconds=round(seconds, 2), images_per_second=round(len(y) / max(seconds, 1e-9), 1))

    pred_idx = decide(probs, threshold)
    top_classes, top_scores = top_k(probs, classes, TOP_K)
    n = len(frame)
    full_pred, conf, truth_p = [None] * n, [None] * n, [None] * n
    tops, top_p, errors = [None] * n, [None] * n, [None] * n
    j = 0
    for i, (ok, sha) in enumerate(zip(good, frame["sha256"].to_list())):
        if ok:
            full_pred[i] = classes[pred_idx[j]]
            conf[i] = float(probs[j, pred_idx[j]])
            truth_p[i] = float(probs[j, y[j]])
            tops[i], top_p[i] = top_classes[j], top_scores[j]
            j += 1
        else:
            errors[i] = failed[sha]
    predictions = pl.DataFrame({
        "path": frame["path"], "path_escaped": frame["path_escaped"], "rel_path": frame["rel_path"],
        "sha256": frame["sha256"], "label": frame["label"],
        "predicted": pl.Series(full_pred, dtype=pl.String), "confidence": pl.Series(conf, dtype=pl.Float32),
        "label_probability": pl.Series(truth_p, dtype=pl.Float32),
        "pred_top_classes": pl.Series(tops, dtype=pl.List(pl.String)),
        "pred_top_scores": pl.Series(top_p, dtype=pl.List(pl.Float32)),
        "correct": pl.Series([p == t if p is not None else False for p, t in zip(full_pred, frame["label"])]),
        "error": pl.Series(errors, dtype=pl.String),
    })
    where = f"the {split} split" if directory is None else f"folder {Path(directory).name}"
    metrics.update(confused_pairs=confused_pairs(np.array(metrics["confusion_matrix"]), classes),
                   model_name=Path(run_dir).name, source_name=where)
    files = {"metrics": out_dir / "metrics.json", "predictions": out_dir / "predictions.parquet",
             "confusion_matrix": out_dir / "confusion_matrix.png"}
    manifest.write_atomic(predictions, files["predictions"])
    plot_confusion(np.array(metrics["confusion_matrix"]), classes, files["confusion_matrix"],
                   f"{Path(run_dir).name} on {where}: {len(y):,} images, accuracy {metrics['accuracy']:.3f}")
    plots = [{"file": "confusion_matrix.png", "caption": "confusion matrix: counts, shaded by share of the true class",
              "inline": True}]
    curves, note = _draw_curves(meta, out_dir / "curves.png")
    metrics["curves"] = {"file": curves.name if curves else None, "note": note}
    if curves is not None:
        files["curves"] = curves
        plots.append({"file": curves.name, "caption": note, "inline": False})
    (out_dir / "pr_curve.png").unlink(missing_ok=True)
    if threshold is not None:
        files["pr_curve"] = out_dir / "pr_curve.png"
        plot_pr(y, probs[:, 1], threshold, classes[1], files["pr_curve"])
        plots.append({"file": "pr_curve.png", "caption": f"precision and recall of {classes[1]} vs the rest",
                      "inline": True})
    files["errors"] = write_errors_html(predictions, metrics, classes, out_dir,
                                        f"{Path(run_dir).name}: evaluated on {where}", plots,
                                        "" if curves is not None else note)
    manifest.write_json_atomic(metrics, files["metrics"])
    return EvalResult(out_dir, metrics, predictions, files)


def _draw_curves(meta: dict, path: Path) -> tuple[Path | None, str]:
    """Draw curves.png when the run has a curve (see `curve_kind`), else remove any earlier one; returns the file
    (or None) and one line saying what it shows or why there is none."""
    history, probe = meta.get("history") or [], meta.get("probe") or []
    kind = curve_kind(history, probe)
    if kind == "epochs":
        plot_curves(history, path)
        epochs = sum(r.get("stage") == "fine-tune" for r in history)
        return path, f"loss and accuracy per fine-tune epoch ({epochs} epoch{'s' if epochs != 1 else ''})"
    path.unlink(missing_ok=True)
    if kind == "probe":
        best = max(probe, key=lambda r: r.get("val_macro_f1") or 0)
        plot_probe(probe, best.get("l2"), path)
        return path, (f"probe-only run (no fine-tune epochs): the linear probe's val accuracy and macro-F1 per L2 "
                      f"strength; L2 {best['l2']:g} kept")
    return None, ("no curves.png: probe-only run (no fine-tune epochs) with a single L2 strength, so there is no "
                  "curve to draw; its val scores are in the run's history.csv")


def load_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text())
