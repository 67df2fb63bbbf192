"""Accuracy of `classify train` on wikiart-dev, artist-disjoint: probes per feature type, fine-tuning, TTA, an
ensemble, one-vs-rest for three artists, and domain adaptation (DANN) on a real shift.

Needs a workspace made by:
    curator clean ../shared/data/wikiart-dev --out bench/out/wikiart-dev --group-pattern '^([^_]+)_'
    curator split --workspace bench/out/wikiart-dev --group-pattern '^([^_]+)_'
Run:
    .venv/bin/python bench/accuracy.py [--workspace bench/out/wikiart-dev] [--skip-dann] [--skip-finetune]
Prints one line per result and writes bench/out/accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

from classify.classifier import FeatureHead
from classify.data import read_split_table
from classify.evaluate import evaluate
from classify.train import TrainSettings, class_weights, macro_f1, train, train_probe
from curator.embedding.embed import open_cache, select_parts
from curator.stages.splits import SplitSettings, make_splits

OUT = Path("bench/out")
LITE0 = "efficientnet_lite0"  # the numbers in docs/BENCHMARKS.md were measured on Lite0 (Lite2 rows: see there)


def say(results: dict, key: str, value) -> None:
    results[key] = value
    print(f"{key}: {json.dumps(value)}", flush=True)
    (OUT / "accuracy.json").write_text(json.dumps(results, indent=2))


def probe_on(x_tr, y_tr, x_ev, y_ev, n, settings) -> tuple[float, float, np.ndarray]:
    head = FeatureHead(x_tr.shape[1], n, 0.0)
    head.set_statistics(torch.from_numpy(x_tr))
    w = torch.from_numpy(class_weights(y_tr, n))
    # the L2 strength is chosen on the evaluation rows' own labels only through `train_probe`'s val argument, so
    # callers pass val there and test rows to the final prediction below
    state, _ = train_probe(torch.from_numpy(x_tr), torch.from_numpy(y_tr), w, torch.from_numpy(x_ev[0]), y_ev[0],
                           head, settings)
    head.load_state_dict(state)
    head.eval()
    with torch.no_grad():
        probs = torch.softmax(head(torch.from_numpy(x_ev[1])), 1).numpy()
    pred = probs.argmax(1)
    return float((pred == y_ev[1]).mean()), macro_f1(y_ev[1], pred, n), probs


def probes(ws: Path, results: dict) -> dict[str, np.ndarray]:
    table = read_split_table(ws / "splits.parquet")
    cache = open_cache(ws, table.backbone_key)
    classes = table.classes
    idx = {c: i for i, c in enumerate(classes)}
    settings = TrainSettings()
    out = {}
    frames = {s: table.rows(s) for s in ("train", "val", "test")}
    ys = {s: np.array([idx[c] for c in f["label"].to_list()]) for s, f in frames.items()}
    feats = {s: cache.get(f["sha256"].to_list()) for s, f in frames.items()}
    for parts in (("pooled",), ("stats",), ("pooled", "stats")):
        t = time.perf_counter()
        sel = {s: select_parts(x, cache.layout, parts) for s, x in feats.items()}
        acc, f1, probs = probe_on(sel["train"], ys["train"], (sel["val"], sel["test"]), (ys["val"], ys["test"]),
                                  len(classes), settings)
        name = "+".join(parts)
        out[name] = probs
        say(results, f"probe[{name}] test", {"accuracy": round(acc, 4), "macro_f1": round(f1, 4),
                                             "seconds": round(time.perf_counter() - t, 1)})
    # the same probes by 5 artist-disjoint folds over train+val+test: a steadier number than one 273-image test
    all_frame = table.frame
    y_all = np.array([idx[c] for c in all_frame["label"].to_list()])
    x_all = cache.get(all_frame["sha256"].to_list())
    from sklearn.model_selection import GroupKFold

    groups = all_frame["group"].fill_null(all_frame["sha256"]).to_list()
    for parts in (("pooled",), ("stats",), ("pooled", "stats")):
        t = time.perf_counter()
        x = select_parts(x_all, cache.layout, parts)
        accs = []
        for tr, te in GroupKFold(5).split(x, y_all, groups):
            # L2 picked on an inner artist-disjoint slice of the training folds
            inner = np.isin(np.asarray(groups)[tr], sorted(set(np.asarray(groups)[tr]))[::9])
            acc, _, _ = probe_on(x[tr][~inner], y_all[tr][~inner], (x[tr][inner], x[te]), (y_all[tr][inner], y_all[te]),
                                 len(classes), settings)
            accs.append(acc)
        say(results, f"probe[{'+'.join(parts)}] 5-fold artist-disjoint",
            {"accuracy_mean": round(float(np.mean(accs)), 4), "accuracy_std": round(float(np.std(accs)), 4),
             "seconds": round(time.perf_counter() - t, 1)})
    return out


def finetune(ws: Path, results: dict, probe_probs: dict[str, np.ndarray]) -> Path:
    run = OUT / "runs" / "wikiart-finetune"
    t = time.perf_counter()
    r = train(ws / "splits.parquet", run, TrainSettings(model=LITE0, epochs=10))
    wall = time.perf_counter() - t
    say(results, "fine-tune timings", {k: round(v, 1) for k, v in r.timings.items()})
    m = evaluate(run, workers=1).metrics
    say(results, "fine-tune (defaults, flip TTA) test", {"accuracy": round(m["accuracy"], 4),
                                                          "macro_f1": round(m["macro_f1"], 4),
                                                          "top3": round(m["top3_accuracy"], 4),
                                                          "best_epoch": r.best_epoch, "train_seconds": round(wall, 1)})
    no_tta = OUT / "runs" / "wikiart-finetune-notta"
    shutil.rmtree(no_tta, ignore_errors=True)
    shutil.copytree(run, no_tta, ignore=shutil.ignore_patterns("eval-*"))
    meta = json.loads((no_tta / "model.json").read_text())
    meta["preprocessing"]["tta"] = None
    (no_tta / "model.json").write_text(json.dumps(meta))
    m2 = evaluate(no_tta, workers=1).metrics
    say(results, "fine-tune (defaults, no TTA) test", {"accuracy": round(m2["accuracy"], 4),
                                                        "macro_f1": round(m2["macro_f1"], 4)})
    # ensemble: fine-tuned probabilities (flip TTA) averaged with the stage-1 probe's on pooled+stats
    from classify import checkpoint
    from classify.data import PixelCache
    from classify.train import Crops, predict_pixels
    from curator.core.runtime import select_runtime

    table = read_split_table(ws / "splits.parquet")
    loaded = checkpoint.load(run)
    pixels = PixelCache(ws / "cache" / "pixels", loaded.preprocess)
    test = table.rows("test")
    loader = torch.utils.data.DataLoader(Crops(pixels, pixels.rows(test["sha256"].to_list()), None),
                                         batch_size=64)
    ft_probs, _ = predict_pixels(loaded.classifier, loader, select_runtime(), True)
    idx = {c: i for i, c in enumerate(loaded.classes)}
    y = np.array([idx[c] for c in test["label"].to_list()])
    for name, probs in (("fine-tune alone (recomputed)", ft_probs),
                        ("ensemble fine-tune + probe[pooled+stats]", (ft_probs + probe_probs["pooled+stats"]) / 2)):
        pred = probs.argmax(1)
        say(results, f"{name} test", {"accuracy": round(float((pred == y).mean()), 4),
                                      "macro_f1": round(macro_f1(y, pred, len(idx)), 4)})
    return run


def one_vs_rest(ws: Path, results: dict) -> None:
    mixed = OUT / "wikiart-dev-mixed"
    if not (mixed / "splits.parquet").is_file():
        shutil.rmtree(mixed, ignore_errors=True)
        subprocess.run(["cp", "-al", str(ws), str(mixed)], check=True)
        make_splits(mixed, SplitSettings(use_groups=False, seed=0))
    table = read_split_table(mixed / "splits.parquet")
    counts = table.frame.group_by("group").len().filter(pl.col("len") >= 15).sort(["len", "group"],
                                                                                   descending=[True, False])
    for artist in counts["group"].head(3).to_list():
        for epochs in (0,):
            t = time.perf_counter()
            run = OUT / "runs" / f"ovr-{artist}-e{epochs}"
            r = train(mixed / "splits.parquet", run, TrainSettings(model=LITE0, positive=artist,
                                                                   positive_column="group", epochs=epochs))
            m = evaluate(run, workers=1).metrics
            say(results, f"one-vs-rest {artist} (epochs {epochs}) test",
                {"works": int(counts.filter(pl.col("group") == artist)["len"][0]),
                 "test_positives": m["positive"]["support"], "f1": round(m["positive"]["f1"], 4),
                 "precision": round(m["positive"]["precision"], 4), "recall": round(m["positive"]["recall"], 4),
                 "average_precision": round(m["positive"]["average_precision"], 4),
                 "threshold": round(r.threshold, 4), "seconds": round(time.perf_counter() - t, 1)})


def phone_capture(image, rng: np.random.Generator):
    """A painting as a phone photo of it: perspective warp, uneven light, blur, sensor noise, strong JPEG."""
    import io

    from PIL import Image, ImageFilter

    im = image.convert("RGB")
    im.thumbnail((640, 640))
    w, h = im.size
    j = lambda s: rng.uniform(0, s)
    quad = (j(0.08 * w), j(0.08 * h), j(0.08 * w), h - j(0.08 * h), w - j(0.08 * w), h - j(0.08 * h),
            w - j(0.08 * w), j(0.08 * h))
    im = im.transform((w, h), Image.Transform.QUAD, quad, Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    grad = ((xx / w - 0.5) * np.cos(angle) + (yy / h - 0.5) * np.sin(angle))
    light = 1.0 + rng.uniform(0.3, 0.6) * grad
    warm = np.array([1.0 + rng.uniform(0, 0.08), 1.0, 1.0 - rng.uniform(0, 0.1)], dtype=np.float32)
    a = a * light[..., None] * warm + rng.normal(0, 6, a.shape)
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.6)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(35, 60)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def dann(ws: Path, results: dict, epochs: int) -> None:
    from PIL import Image

    table = read_split_table(ws / "splits.parquet")
    target = OUT / "phone-captures"
    if not target.is_dir():
        rng = np.random.default_rng(0)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for row in table.rows("test").iter_rows(named=True):
            (tmp / row["label"]).mkdir(parents=True, exist_ok=True)
            phone_capture(Image.open(row["path"]), rng).save(tmp / row["label"] / f"{row['sha256'][:16]}.jpg",
                                                              quality=92)
        tmp.rename(target)
    t = time.perf_counter()
    r = train(ws / "splits.parquet", OUT / "runs" / "wikiart-dann",
              replace(TrainSettings(model=LITE0), target_dir=str(target), epochs=epochs))
    say(results, f"DANN on phone captures of the test artists ({epochs} epochs)", {**r.target,
                                                                 "seconds_both_runs": round(time.perf_counter() - t, 1)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workspace", type=Path, default=OUT / "wikiart-dev")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--skip-dann", action="store_true")
    parser.add_argument("--skip-ovr", action="store_true")
    parser.add_argument("--skip-probes", action="store_true")
    parser.add_argument("--dann-epochs", type=int, default=10)
    args = parser.parse_args()
    results: dict = {"cpu": Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0].strip(": "),
                     "threads": torch.get_num_threads()}
    if (OUT / "accuracy.json").is_file():
        results.update(json.loads((OUT / "accuracy.json").read_text()))
    probe_probs = {} if args.skip_probes else probes(args.workspace, results)
    if not args.skip_finetune:
        finetune(args.workspace, results, probe_probs)
    if not args.skip_ovr:
        one_vs_rest(args.workspace, results)
    if not args.skip_dann:
        dann(args.workspace, results, args.dann_epochs)


if __name__ == "__main__":
    main()
