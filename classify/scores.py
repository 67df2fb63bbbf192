"""How good a model's val predictions are: macro-F1, val loss and accuracy, and a one-vs-rest decision threshold."""

from __future__ import annotations

import numpy as np

from curator.core.errors import UsageError


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """F1 averaged over all `n_classes` classes (a class never predicted nor present counts 0)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def val_scores(probs: np.ndarray, present: np.ndarray, y: np.ndarray, n_classes: int) -> dict:
    """Loss, accuracy and macro-F1 of the present rows' probabilities against the labels `y`."""
    probs, y = probs[present], y[present]
    pred = probs.argmax(1)
    return {"val_loss": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-9, 1)).mean()),
            "val_accuracy": float((pred == y).mean()), "val_macro_f1": macro_f1(y, pred, n_classes)}


def choose_threshold(scores: np.ndarray, positive: np.ndarray, min_precision: float | None) -> tuple[float, dict]:
    """Decision threshold on the positive class's probability: max F1 on val, or the lowest threshold reaching
    `min_precision` (highest recall at that precision)."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(positive, scores)
    precision, recall = precision[:-1], recall[:-1]
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    if min_precision is not None:
        ok = np.flatnonzero(precision >= min_precision)
        if len(ok) == 0:
            raise UsageError(f"no threshold reaches precision {min_precision} on val (best {precision.max():.3f})")
        i = ok[np.argmax(recall[ok])]
    else:
        i = int(np.argmax(f1))
    return float(thresholds[i]), {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i])}
