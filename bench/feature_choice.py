"""Which feature is "the embedding": final pooled vector, style statistics, or both. Measured, not assumed.

    .venv/bin/python bench/feature_choice.py [--data ../shared/data/wikiart-dev]

Runs `curator clean` on the data (cached in bench/out/, so reruns are quick), then a linear probe (standardised
features, scikit-learn logistic regression) per feature part, with 5 artist-disjoint stratified folds
(StratifiedGroupKFold on the artist from the file name): no artist is in both the probe's training and test data.
Prints accuracy and macro-F1, mean and spread over folds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = {"pooled": ("pooled",), "stats": ("stats",), "pooled+stats": ("pooled", "stats")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "wikiart-dev")
    parser.add_argument("--workspace", type=Path, default=REPO / "bench" / "out" / "wikiart-dev")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()

    import polars as pl
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from curator.core import manifest
    from curator.core.runtime import configure_allocator
    from curator.embedding.embed import open_cache, select_parts
    from curator.stages.clean import CleanSettings, clean

    configure_allocator()
    t0 = time.perf_counter()
    result = clean(CleanSettings(root=args.data, workspace=args.workspace, group_pattern=r"^([^_]+)_"))
    print(f"clean: {len(result.manifest)} files, {result.embed.computed} embedded, "
          f"{result.embed.reused} cached ({time.perf_counter() - t0:.0f} s)")
    df = result.manifest.filter(pl.col("keep"))
    meta = manifest.read_metadata(result.manifest_path)
    cache = open_cache(args.workspace, meta["backbone_key"])
    features = cache.get(df["sha256"].to_list())
    labels = df["label"].to_numpy()
    groups = df["group"].to_numpy()
    print(f"{len(df)} images, {len(set(labels))} classes, {len(set(groups))} artists; "
          f"layout {cache.layout}")
    folds = list(StratifiedGroupKFold(n_splits=args.folds, shuffle=True, random_state=0).split(features, labels,
                                                                                             groups))
    for name, parts in CANDIDATES.items():
        x = select_parts(features, cache.layout, parts)
        accs, f1s = [], []
        t0 = time.perf_counter()
        for train, test in folds:
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
            probe.fit(x[train], labels[train])
            pred = probe.predict(x[test])
            accs.append(accuracy_score(labels[test], pred))
            f1s.append(f1_score(labels[test], pred, average="macro"))
        print(f"{name:13s} dim {x.shape[1]:5d}  accuracy {np.mean(accs):.3f} +- {statistics.pstdev(accs):.3f}  "
              f"macro-F1 {np.mean(f1s):.3f}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
