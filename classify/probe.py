"""Stage 1 of `classify train`: a linear probe on the workspace's stored embeddings.

The head is fitted on the embedding store (the vectors `curator clean` computed) in seconds, with its L2 strength
chosen on the val split. Rows the store lacks (e.g. another backbone than `clean` used) are computed by decoding those
files through the data plane (`curator.embedding.dataplane`, the loader and preprocessing of `classify dir`) and
appended to the store, so a rerun reads them (`embed_missing`). The probe reads no pixels, and its val metrics come from
the embeddings (the un-flipped centre crop: no flip TTA, which needs pixels). Its memory is the train and val features
as float32, read from the float16 store in chunks: (train + val) x feature_dim x 4 bytes (Lite2's features are 2400
wide: 9.6 KB per image, 0.96 GB per 100,000 images; Lite0's 2304); `train_probe` standardises the train matrix in
place rather than copying it.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import nn

from classify.classifier import Classifier, FeatureHead
from classify.data import StreamedBatches, file_items
from classify.scores import macro_f1
from classify.train_settings import TrainSettings
from classify.trainset import TrainingData
from curator.core.errors import UsageError
from curator.core.progress import Event
from curator.core.runtime import Runtime
from curator.embedding.dataplane import choose_workers, default_batch_size
from curator.embedding.embed import EmbeddingCache


def read_features(emb: EmbeddingCache, shas: list[str], chunk: int = 4096) -> np.ndarray:
    """float32 features of `shas` from the embedding store, in order, read `chunk` rows at a time
    (`EmbeddingCache.reader`: positioned reads, not the memory map, whose touched pages would stay resident) into one
    array: the result (len(shas) x dim x 4 bytes) is the only full-size copy made. KeyError naming the first sha not
    stored."""
    read = emb.reader(shas)
    out = np.empty((len(shas), emb.dim), dtype=np.float32)
    for start in range(0, len(shas), chunk):
        out[start:start + chunk] = read(start, min(len(shas), start + chunk))
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


def train_probe(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, val_features: torch.Tensor,
                val_labels: np.ndarray, head: nn.Module, settings: TrainSettings,
                in_place: bool = False) -> tuple[dict, list[dict]]:
    """Fit `head` (a FeatureHead, statistics set) on fixed features: multinomial logistic regression by full-batch
    L-BFGS (deterministic), for each L2 strength; keep the one with the best val macro-F1. Returns the best state and
    one record per strength: its L2, val accuracy and macro-F1, and the fitted head's train loss (weighted, label
    smoothed, without the L2 term) and train accuracy. `in_place` standardises `features` (float32) in place, consuming the caller's matrix,
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

        opt.step(closure)  # returns the loss before the fit (ln of the class count from zero weights): not used
        head.eval()
        with torch.no_grad():
            logits = head.fc(x)
            loss = float((loss_fn(logits, labels) * weights).mean())  # the fitted head's, without the L2 term
            train_acc = float((logits.argmax(1) == labels).float().mean())
            pred = head(val_features).argmax(1).numpy()
        f1 = macro_f1(val_labels, pred, n_classes)
        acc = float((pred == val_labels).mean())
        records.append({"l2": l2, "val_accuracy": acc, "val_macro_f1": f1, "train_loss": loss,
                        "train_accuracy": train_acc})
        if best_key is None or f1 > best_key:
            best_key, best_state = f1, copy.deepcopy(head.state_dict())
    return best_state, records


@dataclass
class ProbeResult:
    """The kept probe (its state is loaded into the classifier's head), every L2 strength's record, and the kept
    head's val probabilities on the stored embeddings."""

    records: list[dict]
    val_probs: np.ndarray
    read_seconds: float  # reading the train and val embeddings from the store
    fit_seconds: float

    @property
    def best(self) -> dict:
        """The kept strength's record (the first with the best val macro-F1, as `train_probe` keeps it)."""
        return max(self.records, key=lambda r: r["val_macro_f1"])

    def history_row(self) -> dict:
        """history.csv's row for stage 1 (epoch 0)."""
        best = self.best
        return {"epoch": 0, "stage": "probe", "train_loss": round(best["train_loss"], 5), "val_loss": None,
                "val_accuracy": round(best["val_accuracy"], 5), "val_macro_f1": round(best["val_macro_f1"], 5),
                "train_accuracy": round(best["train_accuracy"], 5), "lr": None,
                "seconds": round(self.fit_seconds, 2), "data": "embeddings"}


def head_probabilities(head: nn.Module, features: torch.Tensor) -> np.ndarray:
    """Softmax probabilities of a (CPU) head on fixed features, in eval mode."""
    head.eval()
    with torch.no_grad():
        return torch.softmax(head(features).float(), dim=1).numpy()


def fit_probe(classifier: Classifier, emb: EmbeddingCache, data: TrainingData, settings: TrainSettings,
              computed: int, emit: Event) -> ProbeResult:
    """Stage 1: fit the classifier's head (on the CPU; the caller moves it back) on the stored train embeddings,
    its feature statistics from them, and keep the L2 strength with the best val macro-F1 (`train_probe`).
    `computed` is how many of the embeddings `embed_missing` made just now, for the log."""
    t = time.perf_counter()
    x_train = torch.from_numpy(read_features(emb, data.train["sha256"].to_list()))
    x_val = torch.from_numpy(read_features(emb, data.val["sha256"].to_list()))
    emit("note", {"text": f"probe: {len(x_train)} train and {len(x_val)} val embeddings from the store "
                          f"({computed} computed now), {x_train.shape[1]} wide: "
                          f"{(x_train.nbytes + x_val.nbytes) / 1e6:.1f} MB of float32 in memory"})
    read_seconds = time.perf_counter() - t
    t = time.perf_counter()
    head: FeatureHead = classifier.head.cpu()
    head.set_statistics(x_train)
    best_state, records = train_probe(x_train, torch.from_numpy(data.y_train), torch.from_numpy(data.weights), x_val,
                                      data.y_val, head, settings, in_place=True)
    del x_train  # standardised in place by the probe: nothing else reads it
    head.load_state_dict(best_state)
    probs = head_probabilities(head, x_val)
    return ProbeResult(records, probs, read_seconds, time.perf_counter() - t)
