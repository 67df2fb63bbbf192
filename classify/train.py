"""`classify train`: a linear probe on cached embeddings, then fine-tuning of the backbone's last blocks.

Stage 1 trains the head on the workspace's embedding store (the vectors `curator clean` computed) in seconds, with
its L2 strength chosen on the val split. Rows the store lacks (e.g. another backbone than `clean` used) are computed
by decoding those files through the data plane (`curator.dataplane`, the loader and preprocessing of `classify dir`)
and appended to the store, so a rerun reads them. The probe reads no pixels: a probe-only run (`epochs == 0`, the
default) writes no pixel cache, and its val metrics come from the embeddings (the un-flipped centre crop: no flip
TTA, which needs pixels). Its memory is the train and val features as float32, read from the float16 store in
chunks: (train + val) x feature_dim x 4 bytes (Lite2's features are 2400 wide: 9.6 KB per image, 0.96 GB per
100,000 images; Lite0's 2304); `train_probe` standardises the train matrix in place rather than copying it.

Stage 2 (when `epochs > 0`) fine-tunes the last `unfreeze` blocks together with that head on augmented crops, with
label smoothing, class-balanced loss weights, AdamW with a cosine schedule after a warm-up, and early stopping on val
macro-F1; the best epoch is kept, not the last. Its pixels come from the workspace's pixel cache (each image decoded
once) while the images it reads fit `pixel_cache_max_gb` (and the free disk); above that, every epoch decodes its
train and val batches on the fly through the data plane (`classify.data.StreamedBatches`), in an order drawn from
the run's `torch.Generator`, with the same augmentation, each crop seeded on its own. Which way ran is in the log,
in each history row (`data`) and in model.json (`data`). Both stages are seeded and deterministic on CPU for a given
seed and thread count.

Optional: `positive` trains one class against all others (a decision threshold chosen on val); `target_dir` adds
domain-adversarial training (DANN) towards unlabeled images of another domain.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from classify import checkpoint
from classify.data import (
    PixelCache,
    SplitTable,
    StreamedBatches,
    file_items,
    fill_pixel_cache,
    folder_images,
    pixel_cache_path,
    pixel_record_bytes,
    read_split_table,
)
from classify.model import Classifier, set_train_mode, set_trainable
from curator.backbones import TRAIN_BACKBONE, load_backbone
from curator.dataplane import choose_workers, default_batch_size
from curator.embed import EmbeddingCache, cache_for, default_workers
from curator.preprocess import Preprocess
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
    # stage 2 caches decoded squares in the workspace while the images it reads take at most this many GB (10^9
    # bytes) there: 255,828 bytes per image at Lite2's preprocessing, so 32 GB holds 125,000 images (WikiArt's 80k
    # fit); above it, every epoch decodes its batches on the fly instead
    pixel_cache_max_gb: float = 32.0

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
                  "dann_weight": (0, None), "pixel_cache_max_gb": (0, None)}
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
        assert self.settings is not None
        return augmentation(self.settings, self.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        square = self.cache.pixels(int(self.rows[i]))
        if self.settings is None:
            return torch.from_numpy(self.preprocess.crop_square(square)), i
        pix = torch.from_numpy(np.array(square)).permute(2, 0, 1)
        if self._augment is None:
            self._augment = self._build()
        return self._augment(pix).contiguous(), i


def augmentation(settings: TrainSettings, size: int):
    """Stage 2's augmentation of a uint8 CHW square (torchvision v2): random resized crop to `size` (at least
    `min_scale` of the area), horizontal flip, rotation, colour jitter. It draws from torch's global RNG."""
    from torchvision.transforms import v2

    s = settings
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(s.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(s.rotation),
        v2.ColorJitter(s.jitter, s.jitter, s.jitter, s.jitter / 5),
    ])


#: serialises `SeededAugment` within a process: it reseeds the global RNG (restored after), which two staging
#: threads (a train and a target stream on CUDA without workers) must not do at the same time
_AUGMENT_LOCK = threading.Lock()


