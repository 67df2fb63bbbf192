"""The shared neighbour graph and the mislabel stage at 10k to 1M rows: seconds, peak RSS, pair recall vs exact.

    .venv/bin/python bench/neighbours_scale.py [--sizes 10000,100000,200000,1000000] [--threads 1] [--json PATH]
    .venv/bin/python bench/neighbours_scale.py --probe bench/out/wikiart-dev [--seeds 1]

Per size, in a fresh process (so peak RSS is that size's): N "real-like" 2,304-wide unit embeddings
(`curator.core.neighbours.synthetic_embeddings`: class centres, per-artist offsets, power-law noise, 1% planted
near-copies), held as `curator clean` holds them (float32 up to `EXACT_LIMIT`, float16 `UnitRows` above), then
- `knn` with the width `curator clean` asks for (`graph_width`: the duplicate cascade's 8 and the vote's candidates);
- pair recall against exact search for 2,000 random rows (faiss-free exact top-k over all N, read in chunks), at
  k = 8 (what the duplicate cascade reads) and at the graph's full width, and the recall of the planted copies (the
  original among the copy's 8 nearest);
- the mislabel stage as `curator clean` runs it: the graph mapped to the kept rows (the planted copies dropped, as
  the duplicate cascade would), 5% of the labels swapped, `score_mislabels` (vote + out-of-fold probe, grouped by
  artist), with its precision and recall on the swaps.
CPU seconds are printed beside wall seconds: the machine is shared, and CPU seconds say what the work costs.

`--probe`: today's probe (logistic regression on the full embedding) against the fast one used above `PROBE_LIMIT`
(the 256-dimensional projection, training folds capped) on a cleaned wikiart-dev workspace at 10% planted swaps:
precision, recall and F1 of the flagged rows, the probe's own accuracy on the true labels, and seconds (the fast
probe forced with `probe_limit=0`; once as it runs at this size, where no fold reaches the cap, and once with the cap
lowered to 1,000 rows so that the cap's cost shows too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return round(wall - start[0], 1), round(cpu - start[1], 1)


def swap_labels(labels: np.ndarray, classes: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with a share `rate` moved to another class at random, and which were moved."""
    rng = np.random.default_rng(seed)
    swapped = rng.random(len(labels)) < rate
    noisy = labels.copy()
    noisy[swapped] = (labels[swapped] + rng.integers(1, classes, swapped.sum())) % classes
    return noisy, swapped


def run(n: int, dim: int = 2304, seed: int = 0, queries: int = 2000) -> dict:
    """One size: generate, search, measure recall, run the mislabel stage (see the module docstring)."""
    from curator.core.neighbours import (
        EXACT_LIMIT,
        Neighbourhood,
        UnitRows,
        exact_reference,
        graph_width,
        knn,
        memory_note,
        pair_recall,
        synthetic_embeddings,
    )
    from curator.stages.mislabels import MislabelSettings, score_mislabels, vote_size

    out: dict = {"n": n, "dim": dim}
    start = _clock()
    held = np.empty((n, dim), dtype=np.float32) if n <= EXACT_LIMIT else UnitRows(n, dim)
    data = synthetic_embeddings(n, dim, seed, out=held)
    rows = held if isinstance(held, np.ndarray) else held.rows
    out["generate_s"] = _since(start)[0]
    out["held"] = memory_note(n, dim, rows.dtype)
    settings = MislabelSettings()
    width = graph_width(n, 8, vote_size(n, settings)[1])
    start = _clock()
    graph = knn(held, width, seed=seed)
    out["knn_s"], out["knn_cpu_s"] = _since(start)
    out["k"], out["method"] = width, graph.method
    out["rss_after_knn_gb"] = round(rss_gb(), 2)
    sample = np.sort(np.random.default_rng(seed + 1).choice(n, min(n, queries), replace=False))
    start = _clock()
    reference = exact_reference(rows, sample, width)
    out["reference_s"] = _since(start)[0]
    out["recall_at_8"] = round(pair_recall(graph, reference, sample, 8), 4)
    out[f"recall_at_{width}"] = round(pair_recall(graph, reference, sample, width), 4)
    planted = data["planted"]
    out["planted_recall"] = round(float((graph.ids[planted[:, 1], :8] == planted[:, :1]).any(axis=1).mean()), 4)

    kept = np.setdiff1d(np.arange(n), planted[:, 1])  # the duplicate cascade removes the copies
    space = Neighbourhood(rows, graph, None, held if isinstance(held, UnitRows) else None).subset(kept)
    del graph, reference  # as `curator clean` drops the ok rows' graph once it is mapped
    classes = int(data["labels"].max()) + 1
    noisy, swapped = swap_labels(data["labels"][kept], classes, 0.05, seed)
    start = _clock()
    result = score_mislabels(space, [str(v) for v in noisy], [str(g) for g in data["groups"][kept]], settings)
    out["mislabels_s"], out["mislabels_cpu_s"] = _since(start)
    hits = float((result.flagged & swapped).sum())
    out["mislabel_precision"] = round(hits / max(result.flagged.sum(), 1), 3)
    out["mislabel_recall"] = round(hits / max(swapped.sum(), 1), 3)
    out["voters_mean"] = round(float(result.voters.mean()), 1)
    voters_wanted = vote_size(len(kept), settings)[0]
    out["rows_with_fewer_than_k_voters"] = round(float((result.voters < voters_wanted).mean()), 3)
    out["peak_rss_gb"] = round(rss_gb(), 2)
    return out


