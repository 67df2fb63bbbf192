"""Stage 2 of `classify train`: fine-tune the backbone's last blocks together with the probe's head, on timm's tools.

- Freezing: timm's `freeze`/`unfreeze` (`classify.classifier.set_trainable`); frozen blocks keep their batch-norm
  statistics (eval mode).
- Optimizer: AdamW from `timm.optim.create_optimizer_v2`, over parameter groups from timm's
  `param_groups_weight_decay` (no weight decay on biases and norm weights); the head and DANN's domain classifier run
  at `head_lr_scale` times the backbone's rate through the groups' `lr_scale`, which timm's schedulers apply.
- Schedule: `timm.scheduler.CosineLRScheduler`, a linear warm-up over `warmup_epochs` (at least one update) from
  lr / warm-up updates to lr, then a cosine to 0 at the last update, stepped per update.
- Precision: the runtime's autocast; under fp16 (CUDA without bf16, or `--dtype fp16`) a `torch.amp.GradScaler`
  scales the loss so that small gradients do not underflow (bf16 and fp32 need none, and get none).
- Loss: label smoothing, per-row weights (class balance) unless the sampler balances, plus DANN's domain loss with a
  target domain; early stopping on val macro-F1, the best epoch kept.

Randomness: the epoch orders and crop seeds come from a generator seeded with the run's seed; dropout, which takes no
generator, draws from the default generators inside `classify.rng.private_rng(seed)`, so the stage is the same on a
rerun whatever ran before it and the process's generators are left as they were.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from classify.classifier import Classifier, set_train_mode, set_trainable
from classify.dann import DomainObjective, Target
from classify.inference import predict_rows
from classify.rng import private_rng
from classify.scores import val_scores
from classify.train_settings import TrainSettings
from classify.trainset import Order, TrainingData
from curator.core.progress import Event
from curator.core.runtime import Runtime


def optimizer_for(classifier: Classifier, settings: TrainSettings, domain: nn.Module | None = None):
    """AdamW (timm's factory) over the trainable parameters of the backbone (at `lr`), the head and `domain` (at
    `lr * head_lr_scale`), each split by timm into a decayed group and a no-decay group (one-dimensional
    parameters: biases, norm weights). Frozen parameters are in no group."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    groups = param_groups_weight_decay(classifier.net, settings.weight_decay)
    for module in (classifier.head, domain):
        if module is not None:
            groups += [{**group, "lr_scale": settings.head_lr_scale}
                       for group in param_groups_weight_decay(module, settings.weight_decay)]
    return create_optimizer_v2(groups, "adamw", lr=settings.lr, weight_decay=settings.weight_decay)


def schedule_for(optimizer: torch.optim.Optimizer, settings: TrainSettings, steps_per_epoch: int):
    """timm's cosine schedule with a linear warm-up, in updates (`step_update(updates done)` after each): the first
    update at lr / warm-up, lr after the warm-up, 0 after the last update."""
    from timm.scheduler import CosineLRScheduler

    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(settings.warmup_epochs * steps_per_epoch))
    # cycle_decay only acts on cycles after the first, of which cycle_limit=1 has none; other than 1 it keeps timm
    # from warning that a one-update cosine "will have no effect" (the warm-up still does)
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=0.0, warmup_t=warmup,
                             warmup_lr_init=settings.lr / warmup, warmup_prefix=True, t_in_epochs=False,
                             cycle_limit=1, cycle_decay=0.5)


def grad_scaler(runtime: Runtime) -> torch.amp.GradScaler:
    """A loss scaler enabled exactly when the run trains under fp16 autocast: fp16's five exponent bits flush small
    gradients to zero without it; bf16 (fp32's exponent) and fp32 need none."""
    return torch.amp.GradScaler(runtime.device, enabled=runtime.autocast and runtime.dtype == "float16")