class SeededAugment:
    """`augmentation` as a `classify.data.Augment` for crops decoded on the fly: (square HWC, seed) to a uint8 CHW
    crop whose randomness comes from `seed` alone (torch's global RNG is seeded for it, then restored), so that the
    crops do not depend on which worker process made them."""

    def __init__(self, settings: TrainSettings, size: int):
        self.settings = settings
        self.size = size
        self._transform = None

    def __call__(self, square: np.ndarray, seed: int) -> np.ndarray:
        if self._transform is None:
            self._transform = augmentation(self.settings, self.size)
        pix = torch.from_numpy(np.array(square)).permute(2, 0, 1)
        with _AUGMENT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._transform(pix).contiguous().numpy()


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------------- stages


def train_probe(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, val_features: torch.Tensor,
                val_labels: np.ndarray, head: nn.Module, settings: TrainSettings,
                in_place: bool = False) -> tuple[dict, list[dict]]:
    """Fit `head` (a FeatureHead, statistics set) on fixed features: multinomial logistic regression by full-batch
    L-BFGS (deterministic), for each L2 strength; keep the one with the best val macro-F1. Returns the best state and
    one record per strength. `in_place` standardises `features` (float32) in place, consuming the caller's matrix,
    so that the probe holds one copy of it rather than two (the same numbers either way)."""
    n_classes = head.fc.out_features
    initial = copy.deepcopy(head.state_dict())
    best_state, best_key, records = None, None, []
    loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=settings.label_smoothing)
    with torch.no_grad():
        x = features.sub_(head.mean).div_(head.std) if in_place else None
    for l2 in settings.probe_l2:
        head.load_state_dict(initial)
        nn.init.zeros_(head.fc.weight)
        nn.init.zeros_(head.fc.bias)
        opt = torch.optim.LBFGS(head.fc.parameters(), lr=1.0, max_iter=settings.probe_steps,
                                history_size=20, line_search_fn="strong_wolfe")
        if not in_place:
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


def _batch_outputs(classifier: Classifier, pixels: torch.Tensor, runtime: Runtime,
                   tta: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (averaged with the horizontal flip's when `tta`) and features of one uint8 batch."""
    device = torch.device(runtime.device)
    pixels = pixels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=runtime.torch_dtype, enabled=runtime.autocast):
        f = classifier.features(pixels)
        p = torch.softmax(classifier.head(f).float(), dim=1)
        if tta:
            p = (p + torch.softmax(classifier(pixels.flip(3)).float(), dim=1)) / 2
    return p, f


@torch.inference_mode()
def predict_pixels(classifier: Classifier, loader, runtime: Runtime, tta: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (and features) for every item of a centre-crop loader, in order."""
    probs, feats = [], []
    for pixels, _ in loader:
        p, f = _batch_outputs(classifier, pixels, runtime, tta)
        probs.append(p.cpu())
        feats.append(f.float().cpu())
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


@torch.inference_mode()
def predict_rows(classifier: Classifier, batches, rows: int, runtime: Runtime,
                 tta: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities of rows 0..rows-1 from (pixels, positions) centre-crop batches (a pixel-cache loader or
    `StreamedBatches`), and which rows came (a file that failed to decode on the fly did not; its row is zeros)."""
    probs: np.ndarray | None = None
    present = np.zeros(rows, dtype=bool)
    for pixels, positions in batches:
        p = _batch_outputs(classifier, pixels, runtime, tta)[0].cpu().numpy()
        if probs is None:
            probs = np.zeros((rows, p.shape[1]), dtype=p.dtype)
        at = positions.numpy()
        probs[at] = p
        present[at] = True
    if probs is None:
        probs = np.zeros((rows, classifier.head.fc.out_features), dtype=np.float32)
    return probs, present


def val_scores(probs: np.ndarray, present: np.ndarray, y: np.ndarray, n_classes: int) -> dict:
    """Loss, accuracy and macro-F1 of the present rows' probabilities against the labels `y`."""
    probs, y = probs[present], y[present]
    pred = probs.argmax(1)
    return {"val_loss": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-9, 1)).mean()),
            "val_accuracy": float((pred == y).mean()), "val_macro_f1": macro_f1(y, pred, n_classes)}


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


