"""`classify train`: a linear probe on cached embeddings, then (with `epochs > 0`) fine-tuning of the backbone's last
blocks. `train` strings together parts that each live in a module of their own:

- the data (`classify.trainset`): the classes, the rows left after skipping unreadable files, their labels and
  class-balancing weights, and where stage 2 reads pixels: the workspace's pixel cache (each image decoded once)
  while the images fit `pixel_cache_max_gb` and the free disk, else decoded on the fly every epoch through the data
  plane. Which way ran is in the log, in each history row (`data`) and in model.json (`data`);
- stage 1 (`classify.probe`): a multinomial logistic regression on the workspace's embedding store (missing rows
  computed once and appended), its L2 strength chosen on val. It reads no pixels: a probe-only run (the default)
  writes no pixel cache, and its val metrics come from the embeddings (centre crop, no flip TTA);
- stage 2 (`classify.finetune`): the last `unfreeze` blocks with the head, on timm's freezing, AdamW factory and
  warm-up + cosine schedule, augmented crops (`classify.augment`, timm's training transform), label smoothing,
  class-balanced loss, a GradScaler under fp16, early stopping on val macro-F1 (the best epoch is kept);
- DANN (`classify.dann`): with `target_dir`, domain-adversarial training towards another domain's images; with
  labeled target folders, the same model is also trained without it (`RUN/no-adaptation`) to compare;
- `positive`: one class against all others, with a decision threshold chosen on val (`classify.scores`).

A call changes nothing in the process: no allocator setting (the CLI sets that,
`curator.core.runtime.configure_allocator`) and no generator state. Randomness comes from generators seeded with `seed`,
and third-party draws (weight init, dropout) happen inside `classify.rng.private_rng`, which restores the process's
generators afterwards. Both stages are deterministic on CPU for a given seed and thread count.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

from classify import checkpoint
from classify.classifier import Classifier
from classify.dann import Target, cache_target, domain_scores, read_target

# old names that bench/accuracy.py and bench/accuracy_search.py still import from here (with macro_f1 above)
from classify.data import (
    Crops,  # noqa: I001
    PixelCache,
    SplitTable,
    file_items,
    fill_pixel_cache,
    pixel_record_bytes,
    read_split_table,
)
from classify.finetune import FineTuneResult, fine_tune
from classify.inference import predict_loader as predict_pixels
from classify.inference import predict_rows
from classify.probe import ProbeResult, embed_missing, fit_probe, train_probe
from classify.rng import private_rng
from classify.scores import choose_threshold, macro_f1
from classify.train_settings import TrainSettings
from classify.trainset import (
    PIXEL_CACHE,
    STREAMED,
    CachedPixels,
    StreamedPixels,
    TrainingData,
    class_weights,
    run_classes,
    stage2_pixels,
    training_data,
)
from curator.core.atomic import atomic_path
from curator.core.ownership import claim
from curator.core.progress import Event
from curator.core.runtime import Runtime, select_runtime
from curator.embedding.backbones import load_backbone
from curator.embedding.embed import cache_for, default_workers
from curator.embedding.preprocess import Preprocess

__all__ = ["TrainResult", "TrainSettings", "train", "training_runtime",
           "Crops", "class_weights", "macro_f1", "predict_pixels", "train_probe"]



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


def training_runtime(settings: TrainSettings) -> Runtime:
    """The device and autocast stage 2 trains under: `select_runtime`'s, except bf16 on a CUDA device that has it
    when the dtype is left to auto (bf16 needs no loss scaling; fp16 trains with a GradScaler)."""
    runtime = select_runtime(settings.device, settings.dtype)
    if runtime.device == "cuda" and settings.dtype == "auto" and torch.cuda.is_bf16_supported():
        return Runtime("cuda", "bfloat16", "CUDA training: bf16 autocast")
    return runtime


def train(splits: Path, run_dir: Path, settings: TrainSettings | None = None, events: Event | None = None,
          table: SplitTable | None = None) -> TrainResult:
    """Train a classifier on the train split of `splits` (or the already read `table`), select on val, and write
    `run_dir` (checkpoint, history.csv). See the module docstring for the parts."""
    settings = settings or TrainSettings()
    t_start = time.perf_counter()
    table = table or read_split_table(splits)
    run_dir = claim(Path(run_dir), "run", "--out", adopt=_is_run_folder(Path(run_dir)))
    classes = run_classes(table, settings)
    runtime = training_runtime(settings)
    with private_rng(settings.seed, runtime.device):
        return _Run(table, run_dir, classes, runtime, settings, events or (lambda kind, info: None)).run(t_start)


@dataclass
class _Run:
    """One call of `train`: what its parts read, and the timings and warnings they collect."""

    table: SplitTable
    run_dir: Path
    classes: list[str]
    runtime: Runtime
    settings: TrainSettings
    emit: Event
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return torch.device(self.runtime.device)

    def run(self, t_start: float) -> TrainResult:
        """The run, in order: data, stage 1, stage 2, DANN's comparison, final val, files."""
        settings, timings = self.settings, self.timings
        target = read_target(settings, self.classes)
        classifier = self.load_classifier()
        emb, data, source, target, info = self.prepare_data(classifier, target)
        probe = fit_probe(classifier, emb, data, settings, info["embeddings computed"], self.emit)
        classifier.to(self.device)
        self.warnings.extend(emb.warnings)
        timings["embeddings"] += probe.read_seconds
        timings["stage 1 probe"] = probe.fit_seconds
        history = [probe.history_row()]
        self.emit("epoch", history[-1])
        meta = self.meta(classifier, data, probe, info)
        tuned = None
        if settings.epochs > 0:
            def on_best(rows: list[dict], epoch: int) -> None:
                self.save(classifier, {**meta, "history": history + rows, "best_epoch": epoch, "complete": False})

            tuned = fine_tune(classifier, data, source, settings, self.runtime, self.emit,
                              probe.best["val_macro_f1"], on_best, target)
            history += tuned.history
            timings["stage 2 fine-tune"] = tuned.seconds
        if target is not None:
            meta["target"] = self.target_report(target, classifier, data, source, tuned)
        t = time.perf_counter()
        val, threshold = self.final_val(classifier, probe, data, source)
        timings["final val"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        best_epoch = tuned.best_epoch if tuned is not None else 0
        meta.update(history=history, best_epoch=best_epoch, val=val, threshold=threshold,
                    timings={k: round(v, 2) for k, v in timings.items()}, complete=True, warnings=self.warnings)
        self.save(classifier, meta)
        with atomic_path(self.run_dir / "history.csv", fsync=True) as tmp:
            tmp.write_text(_history_csv(history))
        return TrainResult(self.run_dir, self.classes, history, val, timings, data.skipped, self.runtime, best_epoch,
                           threshold, meta.get("target"), self.warnings)

    def load_classifier(self) -> Classifier:
        """The backbone (with its offline weights) and a fresh head for the run's classes, on the run's device."""
        t = time.perf_counter()
        settings = self.settings
        backbone = load_backbone(settings.model, Path(settings.weights) if settings.weights else None,
                                 gram=settings.gram)
        classifier = Classifier(backbone, len(self.classes), settings.dropout).to(self.device)
        self.timings["load backbone"] = time.perf_counter() - t
        return classifier

    def prepare_data(self, classifier: Classifier, target: Target | None):
        """Everything stage 1 and 2 read: the embeddings of the train and val images (the store's, the missing ones
        computed), stage 2's pixel source (`pixel_source`), the `TrainingData` left after skipping what could not be
        read, and the target images. Returns (embedding store, data, pixel source or None, target, model.json's
        `data`)."""
        preprocess, settings = classifier.backbone.preprocess, self.settings
        used = self.table.frame.filter(pl.col("split").is_in(["train", "val"]))
        shas = set(used["sha256"].to_list()) | set(target.frame["sha256"].to_list() if target is not None else [])
        stage2, why = stage2_pixels(settings, preprocess, shas, self.table.workspace / "cache" / "pixels")
        self.emit("note", {"text": why})
        t = time.perf_counter()
        emb = cache_for(self.table.workspace, classifier.backbone)
        failed, computed = embed_missing(used, emb, classifier, self.runtime, settings.workers, self.emit)
        self.timings["embeddings"] = time.perf_counter() - t

        t = time.perf_counter()
        source = self.pixel_source(stage2, used, failed, preprocess)
        data, skip_warning = training_data(self.table, self.classes, failed, settings)
        self.warnings.extend([skip_warning] if skip_warning else [])
        if target is not None:
            self.warnings.extend(target.warnings)
            if isinstance(source, CachedPixels):
                target, lost = cache_target(target, source.cache, source.workers, self.emit)
                self.warnings.extend([lost] if lost else [])
        if stage2 == PIXEL_CACHE:
            self.timings["decode to pixel cache"] = time.perf_counter() - t
        info = {"probe": "embedding store", "embeddings computed": computed, "stage 2": stage2,
                "val": source.kind if source is not None else "embeddings (centre crop, no flip TTA)",
                "pixel cache bytes": len(shas) * pixel_record_bytes(preprocess) if stage2 == PIXEL_CACHE else 0,
                "why": why}
        return emb, data, source, target, info

    def pixel_source(self, stage2: str | None, used: pl.DataFrame, failed: dict[str, str], preprocess: Preprocess):
        """Stage 2's pixel source: None for a probe-only run; `StreamedPixels`; or `CachedPixels` once the readable
        train and val images are in the workspace's pixel cache (files that fail to decode are added to `failed`,
        the cache's own warnings to the run's)."""
        if stage2 == STREAMED:
            return StreamedPixels(preprocess, self.settings.workers, self.device)
        if stage2 != PIXEL_CACHE:
            return None
        workers = default_workers() if self.settings.workers is None else self.settings.workers
        pixels = PixelCache(self.table.workspace / "cache" / "pixels", preprocess)
        items = file_items(used.filter(~pl.col("sha256").is_in(list(failed))))
        self.emit("stage", {"name": "decode", "total": len(items)})
        failed.update(fill_pixel_cache(pixels, items, workers, events=self.emit))
        self.warnings.extend(pixels.warnings)
        return CachedPixels(pixels, workers, self.device)

    def meta(self, classifier: Classifier, data: TrainingData, probe: ProbeResult, info: dict) -> dict:
        """model.json's description of the run so far (history, val and timings are added as they come)."""
        backbone, table, settings = classifier.backbone, data.table, self.settings
        layout = backbone.feature_layout
        return {
            "backbone": {"name": backbone.name, "key": backbone.key, "weights_origin": backbone.weights_origin,
                         "feature_layout": layout},
            "feature": ("pooled + style statistics" + (" + Gram matrices" if "gram" in layout else "")
                        + " (curator.embedding.embed.forward_features), standardised"),
            "classes": data.classes,
            "preprocessing": checkpoint.preprocessing_meta(backbone.preprocess,
                                                           "horizontal flip" if settings.tta else None),
            "settings": {**asdict(settings), "probe_l2": list(settings.probe_l2)},
            "splits": {"path": str(table.splits_path), "sha256": table.splits_sha256,
                       "counts": {s: len(table.rows(s)) for s in ("train", "val", "test")}},
            "runtime": {"device": self.runtime.device, "dtype": self.runtime.dtype, "reason": self.runtime.reason},
            "probe": probe.records,
            "skipped": data.skipped,
            "data": info,
        }

    def target_report(self, target: Target, classifier: Classifier, data: TrainingData, source,
                      tuned: FineTuneResult | None) -> dict:
        """model.json's `target`: the images, the domain classifier's final accuracy and, when some target images
        are labeled, accuracy there with adaptation and without it (the same training without the domain loss, same
        seed, in `run_dir/no-adaptation`: the comparison the option exists to make)."""
        report, tta = target.info(), self.settings.tta
        labeled = target.frame.filter(pl.col("label").is_not_null())
        if report["labeled"]:
            report["with_adaptation"] = domain_scores(classifier, labeled, data.classes, source.centre(labeled),
                                                      self.runtime, tta)
            self.emit("note", {"text": "training the same model without adaptation, for comparison on the target"})
            baseline = train(data.table.splits_path, self.run_dir / "no-adaptation",
                             replace(self.settings, target_dir=None), self.emit, data.table)
            base_model = checkpoint.load(baseline.run_dir).classifier.to(self.device)
            report["without_adaptation"] = domain_scores(base_model, labeled, data.classes, source.centre(labeled),
                                                         self.runtime, tta)
            report["without_adaptation_run"] = str(baseline.run_dir)
        # files decoded on the fly may fail only now (the pixel-cache path dropped them when filling)
        report["images"] -= len(set(source.failures) & set(target.frame["sha256"].to_list()))
        objective = tuned.objective if tuned is not None else None
        report["final_domain_accuracy"] = objective.final_accuracy() if objective is not None else None
        return report

    def final_val(self, classifier: Classifier, probe: ProbeResult, data: TrainingData,
                  source) -> tuple[dict, float | None]:
        """The kept model's val metrics (from the embeddings when only the probe ran, else on centre crops with the
        run's TTA) and, for one-vs-rest, the decision threshold chosen on them."""
        classifier.eval()
        if source is None:
            probs, present = probe.val_probs, np.ones(len(data.y_val), dtype=bool)
        else:
            probs, present = predict_rows(classifier, source.centre(data.val), len(data.y_val), self.runtime,
                                          self.settings.tta)
        _skip_late_failures(source, data, self.warnings)
        probs, y = probs[present], data.y_val[present]
        pred = probs.argmax(1)
        val = {"accuracy": float((pred == y).mean()), "macro_f1": macro_f1(y, pred, len(data.classes)),
               "images": len(y)}
        threshold = None
        if self.settings.positive is not None:
            threshold, at = choose_threshold(probs[:, 1], y, self.settings.min_precision)
            val.update({"threshold": threshold, **{f"positive_{k}": v for k, v in at.items()}})
        return val, threshold

    def save(self, classifier: Classifier, meta: dict) -> None:
        """The checkpoint (tensors, then model.json) as it stands."""
        checkpoint.save(self.run_dir, classifier.state_dict(), meta)


def _skip_late_failures(source, data: TrainingData, warnings: list[str]) -> None:
    """Report the files that failed while stage 2 decoded on the fly (changed or damaged after the run checked that
    they exist; they were left out of their batches): training rows go into `data.skipped`, and each kind gets a
    warning."""
    late = dict(source.failures) if source is not None else {}
    if not late:
        return
    bad = data.table.frame.filter(pl.col("sha256").is_in(list(late)))
    new = {p: late[s] for p, s in zip(bad["rel_path"].to_list(), bad["sha256"].to_list()) if p not in data.skipped}
    data.skipped.update(new)
    if new:
        warnings.append(f"{len(new)} images failed to decode during stage 2 and were left out of their batches, e.g. "
                        f"{next(iter(new))}: {next(iter(new.values()))}")
    if other := len(set(late) - set(bad["sha256"].to_list())):
        warnings.append(f"{other} target images skipped (unreadable)")


def _history_csv(history: list[dict]) -> str:
    keys = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def _is_run_folder(folder: Path) -> bool:
    """An unmarked folder an earlier `classify train` wrote (its model.json is in atelier's checkpoint format)."""
    try:
        meta = json.loads((folder / checkpoint.META_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == checkpoint.FORMAT
