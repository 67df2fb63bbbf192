"""What else moves the artist-disjoint accuracy of a probe on wikiart-dev: input scale, second-order (Gram) style
statistics, the three offline backbones together, artist-balanced loss weights; and how much of the gap to 70% is
the artist shift (the same probe on folds that share artists).

Needs the workspace of bench/accuracy.py (bench/out/wikiart-dev with splits.parquet). Run:
    .venv/bin/python bench/accuracy_search.py
Features of every view are computed once into bench/out/search/*.npz (about 9 minutes on 2 cores for all four
views); each table row then takes 12 s (2,400 features) to 26 minutes (30,640 features, on a busy machine), for
seven probe fits. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from sklearn.model_selection import GroupKFold

from classify.classifier import FeatureHead
from classify.data import read_split_table
from classify.train import TrainSettings, class_weights, macro_f1, train_probe
from curator.core.runtime import configure_allocator
from curator.embedding.backbones import load_backbone
from curator.embedding.embed import open_cache

OUT = Path("bench/out/search")
VIEWS = (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260),
         ("efficientnet_lite2", 384))
GRAM_STAGES = (1, 2, 3)  # stage 4 (320-352 channels) would add 50-60k dimensions


def extract(frame: pl.DataFrame, name: str, side: int) -> dict[str, np.ndarray]:
    """Per image, averaged over it and its mirror image, the whole painting resized to `side` (no centre crop):
    the pooled vector, per-stage channel mean and std, and the centred Gram matrix (upper triangle) of the
    GRAM_STAGES."""
    from PIL import Image

    path = OUT / f"{name}-{side}.npz"
    if path.is_file():
        return dict(np.load(path))
    model = load_backbone(name).model.eval().to(memory_format=torch.channels_last)
    stages = list(range(len(model.feature_info)))
    parts: dict[str, list[np.ndarray]] = {"pooled": [], "mean": [], "std": [], "gram": []}
    t = time.perf_counter()
    paths = frame["path"].to_list()
    with torch.inference_mode():
        for i in range(0, len(paths), 32):
            batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((side, side), Image.Resampling.BICUBIC))
                              for p in paths[i:i + 32]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # lite mean/std 0.5
            acc: dict[str, torch.Tensor] = {}
            for view in (x, torch.flip(x, dims=[3])):
                final, inter = model.forward_intermediates(view.contiguous(memory_format=torch.channels_last),
                                                           indices=stages)
                grams = []
                for s in GRAM_STAGES:
                    f = inter[s].flatten(2)
                    f = f - f.mean(2, keepdim=True)
                    g = f @ f.transpose(1, 2) / f.shape[2]
                    iu = torch.triu_indices(g.shape[1], g.shape[1])
                    grams.append(g[:, iu[0], iu[1]])
                got = {"pooled": model.forward_head(final, pre_logits=True),
                       "mean": torch.cat([f.mean((2, 3)) for f in inter], 1),
                       "std": torch.cat([f.std((2, 3)) for f in inter], 1), "gram": torch.cat(grams, 1)}
                for k, v in got.items():
                    acc[k] = acc.get(k, 0) + v.float() / 2
            for k, chunks in parts.items():
                chunks.append(acc[k].numpy())
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.rename(path)
    print(f"# features {name}@{side}: {time.perf_counter() - t:.0f} s", flush=True)
    return arrays


def block(arrays: dict[str, np.ndarray], part: str) -> np.ndarray:
    x = arrays[part].astype(np.float32)
    return np.sign(x) * np.sqrt(np.abs(x)) if part == "gram" else x  # signed square root, as for bilinear pooling


def probe(x_tr, y_tr, g_tr, x_val, y_val, x_ev, n: int, artist_weights: bool, l2: tuple[float, ...]) -> np.ndarray:
    """The stage-1 probe of `classify train` (standardised linear head, L-BFGS, L2 chosen on val macro-F1), with
    optionally each artist's works down-weighted by 1/sqrt(their count) so prolific artists do not set the
    boundary. Returns predictions on x_ev."""
    head = FeatureHead(x_tr.shape[1], n, 0.0)
    head.set_statistics(torch.from_numpy(x_tr))
    w = class_weights(y_tr, n)
    if artist_weights:
        _, inverse, counts = np.unique(g_tr, return_inverse=True, return_counts=True)
        a = 1.0 / np.sqrt(counts[inverse])
        w = (w * a / a.mean()).astype(np.float32)
    state, _ = train_probe(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(w),
                           torch.from_numpy(x_val), y_val, head, TrainSettings(probe_l2=l2))
    head.load_state_dict(state)
    head.eval()
    with torch.no_grad():
        return head(torch.from_numpy(x_ev)).argmax(1).numpy()


def score(x: np.ndarray, y: np.ndarray, split: np.ndarray, groups: np.ndarray, n: int, *, artist_weights: bool,
          l2: tuple[float, ...], shared_artists: bool = False) -> dict[str, float]:
    """Accuracy and macro-F1 on the fixed test split, and the mean/std accuracy over 5 artist-disjoint folds of all
    rows (L2 chosen on an artist-disjoint ninth of the training folds). `shared_artists` makes the folds by image
    instead: the leaky number the literature usually reports."""
    tr, va, te = (split == s for s in ("train", "val", "test"))
    pred = probe(x[tr], y[tr], groups[tr], x[va], y[va], x[te], n, artist_weights, l2)
    out = {"test": float((pred == y[te]).mean()), "test_f1": macro_f1(y[te], pred, n)}
    fold_groups = np.arange(len(y)).astype(str) if shared_artists else groups
    accs = []
    for a, b in GroupKFold(5).split(x, y, fold_groups):
        inner = np.isin(fold_groups[a], sorted(set(fold_groups[a]))[::9])
        p = probe(x[a][~inner], y[a][~inner], groups[a][~inner], x[a][inner], y[a][inner], x[b], n, artist_weights,
                  l2)
        accs.append(float((p == y[b]).mean()))
    out["folds"], out["folds_std"] = float(np.mean(accs)), float(np.std(accs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workspace", type=Path, default=Path("bench/out/wikiart-dev"))
    args = parser.parse_args()
    configure_allocator()
    frame = read_split_table(args.workspace / "splits.parquet", need=("train", "val", "test")).frame
    classes = sorted(set(frame["label"].to_list()))
    y = np.array([classes.index(c) for c in frame["label"].to_list()])
    split = np.array(frame["split"].to_list())
    groups = np.array(frame["group"].fill_null(frame["sha256"]).to_list())
    views = {f"{name.split('_')[1]}@{side}": extract(frame, name, side) for name, side in VIEWS}
    base = ("pooled", "mean", "std")
    narrow = (1e-3, 3e-3, 1e-2, 3e-2)
    wide = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    # the cached embedding `classify train` uses today (centre crop, no mirror average), as the reference row
    cache = open_cache(args.workspace, next((args.workspace / "cache" / "embeddings").glob("efficientnet_lite2-*.emb")).stem)
    reference = cache.get(frame["sha256"].to_list())
    rows: list[tuple[str, np.ndarray, bool, tuple, bool]] = [
        ("lite2@260 pooled+stats, cached centre crop (today's `classify train`)", reference, False, narrow, False)]
    for key, arrays in views.items():
        rows.append((f"{key} pooled+stats, whole image + mirror", np.hstack([block(arrays, p) for p in base]),
                     False, narrow, False))
        rows.append((f"{key} pooled+stats+gram", np.hstack([block(arrays, p) for p in (*base, "gram")]),
                     False, narrow, False))
    best = np.hstack([block(views["lite2@260"], p) for p in (*base, "gram")])
    rows += [
        ("lite2@260 + lite2@384, pooled+stats+gram", np.hstack([best] + [block(views["lite2@384"], p)
                                                                      for p in (*base, "gram")]), False, narrow, False),
        ("lite0 + lite1 + lite2, pooled+stats+gram, artist-balanced weights", np.hstack([block(views[k], p) for k in ("lite0@224", "lite1@240",
                                                                                         "lite2@260")
                                                               for p in (*base, "gram")]), True, narrow, False),
        ("lite2@260 pooled+stats+gram, artist-balanced weights", best, True, narrow, False),
        ("same, wider L2 grid", best, True, wide, False),
        ("same, folds that SHARE artists (leaky reference)", best, True, wide, True),
    ]
    print("| features | width | test acc | test macro-F1 | 5 folds acc | seconds |")
    print("|---|---|---|---|---|---|")
    for name, x, artist_weights, l2, shared in rows:
        t = time.perf_counter()
        r = score(x, y, split, groups, len(classes), artist_weights=artist_weights, l2=l2, shared_artists=shared)
        print(f"| {name} | {x.shape[1]} | {r['test']:.3f} | {r['test_f1']:.3f} | {r['folds']:.3f} +- "
              f"{r['folds_std']:.3f} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