def probe_comparison(workspace: Path, seeds: int) -> list[dict]:
    """Today's probe against the fast one on a cleaned workspace (see the module docstring)."""
    import polars as pl

    from curator.core import manifest
    from curator.embedding.embed import embedding_matrix, open_cache
    from curator.stages import mislabels
    from curator.stages.mislabels import MislabelSettings, score_mislabels

    df = manifest.read(workspace).filter(pl.col("status").is_in(["ok", "outlier"]))
    meta = manifest.read_metadata(workspace / manifest.MANIFEST_NAME)
    x = embedding_matrix(open_cache(workspace, meta["backbone_key"]).get(df["sha256"].to_list()),
                         meta["feature_layout"])
    labels = np.array(df["label"].to_list(), dtype=object)
    classes = sorted(set(labels))
    codes = np.array([classes.index(c) for c in labels])
    groups = df["group"].to_list()
    rows = []
    for seed in range(seeds):
        noisy, swapped = swap_labels(codes, len(classes), 0.10, seed)
        for name, limit, cap in (("full probe (today)", 10**9, None), ("fast probe (projection)", 0, None),
                                 ("fast probe (projection, folds capped at 1,000 rows)", 0, 1000)):
            if cap is not None:
                mislabels.PROBE_TRAIN_ROWS, saved = cap, mislabels.PROBE_TRAIN_ROWS
            start = _clock()
            result = score_mislabels(x, [classes[c] for c in noisy], groups, MislabelSettings(seed=seed),
                                     probe_limit=limit)
            wall, cpu = _since(start)
            if cap is not None:
                mislabels.PROBE_TRAIN_ROWS = saved
            tp = float((result.flagged & swapped).sum())
            p, r = tp / max(result.flagged.sum(), 1), tp / max(swapped.sum(), 1)
            rows.append({"seed": seed, "probe": name, "precision": round(p, 3), "recall": round(r, 3),
                         "f1": round(2 * p * r / max(p + r, 1e-12), 3), "wall_s": wall, "cpu_s": cpu,
                         "probe_accuracy": round(float((result.probe.argmax(1) == codes).mean()), 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,200000,1000000")
    parser.add_argument("--dim", type=int, default=2304)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="faiss/BLAS threads for this benchmark process (default: faiss's own)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=Path, default=None, help="a cleaned wikiart-dev workspace")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)  # this benchmark process only
    if args.probe:
        probe_comparison(args.probe, args.seeds)
        return
    if args.one is not None:
        print(json.dumps(run(args.one, args.dim, args.seed)))
        return
    load = os.getloadavg()
    print(f"load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores", flush=True)
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        cmd = [sys.executable, __file__, "--one", str(n), "--dim", str(args.dim), "--seed", str(args.seed)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            print(f"n={n}: failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["load_after"] = round(os.getloadavg()[0], 1)
        results.append(result)
        print(json.dumps(result), flush=True)
    header = ("n", "knn s (cpu)", "peak RSS GB", "recall@8", "recall@k (k)", "planted", "mislabels s (cpu)",
              "mislabel P/R", "voters", "load")
    print(" | ".join(header))
    for r in results:
        k = r["k"]
        print(" | ".join([f"{r['n']:,}", f"{r['knn_s']} ({r['knn_cpu_s']})", str(r["peak_rss_gb"]),
                          str(r["recall_at_8"]), f"{r[f'recall_at_{k}']} ({k})", str(r["planted_recall"]),
                          f"{r['mislabels_s']} ({r['mislabels_cpu_s']})",
                          f"{r['mislabel_precision']}/{r['mislabel_recall']}", str(r["voters_mean"]),
                          str(r["load_after"])]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
