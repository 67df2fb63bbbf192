"""Mislabel detection with planted label swaps: ours (two tiers) against cleanlab on the same probabilities.

    .venv/bin/pip install cleanlab            # bench-only peer
    .venv/bin/curator clean ../shared/data/wikiart-dev --out bench/out/wikiart-dev --group-pattern '^([^_]+)_'
    .venv/bin/curator clean data/sample --out bench/out/sample --group-pattern '^([^_]+)_'
    .venv/bin/python bench/mislabels.py [--workspace bench/out/wikiart-dev] [--sample bench/out/sample] [--seeds 2]
        [--rates 0.05,0.1,0.2] [--first-seed 0] [--skip-filed] [--sizes 100,200,400 --sizes-from WORKSPACE]

Each planting refits the grouped 5-fold probe (minutes per run on a loaded 2-core machine): split long runs over
processes with --workspace '' (skip wikiart-dev), --first-seed and --skip-filed.

Takes the rows of a cleaned workspace that survive duplicates and label conflicts (stage 6's own verdicts are
ignored) and reports, mean over seeds:
- the correctly labelled collection as it is: the noise estimate with its bootstrap interval, rows removed (the
  `outlier` tier) and kept for review;
- with 5%, 10% and 20% of the labels swapped to another class at random: precision, recall and F1 of the removed
  tier on the swapped rows, the recall of both tiers together, and the estimate against the true rate;
- cleanlab `filter.find_label_issues` fed our out-of-fold probe probabilities (grouped folds too);
- on the sample workspace (data/sample = wikiart-public-domain: 5 styles, 19 artists) also: two artists made into
  classes of their own (rembrandt, childe-hassam: a class by one artist), and how many of them are flagged;
- `--sizes`: random subsets of the first workspace at 10% swaps, to see how small a collection can be before the
  estimate (and the removed tier) goes wrong.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def prf(flagged: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    tp = float((flagged & truth).sum())
    precision = tp / max(flagged.sum(), 1) if flagged.any() else float("nan")
    recall = tp / max(truth.sum(), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12) if flagged.any() else 0.0
    return precision, recall, f1


def load(workspace: Path):
    """(embeddings, labels, groups) of the rows that survived duplicates and conflicts."""
    import polars as pl

    from curator.core import manifest
    from curator.embedding.embed import embedding_matrix, open_cache

    df = manifest.read(workspace).filter(pl.col("status").is_in(["ok", "outlier"]))
    meta = manifest.read_metadata(workspace / manifest.MANIFEST_NAME)
    cache = open_cache(workspace, meta["backbone_key"])
    x = embedding_matrix(cache.get(df["sha256"].to_list()), cache.layout)
    return x, np.array(df["label"].to_list(), dtype=object), df["group"].to_list()


def swap(labels: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with a `rate` share replaced by another class at random, and which were."""
    classes = sorted(set(labels))
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    swapped = rng.random(len(labels)) < rate
    for i in np.flatnonzero(swapped):
        noisy[i] = rng.choice([c for c in classes if c != labels[i]])
    return noisy, swapped


def one_run(x, labels, groups, rate: float, seed: int) -> dict:
    """Ours and cleanlab on one planting."""
    from cleanlab.filter import find_label_issues

    from curator.stages.mislabels import MislabelSettings, score_mislabels

    noisy, swapped = swap(labels, rate, seed)
    t0 = time.perf_counter()
    ours = score_mislabels(x, list(noisy), groups, MislabelSettings())
    seconds = time.perf_counter() - t0
    classes = ours.classes
    y = np.array([classes.index(c) for c in noisy])
    issues = find_label_issues(y, ours.probe)
    truth = swapped & ours.scored  # unscored rows cannot be judged (see the stage's docstring)
    p, r, f = prf(ours.outlier, swapped)
    return {"rate": rate, "true_rate": float(truth.sum() / max(ours.scored.sum(), 1)), "estimate": ours.noise_rate,
            "low": ours.noise_interval[0], "high": ours.noise_interval[1], "removed": int(ours.outlier.sum()),
            "review": int((ours.flagged & ~ours.outlier).sum()), "P": p, "R": r, "F1": f,
            "R_both": prf(ours.flagged, swapped)[1], "cl": prf(issues, swapped), "cl_n": int(issues.sum()),
            "seconds": seconds, "reliable": ours.reliable, "judged": int(ours.scored.sum())}


