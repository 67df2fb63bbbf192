"""`classify eval`: a trained model's numbers on a split (or a class-folder tree), with plots and an error gallery.

Outputs, in one folder: `metrics.json` (accuracy, top-k accuracy, macro and per-class precision/recall/F1, the
confusion matrix; for one-vs-rest models precision/recall/F1 of the positive class at the model's threshold and
average precision), `predictions.parquet` (one row per image), `confusion_matrix.png` (row-normalised),
`curves.png` (loss and accuracy per epoch, train and val), `pr_curve.png` (one-vs-rest), and `errors.html`
(misclassified images as thumbnails, the most confident mistakes first).
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from classify import checkpoint
from classify.data import PixelCache, file_items, fill_pixel_cache, folder_images, read_split_table
from classify.train import Crops, predict_pixels
from curator import manifest
from curator.embed import default_workers
from curator.errors import UsageError
from curator.ownership import claim
from curator.images import write_thumbnail
from curator.paths import from_text
from curator.runtime import Runtime, configure_allocator, select_runtime

Event = Callable[[str, dict], None]
ERRORS_SHOWN = 300


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
    if threshold is not None:
        pred = (probs[:, 1] >= threshold).astype(np.int64)
    else:
        pred = probs.argmax(1)
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


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = max(5.0, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), [c.replace("_", " ") for c in classes], rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(n), [c.replace("_", " ") for c in classes], fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    _save_fig(fig, path)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    tuned = [r for r in history if r.get("stage") == "fine-tune"]
    probe = [r for r in history if r.get("stage") == "probe"]
    if tuned:
        ep = [r["epoch"] for r in tuned]
        ax1.plot(ep, [r["train_loss"] for r in tuned], "o-", label="train")
        ax1.plot(ep, [r["val_loss"] for r in tuned], "o-", label="val")
        ax2.plot(ep, [r["train_accuracy"] for r in tuned], "o-", label="train (augmented)")
        ax2.plot(ep, [r["val_accuracy"] for r in tuned], "o-", label="val")
        ax2.plot(ep, [r["val_macro_f1"] for r in tuned], "s--", label="val macro-F1")
    if probe:
        ax2.axhline(probe[0]["val_accuracy"], color="grey", ls=":", label="val, stage-1 probe")
    ax1.set(title="loss", xlabel="epoch")
    ax2.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_fig(fig, path)


def plot_pr(y_true: np.ndarray, scores: np.ndarray, threshold: float, positive: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y_true, scores)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(recall, precision)
    i = min(int(np.searchsorted(thresholds, threshold)), len(thresholds) - 1)
    ax.plot(recall[i], precision[i], "ro", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title=f"{positive} vs the rest", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_errors_html(pred: pl.DataFrame, out_dir: Path, title: str) -> Path:
    """Misclassified images, most confident mistakes first, as thumbnails with true and predicted label."""
    thumbs = out_dir / "thumbs"
    thumbs.mkdir(exist_ok=True)
    wrong = pred.filter(~pl.col("correct") & pl.col("error").is_null()).sort("confidence", descending=True)
    items = []
    for row in wrong.head(ERRORS_SHOWN).iter_rows(named=True):
        name = f"{row['sha256'][:20]}.webp"
        shown = write_thumbnail(Path(from_text(row["path"], row.get("path_escaped"))), thumbs / name, 160)
        img = f'<img src="thumbs/{name}" loading="lazy" alt="">' if shown else "(no image)"
        items.append(
            f'<div class="item">{img}<div class="t">true: <b>{html.escape(row["label"])}</b></div>'
            f'<div class="p">predicted: <b>{html.escape(row["predicted"])}</b> ({row["confidence"]:.2f})</div>'
            f'<div class="f">{html.escape(row["rel_path"])}</div></div>')
    more = f"<p>{len(wrong) - ERRORS_SHOWN} more not shown.</p>" if len(wrong) > ERRORS_SHOWN else ""
    page = (
        "<!doctype html><meta charset='utf-8'><title>errors</title><style>"
        "body{font-family:system-ui,sans-serif;margin:1.5rem}.grid{display:flex;flex-wrap:wrap;gap:.8rem}"
        ".item{width:170px;font-size:.75rem;word-break:break-all}.item img{max-width:160px;max-height:160px;"
        "display:block}.p{color:#a22}.f{color:#666}</style>"
        f"<h1>{html.escape(title)}</h1><p>{len(wrong)} misclassified of {len(pred.filter(pl.col('error').is_null()))}"
        f", most confident first.</p><div class='grid'>{''.join(items)}</div>{more}"
    )
    path = out_dir / "errors.html"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path


def evaluate(run_dir: Path, splits: Path | None = None, split: str = "test", directory: Path | None = None,
             out_dir: Path | None = None, device: str = "auto", dtype: str = "auto", batch_size: int = 64,
             workers: int | None = None, events: Event | None = None) -> EvalResult:
    """Evaluate the model in `run_dir` on `split` of `splits` (default: the splits it was trained on) or on the
    class-folder tree `directory`, and write the outputs listed in the module docstring to `out_dir`."""
    emit = events or (lambda kind, info: None)
    configure_allocator()
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
    failed = fill_pixel_cache(pixels, items, workers, progress=lambda n: emit("advance", {"n": n}))
    good = np.array([s not in failed for s in frame["sha256"].to_list()], dtype=bool)
    loader = torch.utils.data.DataLoader(
        Crops(pixels, pixels.rows([s for s, g in zip(frame["sha256"].to_list(), good) if g]), None),
        batch_size=batch_size)
    classifier.to(torch.device(runtime.device))
    emit("stage", {"name": "predict", "total": None})
    probs, _ = predict_pixels(classifier, loader, runtime, loaded.tta)
    seconds = time.perf_counter() - t
    threshold = meta.get("threshold") if settings.get("positive") else None
    y = y_all[good]
    metrics = compute_metrics(y, probs, classes, threshold)
    metrics.update(source=source, model=str(run_dir), errors=int((~good).sum()), skipped=len(skipped),
                   skipped_files=dict(sorted(skipped.items())),
                   seconds=round(seconds, 2), images_per_second=round(len(y) / max(seconds, 1e-9), 1))

    pred_idx = (probs[:, 1] >= threshold).astype(np.int64) if threshold is not None else probs.argmax(1)
    full_pred = [None] * len(frame)
    conf = [None] * len(frame)
    errors = [None] * len(frame)
    j = 0
    for i, (ok, sha) in enumerate(zip(good, frame["sha256"].to_list())):
        if ok:
            full_pred[i] = classes[pred_idx[j]]
            conf[i] = float(probs[j, pred_idx[j]])
            j += 1
        else:
            errors[i] = failed[sha]
    predictions = pl.DataFrame({
        "path": frame["path"], "path_escaped": frame["path_escaped"], "rel_path": frame["rel_path"], "sha256": frame["sha256"], "label": frame["label"],
        "predicted": pl.Series(full_pred, dtype=pl.String), "confidence": pl.Series(conf, dtype=pl.Float32),
        "correct": pl.Series([p == t if p is not None else False for p, t in zip(full_pred, frame["label"])]),
        "error": pl.Series(errors, dtype=pl.String),
    })
    files = {"metrics": out_dir / "metrics.json", "predictions": out_dir / "predictions.parquet",
             "confusion_matrix": out_dir / "confusion_matrix.png", "curves": out_dir / "curves.png"}
    manifest.write_atomic(predictions, files["predictions"])
    plot_confusion(np.array(metrics["confusion_matrix"]), classes, files["confusion_matrix"],
                   f"{Path(run_dir).name}: {source} (acc {metrics['accuracy']:.3f})")
    plot_curves(meta.get("history", []), files["curves"])
    if threshold is not None:
        files["pr_curve"] = out_dir / "pr_curve.png"
        plot_pr(y, probs[:, 1], threshold, classes[1], files["pr_curve"])
    files["errors"] = write_errors_html(predictions, out_dir, f"{Path(run_dir).name}: misclassified in {source}")
    manifest.write_json_atomic(metrics, files["metrics"])
    return EvalResult(out_dir, metrics, predictions, files)


def load_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text())