class FineTuner:
    """Stage 2's optimisation state for one run: the trainable modules, optimizer, schedule, loss scaler and loss;
    `step` makes one update. `labels` and `weights` are per train row (positions index them); the model stays on
    the device it is on, and the runtime says which autocast it trains under."""

    def __init__(self, classifier: Classifier, settings: TrainSettings, runtime: Runtime, steps_per_epoch: int,
                 labels: np.ndarray, weights: np.ndarray, objective: DomainObjective | None = None):
        self.classifier = classifier
        self.runtime = runtime
        self.device = classifier.pixel_mean.device
        self.trainable = set_trainable(classifier.net, settings.unfreeze)
        self.optimizer = optimizer_for(classifier, settings, objective.domain if objective is not None else None)
        self.scheduler = schedule_for(self.optimizer, settings, steps_per_epoch)
        self.scaler = grad_scaler(runtime)
        self.loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=settings.label_smoothing)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.weights = torch.from_numpy(weights).to(self.device)
        self.objective = objective
        self.dann_weight = settings.dann_weight
        self.total = steps_per_epoch * settings.epochs
        self.updates = 0
        self.last_lr: float | None = None

    def train_mode(self) -> None:
        """Train mode for the head and the unfrozen modules (`set_train_mode`)."""
        set_train_mode(self.classifier, self.trainable)

    def _loss(self, pixels: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's weighted, label-smoothed loss (plus the domain loss) and its logits, under autocast."""
        with torch.autocast(self.runtime.device, dtype=self.runtime.torch_dtype, enabled=self.runtime.autocast):
            feats = self.classifier.features(pixels)
            logits = self.classifier.head(feats).float()
            loss = (self.loss_fn(logits, self.labels[rows]) * self.weights[rows]).mean()
            if self.objective is not None:
                loss = loss + self.dann_weight * self.objective.loss(self.classifier, feats, self.updates / self.total)
        return loss, logits

    def step(self, pixels: torch.Tensor, positions: torch.Tensor) -> tuple[float, int]:
        """One update on a uint8 batch of the train rows at `positions`: (its mean loss, correct predictions)."""
        rows = positions.to(self.device)
        loss, logits = self._loss(pixels.to(self.device, non_blocking=True), rows)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        group = self.optimizer.param_groups[0]
        self.last_lr = group["lr"] / group.get("lr_scale", 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.updates += 1
        self.scheduler.step_update(self.updates)
        return loss.item(), int((logits.argmax(1) == self.labels[rows]).sum())


def train_order(data: TrainingData, settings: TrainSettings, generator: torch.Generator) -> tuple[Order, np.ndarray]:
    """Each epoch's order of the train rows, drawn from `generator`, and the per-row loss weights: with
    `balance="sampler"` rows drawn with replacement in proportion to their weights (the loss unweighted), otherwise
    a permutation (the loss weighted)."""
    n = len(data.y_train)
    if settings.balance == "sampler":
        sampler = torch.utils.data.WeightedRandomSampler(torch.from_numpy(data.weights).double(), n,
                                                         generator=generator)
        return (lambda: list(sampler)), np.ones_like(data.weights)
    sampler = torch.utils.data.RandomSampler(range(n), generator=generator)
    return (lambda: list(sampler)), data.weights


@dataclass
class FineTuneResult:
    history: list[dict]  # one row per epoch run
    best_epoch: int  # 0: no epoch beat the probe, whose state is kept
    objective: DomainObjective | None  # DANN's, when a target domain was given

    @property
    def seconds(self) -> float:
        return sum(r["seconds"] for r in self.history)


def _epoch(tuner: FineTuner, loader, emit: Event) -> tuple[float, float]:
    """One pass over the train batches: (mean loss, accuracy) on the augmented crops."""
    tuner.train_mode()
    total_loss, correct, seen = 0.0, 0, 0
    for pixels, positions in loader:
        loss, right = tuner.step(pixels, positions)
        total_loss += loss * len(positions)
        correct += right
        seen += len(positions)
        emit("advance", {"n": 1})
    return total_loss / max(seen, 1), correct / max(seen, 1)


def fine_tune(classifier: Classifier, data: TrainingData, source, settings: TrainSettings, runtime: Runtime,
              emit: Event, probe_f1: float, on_best: Callable[[list[dict], int], None],
              target: Target | None = None) -> FineTuneResult:
    """Stage 2 (module docstring) from the probe's state, whose val macro-F1 is `probe_f1`: up to `epochs` epochs of
    augmented batches from `source` (a `classify.trainset` pixel source), each followed by val on centre crops;
    `on_best(history, epoch)` after every epoch that beats the best so far; stops after `patience` epochs without
    one. The classifier ends with the best epoch's state (the probe's if none beat it)."""
    generator = torch.Generator().manual_seed(settings.seed)
    with private_rng(settings.seed, runtime.device):
        objective = None
        if target is not None:
            n = target.frame.height
            batches = source.training(target.frame, lambda: torch.randperm(n, generator=generator).tolist(),
                                      settings, generator, max_workers=1)
            objective = DomainObjective(batches, classifier.backbone.feature_dim, classifier.pixel_mean.device)
        order, loss_weights = train_order(data, settings, generator)
        loader = source.training(data.train, order, settings, generator)
        tuner = FineTuner(classifier, settings, runtime, len(loader), data.y_train, loss_weights, objective)
        history, best_epoch = _run_epochs(tuner, loader, source, data, settings, emit, probe_f1, on_best)
    if objective is not None:
        objective.close()
    return FineTuneResult(history, best_epoch, objective)


def _run_epochs(tuner: FineTuner, loader, source, data: TrainingData, settings: TrainSettings, emit: Event,
                best_f1: float, on_best: Callable[[list[dict], int], None]) -> tuple[list[dict], int]:
    """The epoch loop with val (centre crops from `source`) and early stopping; loads the best state at the end.
    Returns (history, best epoch)."""
    classifier, history, best_epoch, stale = tuner.classifier, [], 0, 0
    val_batches = source.centre(data.val)
    best_state = copy.deepcopy(classifier.state_dict())
    for epoch in range(1, settings.epochs + 1):
        t = time.perf_counter()
        emit("stage", {"name": f"epoch {epoch}/{settings.epochs}", "total": len(loader)})
        train_loss, train_accuracy = _epoch(tuner, loader, emit)
        classifier.eval()
        probs, present = predict_rows(classifier, val_batches, len(data.y_val), tuner.runtime, settings.tta)
        scores = val_scores(probs, present, data.y_val, len(data.classes))
        history.append({"epoch": epoch, "stage": "fine-tune", "train_loss": round(train_loss, 5),
                        **{k: round(v, 5) for k, v in scores.items()}, "train_accuracy": round(train_accuracy, 5),
                        "lr": round(tuner.last_lr, 7) if tuner.last_lr is not None else None,
                        "seconds": round(time.perf_counter() - t, 2), "data": source.kind})
        emit("epoch", history[-1])
        if scores["val_macro_f1"] > best_f1:
            best_f1, best_epoch, stale = scores["val_macro_f1"], epoch, 0
            best_state = copy.deepcopy(classifier.state_dict())
            on_best(history, best_epoch)
        else:
            stale += 1
            if stale >= settings.patience:
                emit("note", {"text": f"early stop: val macro-F1 has not improved for {stale} epochs"})
                break
    classifier.load_state_dict(best_state)
    return history, best_epoch
