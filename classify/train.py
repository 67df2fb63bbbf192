"""`classify train`: a linear probe on cached embeddings, then fine-tuning of the backbone's last blocks.

Stage 1 trains the head on the workspace's cached embeddings (the ones `curator clean` computed) in seconds, with its
L2 strength chosen on the val split. Stage 2 (when `epochs > 0`) fine-tunes the last `unfreeze` blocks together with
that head on augmented crops, with label smoothing, class-balanced loss weights, AdamW with a cosine schedule after a
warm-up, and early stopping on val macro-F1; the best epoch is kept, not the last. Both stages are seeded and
deterministic on CPU for a given seed and thread count.

Optional: `positive` trains one class against all others (a decision threshold chosen on val); `target_dir` adds
domain-adversarial training (DANN) towards unlabeled images of another domain.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from classify import checkpoint
from classify.data import PixelCache, SplitTable, file_items, fill_pixel_cache, folder_images, read_split_table
from classify.model import Classifier, set_train_mode, set_trainable
from curator.backbones import TRAIN_BACKBONE, load_backbone
from curator.embed import EmbeddingCache, cache_for, default_workers
from curator.errors import UsageError
from curator.ownership import claim
from curator.runtime import Runtime, configure_allocator, select_runtime

Event = Callable[[str, dict], None]


@dataclass
class TrainSettings:
    """Everything that decides the model; written into model.json."""

    model: str = TRAIN_BACKBONE
    weights: str | None = None
    epochs: int = 0  # stage 2 off by default: on wikiart-dev it lowered artist-disjoint test accuracy
    unfreeze: int = 2
    # second-order style statistics in the features: off by default, since with the cached centre-crop features they
    # moved wikiart-dev's 5-fold accuracy +1.5 points and its fixed test -1.5, at 4.6x the cache (docs/BENCHMARKS.md)
    gram: bool = False
    batch_size: int = 32
    lr: float = 3e-4  # backbone; the head gets `head_lr_scale` times more
    head_lr_scale: float = 3.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    dropout: float = 0.2
    balance: str = "loss"  # loss | sampler | none
    patience: int = 4
    min_scale: float = 0.35  # random resized crop: smallest share of the image's area
    rotation: float = 8.0  # degrees
    jitter: float = 0.15  # brightness/contrast/saturation; hue gets a fifth of it
    probe_l2: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    probe_steps: int = 200
    tta: bool = True  # average with the horizontal flip at evaluation
    positive: str | None = None
    positive_column: str = "label"
    min_precision: float | None = None
    target_dir: str | None = None
    dann_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.unfreeze < 0 or self.batch_size < 2 or self.patience < 1:
            raise UsageError("epochs and unfreeze must be >= 0, batch size >= 2, patience >= 1")
        if self.balance not in ("loss", "sampler", "none"):
            raise UsageError(f"--balance must be loss, sampler or none, not {self.balance!r}")
        if self.positive_column not in ("label", "group"):
            raise UsageError(f"--positive-column must be label or group, not {self.positive_column!r}")
        if self.min_precision is not None and not 0 < self.min_precision <= 1:
            raise UsageError("--min-precision must be in (0, 1]")
        if not 0 < self.min_scale <= 1:
            raise UsageError("--min-scale must be in (0, 1]")
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Every rate, weight and probability is a finite number in its range (NaN passes no comparison)."""
        ranges = {"lr": (0, None), "head_lr_scale": (0, None), "weight_decay": (0, None), "warmup_epochs": (0, None),
                  "label_smoothing": (0, 1), "dropout": (0, 1), "rotation": (0, 180), "jitter": (0, 1),
                  "dann_weight": (0, None)}
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low
                    and (high is None or value < high or (value == high and name == "rotation"))):
                span = f"[{low}, {high})" if high is not None else f">= {low}"
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number {span}, got {value!r}")
        if not self.probe_l2 or not all(math.isfinite(v) and v > 0 for v in self.probe_l2):
            raise UsageError(f"--probe-l2 must be positive finite numbers, got {self.probe_l2!r}")
        if self.probe_steps < 1 or (self.workers is not None and self.workers < 0):
            raise UsageError("--probe-steps must be >= 1 and --workers >= 0")