PIXEL_CACHE = "pixel cache"
STREAMED = "decoded on the fly"


def read_features(emb: EmbeddingCache, shas: list[str], chunk: int = 4096) -> np.ndarray:
    """float32 features of `shas` from the embedding store, in order, copied `chunk` rows at a time from the float16
    memory map into one array: the result (len(shas) x dim x 4 bytes) is the only full-size copy made. KeyError
    naming the first sha not stored."""
    rows = emb.rows(shas)
    vectors = emb.vectors()
    out = np.empty((len(rows), emb.dim), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        out[start:start + chunk] = vectors[rows[start:start + chunk]]
    return out


def embed_missing(frame: pl.DataFrame, emb: EmbeddingCache, classifier: Classifier, runtime: Runtime,
                  workers: int | None, emit: Event) -> tuple[dict[str, str], int]:
    """Make sure every row of `frame` whose file exists has its embedding in the store: the rows it lacks are
    decoded through the data plane (centre crop, `StreamedBatches`), run through the backbone and appended batch by
    batch (an interrupted run keeps what it computed). Files are checked to exist; the others were vetted by
    `curator clean` and are not read. Returns ({sha256: reason} of rows that cannot be used, rows computed)."""
    items = file_items(frame)
    failures = {sha: "file is missing" for path, sha in items if not os.path.isfile(path)}
    todo = list({sha: (path, sha) for path, sha in items if sha not in failures and sha not in emb}.values())
    if todo:
        emit("stage", {"name": "embeddings", "total": len(todo)})
        batches = StreamedBatches(todo, classifier.backbone.preprocess, default_batch_size(runtime.device),
                                  device=runtime.device, workers=choose_workers(workers, runtime.device, len(todo)))
        device = torch.device(runtime.device)
        for pixels, positions in batches:
            with torch.inference_mode(), torch.autocast(device.type, dtype=runtime.torch_dtype,
                                                        enabled=runtime.autocast):
                feats = classifier.features(pixels.to(device, non_blocking=True)).float().cpu().numpy()
            emb.append([todo[i][1] for i in positions.tolist()], feats)
            emit("advance", {"n": len(positions)})
        emb.flush()
        failures.update(batches.failures)
    if unusable := emb.missing([sha for sha in frame["sha256"].to_list() if sha not in failures]):
        raise UsageError(f"the backbone gave non-finite features (NaN or inf) for {len(unusable)} images (e.g. sha256 "
                         f"{unusable[0][:12]}); check --weights and --dtype")
    return failures, len(todo)


def stage2_pixels(settings: TrainSettings, preprocess: Preprocess, shas: set[str],
                  cache_dir: Path) -> tuple[str | None, str]:
    """Where stage 2 reads the pixels of the images `shas` (train, val, target): None for a probe-only run;
    `PIXEL_CACHE` while their squares fit `settings.pixel_cache_max_gb` and the disk's free space; else `STREAMED`.
    Also a sentence for the log saying why."""
    if settings.epochs == 0:
        return None, "probe only: no pixels read, no pixel cache"
    need = len(shas) * pixel_record_bytes(preprocess)
    size = f"a pixel cache of {len(shas)} images takes {need / 1e9:.2f} GB"
    if need > settings.pixel_cache_max_gb * 1e9:
        return STREAMED, f"stage 2 decodes on the fly every epoch: {size}, over --pixel-cache-max-gb " \
                         f"{settings.pixel_cache_max_gb:g}"
    path = pixel_cache_path(cache_dir, preprocess)
    held = path.stat().st_size if path.is_file() else 0
    free = shutil.disk_usage(next(p for p in (cache_dir, *cache_dir.parents) if p.exists())).free
    if need - held > free:
        return STREAMED, f"stage 2 decodes on the fly every epoch: {size}, more than the {free / 1e9:.2f} GB free " \
                         f"on its disk"
    return PIXEL_CACHE, f"stage 2 reads the pixel cache: {size} (--pixel-cache-max-gb {settings.pixel_cache_max_gb:g})"


class CachedPixels:
    """Stage 2's batches from the pixel cache: (uint8 pixels, row positions) loaders over `Crops`."""

    kind = PIXEL_CACHE

    def __init__(self, cache: PixelCache, workers: int, device: torch.device):
        self.cache = cache
        self.workers = workers
        self.device = device
        self.failures: dict[str, str] = {}  # every file was checked when the cache was filled

    def training(self, frame: pl.DataFrame, sampler, settings: TrainSettings, generator: torch.Generator):
        """Augmented batches of `frame`'s rows in the sampler's order, each epoch."""
        ds = Crops(self.cache, self.cache.rows(frame["sha256"].to_list()), settings)
        return torch.utils.data.DataLoader(
            ds, batch_size=settings.batch_size, sampler=sampler, drop_last=len(ds) > settings.batch_size,
            num_workers=self.workers, worker_init_fn=_seed_worker, generator=generator,
            persistent_workers=self.workers > 0, pin_memory=self.device.type == "cuda",
        )

    def shuffled(self, frame: pl.DataFrame, settings: TrainSettings, generator: torch.Generator):
        """Augmented batches of `frame`'s rows (DANN's target images), reshuffled each pass."""
        ds = Crops(self.cache, self.cache.rows(frame["sha256"].to_list()), settings)
        return torch.utils.data.DataLoader(
            ds, batch_size=settings.batch_size, shuffle=True, drop_last=len(ds) > settings.batch_size,
            num_workers=min(self.workers, 1), worker_init_fn=_seed_worker, generator=generator,
            persistent_workers=self.workers > 0)

    def centre(self, frame: pl.DataFrame):
        """Centre-crop batches of `frame`'s rows, in order."""
        return torch.utils.data.DataLoader(Crops(self.cache, self.cache.rows(frame["sha256"].to_list()), None),
                                           batch_size=64, num_workers=0)


class StreamedPixels:
    """Stage 2's batches decoded on the fly through the data plane (`StreamedBatches`): nothing cached, every pass
    decodes again. Files that fail on the way are collected in `failures`."""

    kind = STREAMED

    def __init__(self, preprocess: Preprocess, workers: int | None, device: torch.device):
        self.preprocess = preprocess
        self.workers = workers
        self.device = device
        self._streams: list[StreamedBatches] = []

    @property
    def failures(self) -> dict[str, str]:
        return {sha: reason for stream in self._streams for sha, reason in stream.failures.items()}

    def _stream(self, frame: pl.DataFrame, batch_size: int, max_workers: int | None = None, **kw) -> StreamedBatches:
        workers = choose_workers(self.workers, self.device.type, frame.height)
        stream = StreamedBatches(file_items(frame), self.preprocess, batch_size, device=self.device,
                                 workers=workers if max_workers is None else min(workers, max_workers), **kw)
        self._streams.append(stream)
        return stream

    def training(self, frame: pl.DataFrame, sampler, settings: TrainSettings, generator: torch.Generator):
        """Augmented batches in the sampler's order (drawn from `generator` each epoch), each crop seeded from it."""
        return self._stream(frame, settings.batch_size, augment=SeededAugment(settings, self.preprocess.crop),
                            order=lambda: list(sampler), generator=generator,
                            drop_last=frame.height > settings.batch_size, min_rows=2)

    def shuffled(self, frame: pl.DataFrame, settings: TrainSettings, generator: torch.Generator):
        """Augmented batches of `frame`'s rows (DANN's target images), in a fresh permutation each pass."""
        n = frame.height
        return self._stream(frame, settings.batch_size, max_workers=1,
                            augment=SeededAugment(settings, self.preprocess.crop),
                            order=lambda: torch.randperm(n, generator=generator).tolist(), generator=generator,
                            drop_last=n > settings.batch_size, min_rows=2)

    def centre(self, frame: pl.DataFrame):
        """Centre-crop batches of `frame`'s rows, in order."""
        return self._stream(frame, 64)


def _drop_failed(table: SplitTable, failed: dict[str, str], classes: list[str],
                 settings: TrainSettings) -> tuple[SplitTable, dict[str, str], str | None]:
    """The table without the rows whose files failed, {rel_path: reason} of those rows, and a warning; UsageError
    when a split or (multi-class) a class has no readable train images left."""
    if not failed:
        return table, {}, None
    bad = table.frame.filter(pl.col("sha256").is_in(list(failed)))
    skipped = {p: failed[s] for p, s in zip(bad["rel_path"].to_list(), bad["sha256"].to_list())}
    warning = (f"{len(skipped)} images skipped (missing, changed or unreadable), e.g. "
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
    return table, skipped, warning


def _head_probs(head: nn.Module, features: torch.Tensor) -> np.ndarray:
    """Softmax probabilities of a (CPU) head on fixed features, in eval mode."""
    head.eval()
    with torch.no_grad():
        return torch.softmax(head(features).float(), dim=1).numpy()


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

    target_frame, target_info, target_warnings = None, None, []
    if settings.target_dir:
        if settings.epochs == 0:
            raise UsageError("--target-dir adapts the fine-tuned layers: it needs --epochs > 0")
        target_frame, unreadable = target_items(Path(settings.target_dir), classes if settings.positive is None else [])
        if unreadable:
            target_warnings.append(f"{len(unreadable)} target files unreadable, e.g. {next(iter(unreadable))}")
    preprocess = backbone.preprocess
    used = table.frame.filter(pl.col("split").is_in(["train", "val"]))
    shas = set(used["sha256"].to_list()) | set(target_frame["sha256"].to_list() if target_frame is not None else [])
    stage2, why = stage2_pixels(settings, preprocess, shas, table.workspace / "cache" / "pixels")
    emit("note", {"text": why})

    # embeddings of every train and val image: the store's, the missing ones computed through the data plane
    t = time.perf_counter()
    classifier.to(device)
    emb = cache_for(table.workspace, backbone)
    failed, computed = embed_missing(used, emb, classifier, runtime, settings.workers, emit)
    timings["embeddings"] = time.perf_counter() - t

    # pixels, decoded once into the workspace's pixel cache, only when stage 2 reads them from there
    pixels, source = None, None
    if stage2 == PIXEL_CACHE:
        t = time.perf_counter()
        pixels = PixelCache(table.workspace / "cache" / "pixels", preprocess)
        items = file_items(used.filter(~pl.col("sha256").is_in(list(failed))))
        emit("stage", {"name": "decode", "total": len(items)})
        failed.update(fill_pixel_cache(pixels, items, workers, progress=lambda n: emit("advance", {"n": n})))
        warnings.extend(pixels.warnings)
        source = CachedPixels(pixels, workers, device)
    elif stage2 == STREAMED:
        source = StreamedPixels(preprocess, settings.workers, device)
    table, skipped, skip_warning = _drop_failed(table, failed, classes, settings)
    warnings.extend([skip_warning] if skip_warning else [])
    warnings.extend(target_warnings)
    if target_frame is not None:
        if pixels is not None:
            emit("stage", {"name": "decode target", "total": target_frame.height})
            t_failed = fill_pixel_cache(pixels, file_items(target_frame),
                                        workers, progress=lambda n: emit("advance", {"n": n}))
            if t_failed:
                warnings.append(f"{len(t_failed)} target images skipped (unreadable)")
                target_frame = target_frame.filter(~pl.col("sha256").is_in(list(t_failed)))
        target_info = {"dir": settings.target_dir, "images": target_frame.height,
                       "labeled": int(target_frame["label"].is_not_null().sum())}
    if pixels is not None:
        timings["decode to pixel cache"] = time.perf_counter() - t

    train_rows, val_rows = table.rows("train"), table.rows("val")
    y_train, y_val = _encode(train_rows, classes, settings), _encode(val_rows, classes, settings)
    if settings.positive is None:
        sample_w = train_rows["weight"].to_numpy().astype(np.float32)
        if settings.balance != "none" and np.allclose(sample_w, sample_w[0]):
            sample_w = class_weights(y_train, len(classes))
    else:
        sample_w = class_weights(y_train, 2) if settings.balance != "none" else np.ones(len(y_train), np.float32)

    # stage 1: probe on the stored embeddings, (train + val) x dim float32 in memory
    t = time.perf_counter()
    x_train = torch.from_numpy(read_features(emb, train_rows["sha256"].to_list()))
    x_val = torch.from_numpy(read_features(emb, val_rows["sha256"].to_list()))
    emit("note", {"text": f"probe: {len(x_train)} train and {len(x_val)} val embeddings from the store "
                          f"({computed} computed now), {x_train.shape[1]} wide: "
                          f"{(x_train.nbytes + x_val.nbytes) / 1e6:.1f} MB of float32 in memory"})
    timings["embeddings"] += time.perf_counter() - t
    warnings.extend(emb.warnings)
    t = time.perf_counter()
    head = classifier.head.cpu()
    head.set_statistics(x_train)
    best_head, probe_records = train_probe(x_train, torch.from_numpy(y_train), torch.from_numpy(sample_w), x_val,
                                           y_val, head, settings, in_place=True)
    del x_train  # standardised in place by the probe: nothing else reads it
    head.load_state_dict(best_head)
    probe_probs = _head_probs(head, x_val)
    classifier.to(device)
    timings["stage 1 probe"] = time.perf_counter() - t
    best = max(probe_records, key=lambda r: r["val_macro_f1"])
    history = [{"epoch": 0, "stage": "probe", "train_loss": round(best["train_loss"], 5), "val_loss": None,
                "val_accuracy": round(best["val_accuracy"], 5), "val_macro_f1": round(best["val_macro_f1"], 5),
                "train_accuracy": None, "lr": None, "seconds": round(timings["stage 1 probe"], 2),
                "data": "embeddings"}]
    emit("epoch", history[-1])

    val_batches = source.centre(val_rows) if source is not None else None
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
        "data": {"probe": "embedding store", "embeddings computed": computed, "stage 2": stage2,
                 "val": source.kind if source is not None else "embeddings (centre crop, no flip TTA)",
                 "pixel cache bytes": len(shas) * pixel_record_bytes(preprocess) if stage2 == PIXEL_CACHE else 0,
                 "why": why},
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
            target = _TargetStream(source.shuffled(target_frame, settings, generator), backbone.feature_dim, device)
            groups.append({"params": list(target.domain.parameters()), "lr": settings.lr * settings.head_lr_scale,
                           "weight_decay": settings.weight_decay})
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
        if settings.balance == "sampler":
            sampler = torch.utils.data.WeightedRandomSampler(torch.from_numpy(sample_w).double(), len(train_rows),
                                                             generator=generator)
            loss_w = np.ones_like(sample_w)
        else:
            sampler = torch.utils.data.RandomSampler(range(len(train_rows)), generator=generator)
            loss_w = sample_w
        loss_w_t = torch.from_numpy(loss_w).to(device)
        y_train_t = torch.from_numpy(y_train).to(device)
        loader = source.training(train_rows, sampler, settings, generator)
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
            scores = val_scores(*predict_rows(classifier, val_batches, len(y_val), runtime, settings.tta), y_val,
                                len(classes))
            f1 = scores["val_macro_f1"]
            row = {"epoch": epoch, "stage": "fine-tune", "train_loss": round(total_loss / max(seen, 1), 5),
                   **{k: round(v, 5) for k, v in scores.items()},
                   "train_accuracy": round(correct / max(seen, 1), 5),
                   "lr": round(base_lrs[0] * lr_factor(step - 1), 7),
                   "seconds": round(time.perf_counter() - t_epoch, 2), "data": source.kind}
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
        target_info["with_adaptation"] = _domain_scores(classifier, labeled, classes, source, runtime, settings)
        # the same training without the domain loss, same seed, for the comparison the option exists to make
        emit("note", {"text": "training the same model without adaptation, for comparison on the target"})
        baseline = train(splits, run_dir / "no-adaptation", replace(settings, target_dir=None), events, table)
        base_model = checkpoint.load(baseline.run_dir).classifier.to(device)
        target_info["without_adaptation"] = _domain_scores(base_model, labeled, classes, source, runtime, settings)
        target_info["without_adaptation_run"] = str(baseline.run_dir)
    if target_info is not None:
        # files decoded on the fly may fail only now (the pixel-cache path dropped them when filling)
        target_info["images"] -= len(set(source.failures) & set(target_frame["sha256"].to_list()))
        target_info["final_domain_accuracy"] = (round(float(np.mean(target.domain_accuracy[-20:])), 4)
                                                if target is not None and target.domain_accuracy else None)
        meta["target"] = target_info

    # final val metrics of the kept model (from the embeddings when only the probe ran), and the threshold for
    # one-vs-rest
    classifier.eval()
    t = time.perf_counter()
    if source is None:
        probs, present = probe_probs, np.ones(len(y_val), dtype=bool)
    else:
        probs, present = predict_rows(classifier, val_batches, len(y_val), runtime, settings.tta)
    _skip_late_failures(source, table, skipped, warnings)
    probs, y_kept = probs[present], y_val[present]
    pred = probs.argmax(1)
    val = {"accuracy": float((pred == y_kept).mean()), "macro_f1": macro_f1(y_kept, pred, len(classes)),
           "images": len(y_kept)}
    threshold = None
    if settings.positive is not None:
        threshold, at = choose_threshold(probs[:, 1], y_kept, settings.min_precision)
        val.update({"threshold": threshold, **{f"positive_{k}": v for k, v in at.items()}})
    timings["final val"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    meta.update(history=history, best_epoch=best_epoch, val=val, threshold=threshold,
                timings={k: round(v, 2) for k, v in timings.items()}, complete=True, warnings=warnings)
    _write_state(run_dir, classifier, meta)
    checkpoint._atomic_bytes(run_dir / "history.csv", _history_csv(history).encode())
    return TrainResult(run_dir, classes, history, val, timings, skipped, runtime, best_epoch, threshold,
                       target_info, warnings)


def _skip_late_failures(source, table: SplitTable, skipped: dict[str, str], warnings: list[str]) -> None:
    """Report the files that failed while stage 2 decoded on the fly (changed or damaged after the run checked that
    they exist; they were left out of their batches): training rows go into `skipped`, and each kind gets a warning."""
    late = dict(source.failures) if source is not None else {}
    if not late:
        return
    bad = table.frame.filter(pl.col("sha256").is_in(list(late)))
    new = {p: late[s] for p, s in zip(bad["rel_path"].to_list(), bad["sha256"].to_list()) if p not in skipped}
    skipped.update(new)
    if new:
        warnings.append(f"{len(new)} images failed to decode during stage 2 and were left out of their batches, e.g. "
                        f"{next(iter(new))}: {next(iter(new.values()))}")
    if other := len(set(late) - set(bad["sha256"].to_list())):
        warnings.append(f"{other} target images skipped (unreadable)")


def _domain_scores(classifier: Classifier, frame: pl.DataFrame, classes: list[str], source,
                   runtime: Runtime, settings: TrainSettings) -> dict:
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in frame["label"].to_list()])
    classifier.eval()
    probs, present = predict_rows(classifier, source.centre(frame), len(y), runtime, settings.tta)
    pred, y = probs[present].argmax(1), y[present]
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

    def __init__(self, loader, feature_dim: int, device: torch.device):
        self.loader = loader  # augmented (pixels, positions) batches, reshuffled each pass
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
