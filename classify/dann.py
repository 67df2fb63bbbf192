"""Domain-adversarial training (DANN, Ganin et al. 2016) towards unlabeled images of another domain (`--target-dir`).

During stage 2, each update also draws a batch of target images; a small domain classifier learns to tell source
from target features, and a gradient-reversal layer turns its loss into one that makes the fine-tuned layers' features
harder to tell apart (`DomainObjective`). Target images under folders named for a class give target accuracy, with and
without adaptation (`domain_scores`; `classify.train` trains the same model without the domain loss to compare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from classify.classifier import Classifier
from classify.data import PixelCache, file_items, fill_pixel_cache, folder_images
from classify.inference import predict_rows
from classify.scores import macro_f1
from classify.train_settings import TrainSettings
from curator.core.errors import UsageError
from curator.core.progress import Event
from curator.core.runtime import Runtime


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -coefficient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coefficient * grad, None


def dann_coefficient(progress: float) -> float:
    """The usual DANN ramp (Ganin et al. 2016): 0 at the start, approaching 1 as training progresses."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def target_items(target_dir: Path, classes: list[str]) -> tuple[pl.DataFrame, dict[str, str]]:
    """Images under `target_dir` (path, rel_path, sha256, label; label = first folder when it names a class) and the
    files that could not be read."""
    target_dir = Path(target_dir)
    if not target_dir.is_dir():
        raise UsageError(f"--target-dir {target_dir} is not a folder")
    frame, unreadable = folder_images(target_dir, classes)
    if frame.is_empty():
        raise UsageError(f"--target-dir {target_dir} holds no images")
    return frame, unreadable


@dataclass
class Target:
    """The target domain's readable images, and warnings about the files under `dir` that could not be read."""

    dir: str
    frame: pl.DataFrame
    warnings: list[str] = field(default_factory=list)

    def info(self) -> dict:
        """model.json's `target` as far as the images go: folder, images, labeled images."""
        return {"dir": self.dir, "images": self.frame.height, "labeled": int(self.frame["label"].is_not_null().sum())}


def read_target(settings: TrainSettings, classes: list[str]) -> Target | None:
    """The run's target domain (None without `target_dir`); labels only for a multi-class run. UsageError when
    there is nothing to adapt (no fine-tuning) or no image."""
    if not settings.target_dir:
        return None
    if settings.epochs == 0:
        raise UsageError("--target-dir adapts the fine-tuned layers: it needs --epochs > 0")
    frame, unreadable = target_items(Path(settings.target_dir), classes if settings.positive is None else [])
    warnings = [f"{len(unreadable)} target files unreadable, e.g. {next(iter(unreadable))}"] if unreadable else []
    return Target(settings.target_dir, frame, warnings)


def cache_target(target: Target, pixels: PixelCache, workers: int, emit: Event) -> tuple[Target, str | None]:
    """Decode the target images into the pixel cache: the target without the ones that failed, and a warning when
    some did."""
    emit("stage", {"name": "decode target", "total": target.frame.height})
    failed = fill_pixel_cache(pixels, file_items(target.frame), workers,
                              events=emit)
    if not failed:
        return target, None
    kept = target.frame.filter(~pl.col("sha256").is_in(list(failed)))
    return Target(target.dir, kept, target.warnings), f"{len(failed)} target images skipped (unreadable)"


class DomainObjective:
    """Unlabeled target batches and a domain classifier behind a gradient-reversal layer: `loss` is the
    domain-classification loss on a source batch's features and the next target batch's, reversed into the
    feature extractor. `domain` trains with the head (its parameters join the optimizer at the head's rate)."""

    def __init__(self, batches, feature_dim: int, device: torch.device):
        self.batches = batches  # augmented (pixels, positions) target batches, reshuffled each pass
        self._iter = iter(self.batches)
        self.domain = nn.Sequential(nn.Linear(feature_dim, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 1))
        self.domain.to(device)
        self.device = device
        self.last_coefficient = 0.0
        self.domain_accuracy: list[float] = []

    def _next(self) -> torch.Tensor:
        try:
            pixels, _ = next(self._iter)
        except StopIteration:
            self._iter = iter(self.batches)
            pixels, _ = next(self._iter)
        return pixels.to(self.device, non_blocking=True)

    def loss(self, classifier: Classifier, source_features: torch.Tensor, progress: float) -> torch.Tensor:
        """Domain-classification loss on source and target features, reversed into the feature extractor, with the
        DANN ramp at `progress` (0..1 of the run's updates)."""
        target_features = classifier.features(self._next())
        feats = torch.cat([classifier.head.standardise(source_features), classifier.head.standardise(target_features)])
        self.last_coefficient = dann_coefficient(progress)
        logits = self.domain(GradientReversal.apply(feats, self.last_coefficient)).squeeze(1).float()
        domain = torch.cat([torch.zeros(len(source_features)), torch.ones(len(target_features))]).to(logits.device)
        self.domain_accuracy.append(float(((logits > 0).float() == domain).float().mean()))
        return nn.functional.binary_cross_entropy_with_logits(logits, domain)

    def final_accuracy(self) -> float | None:
        """The domain classifier's accuracy over the last 20 updates (0.5: it cannot tell the domains apart)."""
        return round(float(np.mean(self.domain_accuracy[-20:])), 4) if self.domain_accuracy else None

    def close(self) -> None:
        self._iter = None


def domain_scores(classifier: Classifier, frame: pl.DataFrame, classes: list[str], batches, runtime: Runtime,
                  tta: bool) -> dict:
    """Accuracy and macro-F1 of `classifier` on the labeled target images `frame` (centre-crop `batches` of them)."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in frame["label"].to_list()])
    classifier.eval()
    probs, present = predict_rows(classifier, batches, len(y), runtime, tta)
    pred, y = probs[present].argmax(1), y[present]
    return {"accuracy": round(float((pred == y).mean()), 4), "macro_f1": round(macro_f1(y, pred, len(classes)), 4),
            "images": len(y)}