@dataclass
class TrainResult:
    run_dir: Path
    classes: list[str]
    history: list[dict]
    val: dict
    timings: dict[str, float]
    skipped: dict[str, str]
    runtime: Runtime
    best_epoch: int
    threshold: float | None = None
    target: dict | None = None
    warnings: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- metrics


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse class frequency, mean 1 over the samples: every class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return w[labels].astype(np.float32)


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


# ---------------------------------------------------------------------------------------------------- data


class Crops:
    """Pixel-cache rows to uint8 CHW crops of side `preprocess.crop`: random augmented crops for training (with
    `settings`), otherwise the model's centre crop (`Preprocess.crop_square`), which gives exactly the pixels
    `curator clean` and `classify dir` feed the model."""

    def __init__(self, cache: PixelCache, rows: np.ndarray, settings: TrainSettings | None):
        self.cache = cache
        self.rows = rows
        self.preprocess = cache.preprocess
        self.size = cache.preprocess.crop
        self.settings = settings
        self._augment = None

    def __len__(self) -> int:
        return len(self.rows)

    def _build(self):
        from torchvision.transforms import v2

        s = self.settings
        assert s is not None
        return v2.Compose([
            v2.RandomResizedCrop(self.size, scale=(s.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(s.rotation),
            v2.ColorJitter(s.jitter, s.jitter, s.jitter, s.jitter / 5),
        ])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        square = self.cache.pixels(int(self.rows[i]))
        if self.settings is None:
            return torch.from_numpy(self.preprocess.crop_square(square)), i
        pix = torch.from_numpy(np.array(square)).permute(2, 0, 1)
        if self._augment is None:
            self._augment = self._build()
        return self._augment(pix).contiguous(), i


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------------- stages


def train_probe(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, val_features: torch.Tensor,
                val_labels: np.ndarray, head: nn.Module, settings: TrainSettings) -> tuple[dict, list[dict]]:
    """Fit `head` (a FeatureHead, statistics set) on fixed features: multinomial logistic regression by full-batch
    L-BFGS (deterministic), for each L2 strength; keep the one with the best val macro-F1. Returns the best state and
    one record per strength."""
    n_classes = head.fc.out_features
    initial = copy.deepcopy(head.state_dict())
    best_state, best_key, records = None, None, []
    loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=settings.label_smoothing)
    for l2 in settings.probe_l2:
        head.load_state_dict(initial)
        nn.init.zeros_(head.fc.weight)
        nn.init.zeros_(head.fc.bias)
        opt = torch.optim.LBFGS(head.fc.parameters(), lr=1.0, max_iter=settings.probe_steps,
                                history_size=20, line_search_fn="strong_wolfe")
        x = head.standardise(features)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (loss_fn(head.fc(x), labels) * weights).mean() + l2 * head.fc.weight.pow(2).sum()
            loss.backward()
            return loss

        loss = opt.step(closure).item()
        head.eval()
        with torch.no_grad():
            pred = head(val_features).argmax(1).numpy()
        f1 = macro_f1(val_labels, pred, n_classes)
        acc = float((pred == val_labels).mean())
        records.append({"l2": l2, "val_accuracy": acc, "val_macro_f1": f1, "train_loss": loss})
        if best_key is None or f1 > best_key:
            best_key, best_state = f1, copy.deepcopy(head.state_dict())
    return best_state, records


@torch.inference_mode()
def predict_pixels(classifier: Classifier, loader, runtime: Runtime, tta: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (and features) for every item of a centre-crop loader, in order."""
    device = torch.device(runtime.device)
    probs, feats = [], []
    for pixels, _ in loader:
        pixels = pixels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=runtime.torch_dtype, enabled=runtime.autocast):
            f = classifier.features(pixels)
            p = torch.softmax(classifier.head(f).float(), dim=1)
            if tta:
                p = (p + torch.softmax(classifier(pixels.flip(3)).float(), dim=1)) / 2
        probs.append(p.cpu())
        feats.append(f.float().cpu())
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


def _training_runtime(settings: TrainSettings) -> Runtime:
    runtime = select_runtime(settings.device, settings.dtype)
    if runtime.device == "cuda" and settings.dtype == "auto" and torch.cuda.is_bf16_supported():
        # bf16 needs no loss scaling; fp16 training would
        return Runtime("cuda", "bfloat16", "CUDA training: bf16 autocast")
    return runtime


def _history_csv(history: list[dict]) -> str:
    keys = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def _features_for(table_frame: pl.DataFrame, emb: EmbeddingCache, classifier: Classifier, pixels: PixelCache,
                  runtime: Runtime, batch_size: int) -> np.ndarray:
    """Cached embeddings of the rows; the ones missing are computed from the pixel cache and added to the cache."""
    shas = table_frame["sha256"].to_list()
    missing = sorted({s for s in shas if s not in emb})
    if missing:
        loader = torch.utils.data.DataLoader(Crops(pixels, pixels.rows(missing), None), batch_size=batch_size)
        _, feats = predict_pixels(classifier, loader, runtime, tta=False)
        emb.append(missing, feats)
    if unusable := emb.missing(shas):
        raise UsageError(f"the backbone gave non-finite features (NaN or inf) for {len(unusable)} images (e.g. sha256 "
                         f"{unusable[0][:12]}); check --weights and --dtype")
    return emb.get(shas)


def _encode(frame: pl.DataFrame, classes: list[str], settings: TrainSettings) -> np.ndarray:
    if settings.positive is None:
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[c] for c in frame["label"].to_list()], dtype=np.int64)
    return (frame[settings.positive_column] == settings.positive).fill_null(False).to_numpy().astype(np.int64)


def _write_state(run_dir: Path, classifier: Classifier, meta: dict) -> None:
    checkpoint.save(run_dir, classifier.state_dict(), meta)


def _is_run_folder(folder: Path) -> bool:
    """An unmarked folder an earlier `classify train` wrote (its model.json is in atelier's checkpoint format)."""
    try:
        meta = json.loads((folder / checkpoint.META_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == checkpoint.FORMAT


def train(splits: Path, run_dir: Path, settings: TrainSettings | None = None, events: Event | None = None,
          table: SplitTable | None = None) -> TrainResult:
    """Train a classifier on the train split of `splits`, select on val, and write `run_dir` (checkpoint,
    history.csv). See the module docstring for the stages."""
    settings = settings or TrainSettings()
    emit = events or (lambda kind, info: None)
    timings: dict[str, float] = {}
    warnings: list[str] = []
    t_start = time.perf_counter()
    configure_allocator()
    table = table or read_split_table(splits)
    run_dir = claim(Path(run_dir), "run", "--out", adopt=_is_run_folder(Path(run_dir)))
    if settings.positive is not None:
        values = set(table.frame[settings.positive_column].drop_nulls().to_list())
        if settings.positive not in values:
            raise UsageError(f"--positive {settings.positive!r} is not a {settings.positive_column} in the splits "
                             f"file (e.g. {', '.join(sorted(values)[:5])})")
        classes = [f"not {settings.positive}", settings.positive]
        for split in ("train", "val"):
            if _encode(table.rows(split), classes, settings).sum() == 0:
                raise UsageError(f"--positive {settings.positive!r} has no {split} rows; with artist-grouped splits "
                                 f"an artist is in one split only: split without --group-pattern for one artist "
                                 f"against the rest")
    else:
        classes = table.classes
    runtime = _training_runtime(settings)
    generator = seed_everything(settings.seed)
    workers = default_workers() if settings.workers is None else settings.workers

    t = time.perf_counter()
    backbone = load_backbone(settings.model, Path(settings.weights) if settings.weights else None,
                             gram=settings.gram)
    classifier = Classifier(backbone, len(classes), settings.dropout)
    device = torch.device(runtime.device)
    timings["load backbone"] = time.perf_counter() - t

    # pixels, decoded once into the workspace's pixel cache
    t = time.perf_counter()
    preprocess = backbone.preprocess
    pixels = PixelCache(table.workspace / "cache" / "pixels", preprocess)
    items = file_items(table.frame)
    emit("stage", {"name": "decode", "total": len(items)})
    failed = fill_pixel_cache(pixels, items, workers, progress=lambda n: emit("advance", {"n": n}))
    warnings.extend(pixels.warnings)
    skipped = {}
    if failed:
        bad = table.frame.filter(pl.col("sha256").is_in(list(failed)))
        skipped = {p: failed[s] for p, s in zip(bad["rel_path"].to_list(), bad["sha256"].to_list())}
        warnings.append(f"{len(skipped)} images skipped (missing, changed or unreadable), e.g. "
                        f"{next(iter(skipped))}: {next(iter(skipped.values()))}")
        table = SplitTable(table.frame.filter(~pl.col("sha256").is_in(list(failed))), table.classes, table.root,
                           table.workspace, table.splits_path, table.splits_sha256, table.backbone_key)
        for split in ("train", "val"):
            if table.rows(split).is_empty():
                raise UsageError(f"no readable {split} images left after skipping {len(skipped)}")
        if settings.positive is None:
            left = set(table.rows("train")["label"].to_list())
            if lost := [c for c in classes if c not in left]:
                raise UsageError(f"classes with no readable train images: {', '.join(lost)}")
    target_frame, target_info = None, None
    if settings.target_dir:
        if settings.epochs == 0:
            raise UsageError("--target-dir adapts the fine-tuned layers: it needs --epochs > 0")
        target_frame, unreadable = target_items(Path(settings.target_dir), classes if settings.positive is None else [])
        if unreadable:
            warnings.append(f"{len(unreadable)} target files unreadable, e.g. {next(iter(unreadable))}")
        emit("stage", {"name": "decode target", "total": target_frame.height})
        t_failed = fill_pixel_cache(pixels, file_items(target_frame),
                                    workers, progress=lambda n: emit("advance", {"n": n}))
        if t_failed:
            warnings.append(f"{len(t_failed)} target images skipped (unreadable)")
            target_frame = target_frame.filter(~pl.col("sha256").is_in(list(t_failed)))
        target_info = {"dir": settings.target_dir, "images": target_frame.height,
                       "labeled": int(target_frame["label"].is_not_null().sum())}
    timings["decode to pixel cache"] = time.perf_counter() - t

    train_rows, val_rows = table.rows("train"), table.rows("val")
    y_train, y_val = _encode(train_rows, classes, settings), _encode(val_rows, classes, settings)
    if settings.positive is None:
        sample_w = train_rows["weight"].to_numpy().astype(np.float32)
        if settings.balance != "none" and np.allclose(sample_w, sample_w[0]):
            sample_w = class_weights(y_train, len(classes))
    else:
        sample_w = class_weights(y_train, 2) if settings.balance != "none" else np.ones(len(y_train), np.float32)

    # stage 1: probe on cached embeddings
    t = time.perf_counter()
    emit("stage", {"name": "embeddings", "total": None})
    classifier.to(device)
    emb = cache_for(table.workspace, backbone)
    x_train = torch.from_numpy(_features_for(train_rows, emb, classifier, pixels, runtime, settings.batch_size))
    x_val = torch.from_numpy(_features_for(val_rows, emb, classifier, pixels, runtime, settings.batch_size))
    timings["embeddings"] = time.perf_counter() - t
    warnings.extend(emb.warnings)
    t = time.perf_counter()
    head = classifier.head.cpu()
    head.set_statistics(x_train)
    best_head, probe_records = train_probe(x_train, torch.from_numpy(y_train), torch.from_numpy(sample_w), x_val,
                                           y_val, head, settings)
    head.load_state_dict(best_head)
    classifier.to(device)
    timings["stage 1 probe"] = time.perf_counter() - t
    best = max(probe_records, key=lambda r: r["val_macro_f1"])
    history = [{"epoch": 0, "stage": "probe", "train_loss": round(best["train_loss"], 5), "val_loss": None,
                "val_accuracy": round(best["val_accuracy"], 5), "val_macro_f1": round(best["val_macro_f1"], 5),
                "train_accuracy": None, "lr": None, "seconds": round(timings["stage 1 probe"], 2)}]
    emit("epoch", history[-1])

    val_loader = torch.utils.data.DataLoader(Crops(pixels, pixels.rows(val_rows["sha256"].to_list()), None),
                                             batch_size=64, num_workers=0)
    meta = {
        "backbone": {"name": backbone.name, "key": backbone.key, "weights_origin": backbone.weights_origin,
                     "feature_layout": backbone.feature_layout},
        "feature": ("pooled + style statistics" + (" + Gram matrices" if "gram" in backbone.feature_layout else "")
                    + " (curator.embed.forward_features), standardised"),
        "classes": classes,
        "preprocessing": checkpoint.preprocessing_meta(preprocess, "horizontal flip" if settings.tta else None),
        "settings": {**asdict(settings), "probe_l2": list(settings.probe_l2)},
        "splits": {"path": str(table.splits_path), "sha256": table.splits_sha256,
                   "counts": {s: len(table.rows(s)) for s in ("train", "val", "test")}},
        "runtime": {"device": runtime.device, "dtype": runtime.dtype, "reason": runtime.reason},
        "probe": probe_records,
        "skipped": skipped,
    }
    best_epoch, best_f1, best_state = 0, best["val_macro_f1"], None
    target: _TargetStream | None = None

    # stage 2: fine-tune
    if settings.epochs > 0:
        # seeded again here: filling the caches above draws from the global RNG (a DataLoader takes its base seed
        # from it) only when something was missing, and a rerun on warm caches must fine-tune the same way
        generator = seed_everything(settings.seed)
        trainable = set_trainable(classifier.net, settings.unfreeze)
        params_backbone = [p for m in trainable for p in m.parameters()]
        no_decay = {id(p) for m in trainable for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
                    for p in mod.parameters()} | {id(p) for p in params_backbone if p.ndim == 1}
        groups = [
            {"params": [p for p in params_backbone if id(p) not in no_decay], "lr": settings.lr,
             "weight_decay": settings.weight_decay},
            {"params": [p for p in params_backbone if id(p) in no_decay], "lr": settings.lr, "weight_decay": 0.0},
            {"params": list(classifier.head.fc.parameters()), "lr": settings.lr * settings.head_lr_scale,
             "weight_decay": settings.weight_decay},
        ]
        if target_frame is not None:
            target = _TargetStream(settings, target_frame, pixels, workers, generator, backbone.feature_dim, device)
            groups.append({"params": list(target.domain.parameters()), "lr": settings.lr * settings.head_lr_scale,
                           "weight_decay": settings.weight_decay})
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
        train_ds = Crops(pixels, pixels.rows(train_rows["sha256"].to_list()), settings)
        if settings.balance == "sampler":
            sampler = torch.utils.data.WeightedRandomSampler(torch.from_numpy(sample_w).double(), len(train_ds),
                                                             generator=generator)
            loss_w = np.ones_like(sample_w)
        else:
            sampler = torch.utils.data.RandomSampler(train_ds, generator=generator)
            loss_w = sample_w
        loss_w_t = torch.from_numpy(loss_w).to(device)
        y_train_t = torch.from_numpy(y_train).to(device)
        loader = torch.utils.data.DataLoader(
            train_ds, batch_size=settings.batch_size, sampler=sampler, drop_last=len(train_ds) > settings.batch_size,
            num_workers=workers, worker_init_fn=_seed_worker, generator=generator,
            persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        )
        steps_per_epoch = len(loader)
        total_steps = steps_per_epoch * settings.epochs
        warmup = max(1, int(settings.warmup_epochs * steps_per_epoch))
        base_lrs = [g["lr"] for g in optimizer.param_groups]

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

        loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=settings.label_smoothing)
        step, stale = 0, 0
        best_state = copy.deepcopy(classifier.state_dict())
        for epoch in range(1, settings.epochs + 1):
            t_epoch = time.perf_counter()
            set_train_mode(classifier, trainable)
            emit("stage", {"name": f"epoch {epoch}/{settings.epochs}", "total": steps_per_epoch})
            total_loss, correct, seen = 0.0, 0, 0
            for pixels_b, idx in loader:
                for g, base in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = base * lr_factor(step)
                pixels_b = pixels_b.to(device, non_blocking=True)
                idx = idx.to(device)
                with torch.autocast(device.type, dtype=runtime.torch_dtype, enabled=runtime.autocast):
                    feats = classifier.features(pixels_b)
                    logits = classifier.head(feats).float()
                    loss = (loss_fn(logits, y_train_t[idx]) * loss_w_t[idx]).mean()
                    if target is not None:
                        loss = loss + settings.dann_weight * target.loss(classifier, feats, step / total_steps)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                total_loss += loss.item() * len(idx)
                correct += int((logits.argmax(1) == y_train_t[idx]).sum())
                seen += len(idx)
                emit("advance", {"n": 1})
            classifier.eval()
            probs, _ = predict_pixels(classifier, val_loader, runtime, settings.tta)
            pred = probs.argmax(1)
            val_loss = float(-np.log(np.clip(probs[np.arange(len(y_val)), y_val], 1e-9, 1)).mean())
            f1 = macro_f1(y_val, pred, len(classes))
            row = {"epoch": epoch, "stage": "fine-tune", "train_loss": round(total_loss / max(seen, 1), 5),
                   "val_loss": round(val_loss, 5), "val_accuracy": round(float((pred == y_val).mean()), 5),
                   "val_macro_f1": round(f1, 5), "train_accuracy": round(correct / max(seen, 1), 5),
                   "lr": round(base_lrs[0] * lr_factor(step - 1), 7),
                   "seconds": round(time.perf_counter() - t_epoch, 2)}
            history.append(row)
            emit("epoch", row)
            if f1 > best_f1:
                best_f1, best_epoch, stale = f1, epoch, 0
                best_state = copy.deepcopy(classifier.state_dict())
                _write_state(run_dir, classifier, {**meta, "history": history, "best_epoch": best_epoch,
                                                   "complete": False})
            else:
                stale += 1
                if stale >= settings.patience:
                    emit("note", {"text": f"early stop: val macro-F1 has not improved for {stale} epochs"})
                    break
        timings["stage 2 fine-tune"] = sum(r["seconds"] for r in history if r["stage"] == "fine-tune")
        if target is not None:
            target.close()
        if best_state is not None:
            classifier.load_state_dict(best_state)

    if target_info is not None and target_info["labeled"]:
        labeled = target_frame.filter(pl.col("label").is_not_null())
        target_info["with_adaptation"] = _domain_scores(classifier, labeled, classes, pixels, runtime, settings)
        # the same training without the domain loss, same seed, for the comparison the option exists to make
        emit("note", {"text": "training the same model without adaptation, for comparison on the target"})
        baseline = train(splits, run_dir / "no-adaptation", replace(settings, target_dir=None), events, table)
        base_model = checkpoint.load(baseline.run_dir).classifier.to(device)
        target_info["without_adaptation"] = _domain_scores(base_model, labeled, classes, pixels, runtime, settings)
        target_info["without_adaptation_run"] = str(baseline.run_dir)
    if target_info is not None:
        target_info["final_domain_accuracy"] = (round(float(np.mean(target.domain_accuracy[-20:])), 4)
                                                if target is not None and target.domain_accuracy else None)
        meta["target"] = target_info

    # final val metrics of the kept model, and the threshold for one-vs-rest
    classifier.eval()
    t = time.perf_counter()
    probs, _ = predict_pixels(classifier, val_loader, runtime, settings.tta)
    pred = probs.argmax(1)
    val = {"accuracy": float((pred == y_val).mean()), "macro_f1": macro_f1(y_val, pred, len(classes)),
           "images": len(y_val)}
    threshold = None
    if settings.positive is not None:
        threshold, at = choose_threshold(probs[:, 1], y_val, settings.min_precision)
        val.update({"threshold": threshold, **{f"positive_{k}": v for k, v in at.items()}})
    timings["final val"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    meta.update(history=history, best_epoch=best_epoch, val=val, threshold=threshold,
                timings={k: round(v, 2) for k, v in timings.items()}, complete=True, warnings=warnings)
    _write_state(run_dir, classifier, meta)
    checkpoint._atomic_bytes(run_dir / "history.csv", _history_csv(history).encode())
    return TrainResult(run_dir, classes, history, val, timings, skipped, runtime, best_epoch, threshold,
                       target_info, warnings)


def _domain_scores(classifier: Classifier, frame: pl.DataFrame, classes: list[str], pixels: PixelCache,
                   runtime: Runtime, settings: TrainSettings) -> dict:
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in frame["label"].to_list()])
    loader = torch.utils.data.DataLoader(Crops(pixels, pixels.rows(frame["sha256"].to_list()), None), batch_size=64)
    classifier.eval()
    probs, _ = predict_pixels(classifier, loader, runtime, settings.tta)
    pred = probs.argmax(1)
    return {"accuracy": round(float((pred == y).mean()), 4), "macro_f1": round(macro_f1(y, pred, len(classes)), 4),
            "images": len(y)}


class _GradientReversal(torch.autograd.Function):
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


class _TargetStream:
    """Unlabeled target-domain batches and a domain classifier behind a gradient-reversal layer (DANN)."""

    def __init__(self, settings: TrainSettings, frame: pl.DataFrame, pixels: PixelCache, workers: int,
                 generator: torch.Generator, feature_dim: int, device: torch.device):
        self.frame = frame
        ds = Crops(pixels, pixels.rows(frame["sha256"].to_list()), settings)
        self.loader = torch.utils.data.DataLoader(
            ds, batch_size=settings.batch_size, shuffle=True, drop_last=len(ds) > settings.batch_size,
            num_workers=min(workers, 1), worker_init_fn=_seed_worker, generator=generator,
            persistent_workers=workers > 0)
        self._iter = iter(self.loader)
        self.domain = nn.Sequential(nn.Linear(feature_dim, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 1))
        self.domain.to(device)
        self.device = device
        self.last_coefficient = 0.0
        self.domain_accuracy: list[float] = []

    def _next(self) -> torch.Tensor:
        try:
            pixels, _ = next(self._iter)
        except StopIteration:
            self._iter = iter(self.loader)
            pixels, _ = next(self._iter)
        return pixels.to(self.device, non_blocking=True)

    def loss(self, classifier: Classifier, source_features: torch.Tensor, progress: float) -> torch.Tensor:
        """Domain-classification loss on source and target features, reversed into the feature extractor."""
        target_features = classifier.features(self._next())
        feats = torch.cat([classifier.head.standardise(source_features), classifier.head.standardise(target_features)])
        self.last_coefficient = dann_coefficient(progress)
        logits = self.domain(_GradientReversal.apply(feats, self.last_coefficient)).squeeze(1).float()
        domain = torch.cat([torch.zeros(len(source_features)), torch.ones(len(target_features))]).to(logits.device)
        self.domain_accuracy.append(float(((logits > 0).float() == domain).float().mean()))
        return nn.functional.binary_cross_entropy_with_logits(logits, domain)

    def close(self) -> None:
        self._iter = None
