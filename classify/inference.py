"""A trained classifier's predictions, one implementation for every command that makes them.

- `class_probabilities`: the forward pass of a uint8 batch under the runtime's autocast, softmax, and the flip
  test-time augmentation (TTA) a run was validated with. `classify train` (val), `classify eval` and, through
  `classify.predict.Predictor`, `classify dir` and `classify serve` score images with it.
- `predict_loader` / `predict_rows`: every batch of a centre-crop loader, in order or by position.
- `decide` / `ranked` / `top_k`: the label a row gets (a one-vs-rest model's follows its decision threshold, others
  the most probable class) and the most probable classes with their probabilities.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from classify.classifier import Classifier
from curator.core.runtime import Runtime


def class_probabilities(classifier: Classifier, pixels: torch.Tensor, runtime: Runtime,
                        tta: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (float32; averaged with the horizontally flipped batch's when `tta`) and the features
    of a uint8 (n, 3, crop, crop) batch, moved to the runtime's device and run under its autocast."""
    device = torch.device(runtime.device)
    pixels = pixels.to(device, non_blocking=True)
    with torch.inference_mode(), torch.autocast(device.type, dtype=runtime.torch_dtype, enabled=runtime.autocast):
        features = classifier.features(pixels)
        probs = torch.softmax(classifier.head(features).float(), dim=1)
        if tta:
            probs = (probs + torch.softmax(classifier(pixels.flip(3)).float(), dim=1)) / 2
    return probs, features


def predict_loader(classifier: Classifier, loader: Iterable, runtime: Runtime,
                   tta: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and features (float32) for every item of a (pixels, positions) centre-crop loader, in
    the loader's order."""
    probs, feats = [], []
    for pixels, _ in loader:
        p, f = class_probabilities(classifier, pixels, runtime, tta)
        probs.append(p.cpu())
        feats.append(f.float().cpu())
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


def predict_rows(classifier: Classifier, batches: Iterable, rows: int, runtime: Runtime,
                 tta: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities of rows 0..rows-1 from (pixels, positions) centre-crop batches (a pixel-cache loader or
    `StreamedBatches`), and which rows came (a file that failed to decode on the fly did not; its row is zeros)."""
    probs: np.ndarray | None = None
    present = np.zeros(rows, dtype=bool)
    for pixels, positions in batches:
        p = class_probabilities(classifier, pixels, runtime, tta)[0].cpu().numpy()
        if probs is None:
            probs = np.zeros((rows, p.shape[1]), dtype=p.dtype)
        at = positions.numpy()
        probs[at] = p
        present[at] = True
    if probs is None:
        probs = np.zeros((rows, classifier.head.fc.out_features), dtype=np.float32)
    return probs, present


def decide(probs: torch.Tensor | np.ndarray, threshold: float | None) -> torch.Tensor | np.ndarray:
    """Each row's class index (int64, as torch or numpy like `probs`): with a one-vs-rest `threshold`, 1 where the
    positive class's probability reaches it; otherwise the most probable class."""
    if threshold is None:
        return probs.argmax(1)
    positive = probs[:, 1] >= threshold
    return positive.long() if isinstance(positive, torch.Tensor) else positive.astype(np.int64)


def ranked(probs: torch.Tensor, k: int, threshold: float | None = None) -> list[torch.Tensor]:
    """Per row, on `probs`' device: the label's class index (`decide`) and its probability, and the top `k` class
    indices and their probabilities (int32 indices, as `classify dir` stores them)."""
    top1 = decide(probs, threshold)
    scores, idx = probs.topk(k, dim=1)
    return [top1.int(), probs.gather(1, top1[:, None])[:, 0], idx.int(), scores]


def top_k(probs: np.ndarray, classes: list[str], k: int) -> tuple[list[list[str]], list[list[float]]]:
    """Each row's `k` most probable classes and their probabilities, most probable first (ties in class order)."""
    k = min(k, len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return ([[classes[j] for j in row] for row in order],
            [[float(probs[i, j]) for j in row] for i, row in enumerate(order)])