def show(name: str, runs: list[dict]) -> None:
    """One line: the mean over seeds."""
    m = {k: _mean([r[k] for r in runs]) for k in runs[0] if k not in ("cl", "reliable")}
    cl = np.nanmean(np.array([r["cl"] for r in runs], dtype=float), axis=0)
    reliable = sum(r["reliable"] for r in runs)
    print(f"| {name} | {m['rate']:.0%} | {m['judged']:.0f} | {m['true_rate']:.3f} | {m['estimate']:.3f} "
          f"[{m['low']:.3f}, {m['high']:.3f}] | {m['removed']:.1f} / {m['review']:.1f} | "
          f"{m['P']:.3f} / {m['R']:.3f} / **{m['F1']:.3f}** | {m['R_both']:.3f} | "
          f"{cl[0]:.3f} / {cl[1]:.3f} / {cl[2]:.3f} ({m['cl_n']:.0f}) | {reliable}/{len(runs)} | {m['seconds']:.0f} s |",
          flush=True)


def _mean(values: list[float]) -> float:
    """Mean over the values that are numbers (precision is NaN where nothing was flagged)."""
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def one_artist_classes(x, labels, groups) -> None:
    """Rembrandt's and Childe Hassam's works each made a class of its own: how many of them get flagged."""
    from curator.stages.mislabels import MislabelSettings, score_mislabels

    labels = labels.copy()
    for artist in ("rembrandt", "childe-hassam"):
        labels[[g == artist for g in groups]] = artist
    result = score_mislabels(x, list(labels), groups, MislabelSettings())
    for artist in ("rembrandt", "childe-hassam"):
        rows = labels == artist
        print(f"one-artist class {artist}: {int(rows.sum())} works, {int(result.flagged[rows].sum())} flagged, "
              f"{int(result.outlier[rows].sum())} removed; whole collection {int(result.outlier.sum())} removed, "
              f"{int((result.flagged & ~result.outlier).sum())} review", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=str(REPO / "bench" / "out" / "wikiart-dev"),
                        help="a cleaned workspace of wikiart-dev ('' to skip)")
    parser.add_argument("--sample", type=Path, default=None, help="a cleaned workspace of data/sample")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--skip-filed", action="store_true", help="skip the collections as filed (no swaps)")
    parser.add_argument("--rates", default="0.05,0.1,0.2")
    parser.add_argument("--sizes", default="", help="subset sizes of --sizes-from at 10%% swaps, e.g. 100,200,400")
    parser.add_argument("--sizes-from", type=Path, default=REPO / "bench" / "out" / "wikiart-dev")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r]
    print(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())} ({os.cpu_count()} cores)")
    header = ("| data | swaps | judged | true rate | estimate [90% interval] | removed / review | removed P / R / F1 "
              "| recall removed + review | cleanlab P / R / F1 (flagged) | reliable | seconds |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    print(header)
    for name, workspace in (("sample", args.sample), ("wikiart-dev", args.workspace)):
        if not workspace:
            continue
        x, labels, groups = load(Path(workspace))
        if not args.skip_filed:
            show(f"{name} as filed", [one_run(x, labels, groups, 0.0, 0)])
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        for rate in rates:
            show(name, [one_run(x, labels, groups, rate, seed) for seed in seeds])
        if name == "sample":
            one_artist_classes(x, labels, groups)
    if args.sizes:
        x, labels, groups = load(args.sizes_from)
        for size in (int(s) for s in args.sizes.split(",")):
            runs = []
            for seed in range(args.seeds):
                rows = np.sort(np.random.default_rng(100 + seed).choice(len(labels), size, replace=False))
                runs.append(one_run(x[rows], labels[rows], [groups[i] for i in rows], 0.1, seed))
            show(f"wikiart-dev subset of {size}", runs)
    print(f"load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
