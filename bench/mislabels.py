"""Mislabel detection with planted label swaps: ours against cleanlab on the same embeddings, one run.

    .venv/bin/pip install cleanlab            # bench-only peer
    .venv/bin/curator clean ../shared/data/wikiart-dev --out bench/out/wikiart-dev --group-pattern '^([^_]+)_'
    .venv/bin/python bench/mislabels.py [--workspace bench/out/wikiart-dev] [--seeds 3]

Takes the rows of a cleaned workspace that survive duplicates and label conflicts (stage 6's own verdicts are
ignored), swaps a fraction of
the labels to a different class at random, and scores:
- ours: `curator.stages.mislabels.score_mislabels` (grouped out-of-fold probe + kNN without same-artist neighbours,
  count from the empirical null);
- cleanlab `filter.find_label_issues` fed the same out-of-fold probe probabilities (grouped folds too);
- cleanlab `Datalab.find_issues` with the same probabilities and the embeddings as features.
Precision, recall and F1 on the swapped rows, mean over seeds, and seconds. Settings: all 11 styles at 5/10/20%
swaps, and a 5-style subset at 5%.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SUBSET = ("Baroque", "Impressionism", "Pointillism", "Rococo", "Ukiyo_e")


def prf(flagged: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    tp = float((flagged & truth).sum())
    precision = tp / max(flagged.sum(), 1)
    recall = tp / max(truth.sum(), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return precision, recall, f1


def best_recall_at_precision(score: np.ndarray, truth: np.ndarray, precision: float) -> float:
    """Highest recall over cuts of the ranking by `score` whose precision is at least `precision`."""
    order = np.argsort(-score, kind="stable")
    hits = np.cumsum(truth[order])
    k = np.arange(1, len(order) + 1)
    ok = hits / k >= precision
    return float(hits[ok].max() / max(truth.sum(), 1)) if ok.any() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=REPO / "bench" / "out" / "wikiart-dev")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datalab", action="store_true", help="also run cleanlab's Datalab (slower)")
    args = parser.parse_args()

    import polars as pl
    from cleanlab.filter import find_label_issues

    from curator.core import manifest
    from curator.embedding.embed import embedding_matrix, open_cache
    from curator.stages.mislabels import MislabelSettings, score_mislabels

    # the rows that survive duplicates and conflicts, before stage 6 removes any (ok or outlier)
    df = manifest.read(args.workspace).filter(pl.col("status").is_in(["ok", "outlier"]))
    meta = manifest.read_metadata(args.workspace / manifest.MANIFEST_NAME)
    cache = open_cache(args.workspace, meta["backbone_key"])
    x_all = embedding_matrix(cache.get(df["sha256"].to_list()), cache.layout)
    settings = MislabelSettings()
    # "ours, ranking only" rows: the highest recall over all cuts of our ranking with precision >= 0.5
    scenarios = [("11 styles", None, 0.05), ("11 styles", None, 0.10), ("11 styles", None, 0.20),
                 ("5 styles", SUBSET, 0.05)]
    print(f"{len(df)} kept images; {args.seeds} seeds per row; mean over seeds")
    for name, subset, rate in scenarios:
        rows = np.arange(len(df)) if subset is None else np.flatnonzero(df["label"].is_in(list(subset)).to_numpy())
        x = x_all[rows]
        labels = np.array(df["label"].to_list(), dtype=object)[rows]
        groups = df["group"].to_list()
        groups = [groups[i] for i in rows]
        classes = sorted(set(labels))
        results: dict[str, list] = {"ours": [], "cleanlab find_label_issues": [], "cleanlab Datalab": []}
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            noisy = labels.copy()
            swapped = rng.random(len(labels)) < rate
            for i in np.flatnonzero(swapped):
                noisy[i] = rng.choice([c for c in classes if c != labels[i]])
            t0 = time.perf_counter()
            ours = score_mislabels(x, list(noisy), groups, settings)
            ours_s = time.perf_counter() - t0
            results["ours"].append((*prf(ours.flagged, swapped), ours_s))
            results.setdefault("ours, ranking only", []).append(
                (0.5, best_recall_at_precision(ours.score, swapped, 0.5), float("nan"), 0.0))
            y = np.array([classes.index(c) for c in noisy])
            t0 = time.perf_counter()
            issues = find_label_issues(y, ours.probe)
            cl_s = time.perf_counter() - t0
            # cleanlab is fed the probe that ours computed: its time is ours' probe time plus its own filter
            results["cleanlab find_label_issues"].append((*prf(issues, swapped), cl_s))
            if args.datalab:
                from cleanlab import Datalab

                t0 = time.perf_counter()
                lab = Datalab(data={"label": list(noisy)}, label_name="label", verbosity=0)
                lab.find_issues(pred_probs=ours.probe, features=x, issue_types={"label": {}})
                flagged = lab.get_issues("label")["is_label_issue"].to_numpy()
                results["cleanlab Datalab"].append((*prf(flagged, swapped), time.perf_counter() - t0))
        for method, values in results.items():
            if not values:
                continue
            p, r, f, s = np.mean(np.array(values), axis=0)
            print(f"{name:9s} {int(rate * 100):2d}% swaps  {method:27s} precision {p:.3f} recall {r:.3f} F1 {f:.3f} "
                  f"({s:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
