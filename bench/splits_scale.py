"""The split's leak certificate at 100k-1M rows: seconds and peak RSS of each part, and the leaks it finds.

    .venv/bin/python bench/splits_scale.py [--sizes 100000,1000000] [--dim 2304] [--graph search|given]
                                           [--threads 2] [--json PATH]

Each size runs in a fresh process (so that peak RSS is that size's). N "real-like" unit embeddings
(`curator.core.neighbours.synthetic_embeddings`, 1% planted near-copies) are written into float16 unit rows, as
`curator split` holds them above the exact limit, with uniform random pHashes (each planted copy's pHash 0-8 bits from
its original's). Rows are placed by group (artist), as a grouped split places them, and every planted copy is then
moved to a random split, so about two thirds of the copies cross. Then, as `make_splits` runs them:
- graph: the kept rows' neighbour graph (`knn`, `LEAK_K` a row, the settings `curator clean` uses), which the duplicate gap
  and the certificate share (the neighbour search `curator split` runs once). `--graph given` skips that search
  (about 1,000 CPU-s at 1M, measured for `curator clean` in bench/neighbours_scale.py) and hands the certificate the
  graph a search would find on these rows: each row's planted partner and random rows of its own artist, re-scored
  exactly and sorted, so that what is timed is the certificate's own work at sizes where the search takes too long;
- threshold: `similarity` on that graph, and 1 - embed_relative x gap (the defaults of `curator clean`);
- candidates: `leak_candidates` (graph pairs re-scored exactly, rows whose neighbours are all above the threshold
  searched exactly, pHash pairs by multi-index hashing): once per split;
- certify: one placement's check (`certify`), which each round repeats.
Reported: wall and CPU seconds of each, RSS after the data and peak RSS, rows searched again exactly, leaking pairs,
recall of the planted copies that cross and are above the threshold (by cosine) or within the radius (by pHash), and
the recall of all crossing pairs above the threshold for `--check` random rows searched exactly against every row.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def flip(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One random 64-bit mask of each given weight."""
    ranks = np.argsort(rng.random((len(weights), 64)), axis=1)
    bits = np.zeros((len(weights), 64), dtype=bool)
    np.put_along_axis(bits, ranks, np.arange(64)[None, :] < weights[:, None], axis=1)
    return (bits.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


def given_graph(rows: np.ndarray, groups: np.ndarray, planted: np.ndarray, k: int, seed: int = 2):
    """A stand-in for the search's graph (`--graph given`): each row's planted partner (if any) and random rows of
    its artist, with their exact cosines, nearest first."""
    from curator.core.neighbours import Graph

    n = len(rows)
    rng = np.random.default_rng(seed)
    order = np.argsort(groups, kind="stable")
    starts = np.searchsorted(groups[order], groups)
    sizes = np.bincount(groups, minlength=groups.max() + 1)[groups]
    ids = order[starts[:, None] + (rng.random((n, k)) * sizes[:, None]).astype(np.int64)]
    partner = np.full(n, -1)
    partner[planted[:, 0]], partner[planted[:, 1]] = planted[:, 1], planted[:, 0]
    ids[:, 0] = np.where(partner >= 0, partner, ids[:, 0])
    ids = np.where(ids == np.arange(n)[:, None], -1, ids)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, 1024):
        a = rows[start:start + 1024].astype(np.float32)
        b = rows[np.maximum(ids[start:start + 1024], 0)].astype(np.float32)
        sims[start:start + 1024] = np.einsum("nd,nkd->nk", a, b)
    sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
    rank = np.argsort(-sims, axis=1)
    return Graph(np.take_along_axis(ids, rank, axis=1), np.take_along_axis(sims, rank, axis=1), False,
                 "given (bench: planted partner + artist-mates, re-scored)")


def run(n: int, dim: int, check: int, graph_mode: str = "search") -> dict:
    """One size, in this process."""
    from curator.core.hamming_search import popcount64
    from curator.core.neighbours import (
        Neighbourhood,
        UnitRows,
        knn,
        synthetic_embeddings,
    )
    from curator.core.settings import DuplicateSettings
    from curator.stages.duplicates import similarity
    from curator.stages.splits import (
        LEAK_K,
        SPLITS,
        certify,
        leak_candidates,
        )

    settings = DuplicateSettings()
    (store, data), gen_s, _ = timed(lambda: (s := UnitRows(n, dim), synthetic_embeddings(n, dim, seed=0, out=s)))
    planted, groups = data["planted"], data["groups"]
    rng = np.random.default_rng(1)
    phash = rng.integers(0, 2**63, n, dtype=np.uint64) << np.uint64(1) | rng.integers(0, 2, n, dtype=np.uint64)
    phash[planted[:, 1]] = phash[planted[:, 0]] ^ flip(rng, rng.integers(0, settings.phash_radius + 1, len(planted)))
    split_of_group = rng.choice(len(SPLITS), groups.max() + 1, p=[0.8, 0.1, 0.1])
    part = split_of_group[groups]
    part[planted[:, 1]] = rng.integers(0, len(SPLITS), len(planted))
    split = np.array(SPLITS)[part]
    rss_data = current_rss_mb()

    k = max(settings.embed_neighbours, LEAK_K)
    if graph_mode == "given":
        graph, graph_s, graph_cpu = timed(lambda: given_graph(store.rows, groups, planted, k))
    else:
        graph, graph_s, graph_cpu = timed(lambda: knn(store, k, seed=0))
    space = Neighbourhood(store.rows, graph, None, store)
    sim, sim_s, _ = timed(lambda: similarity(space, settings.embed_neighbours))
    threshold = 1.0 - settings.embed_relative * sim.gap
    cands, cand_s, cand_cpu = timed(lambda: leak_candidates(space, phash, threshold, settings.phash_radius))
    (report, leaks), cert_s, _ = timed(lambda: certify(cands, split))
    peak = rss_mb()

    full = ((graph.sims[:, :LEAK_K] >= threshold - 0.01) | (graph.ids[:, :LEAK_K] < 0)).all(axis=1)
    found = {tuple(p) for p in leaks.tolist()}
    rows = store.rows
    a, b = planted[:, 0], planted[:, 1]
    cos = (rows[a].astype(np.float32) * rows[b].astype(np.float32)).sum(axis=1)
    crossing = split[a] != split[b]
    pairs = [tuple(sorted(p)) for p in planted.tolist()]
    by_cos = crossing & (cos >= threshold)
    by_hash = crossing & (popcount64(phash[a] ^ phash[b]) <= settings.phash_radius)
    recall = lambda mask: float(np.mean([pairs[i] in found for i in np.flatnonzero(mask)])) if mask.any() else None

    queries = np.sort(rng.choice(n, size=min(check, n), replace=False))
    q = rows[queries].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = set()
    for start in range(0, n, 8192):
        block = rows[start:start + 8192].astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        qi, bj = np.nonzero(q @ block.T >= threshold)
        for x, y in zip(queries[qi].tolist(), (start + bj).tolist()):
            if x != y and split[x] != split[y]:
                truth.add((min(x, y), max(x, y)))
    exact_recall = float(np.mean([p in found for p in truth])) if truth else None
    return {"n": n, "dim": dim, "generate_s": gen_s, "rss_after_data_mb": rss_data,
            "graph_s": graph_s, "graph_cpu_s": graph_cpu, "graph": graph.method, "similarity_s": sim_s,
            "threshold": threshold, "candidates_s": cand_s, "candidates_cpu_s": cand_cpu, "certify_s": cert_s,
            "peak_rss_mb": peak, "rows_searched_exactly": int(full.sum()), "cos_candidates": len(cands.cosines),
            "hash_candidates": len(cands.distances), "leaks": len(leaks), "certificate": report,
            "planted_crossing_above_threshold": int(by_cos.sum()), "planted_recall_cosine": recall(by_cos),
            "planted_crossing_within_radius": int(by_hash.sum()), "planted_recall_phash": recall(by_hash),
            "checked_rows": len(queries), "checked_pairs": len(truth), "checked_recall": exact_recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=2304)
    parser.add_argument("--check", type=int, default=500, help="rows whose crossing pairs are checked exactly")
    parser.add_argument("--graph", choices=("search", "given"), default="search",
                        help="search: the graph as make_splits builds it; given: a stand-in (module docstring)")
    parser.add_argument("--threads", type=int, help="faiss threads (default: faiss's own)")
    parser.add_argument("--json", help="append the measurements here, a JSON line per size")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    if args.role == "child":
        print(json.dumps(run(args.n, args.dim, args.check, args.graph)))
        return
    for n in (int(x) for x in args.sizes.split(",")):
        extra = ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run([sys.executable, __file__, "--role", "child", "--n", str(n), "--dim", str(args.dim),
                              "--check", str(args.check), "--graph", args.graph, *extra], check=True,
                             capture_output=True, text=True)
        r = {**json.loads(out.stdout.strip().splitlines()[-1]), "graph_mode": args.graph}
        print(f"N={n:>9,} x {args.dim} ({args.graph} graph): data {r['generate_s']:.0f} s ({r['rss_after_data_mb']:.0f} MB); graph "
              f"{r['graph_s']:.0f} s (cpu {r['graph_cpu_s']:.0f}); threshold {r['threshold']:.3f}; candidates "
              f"{r['candidates_s']:.1f} s (cpu {r['candidates_cpu_s']:.1f}, {r['rows_searched_exactly']} rows searched "
              f"exactly); certify {r['certify_s']:.2f} s; peak RSS {r['peak_rss_mb']:.0f} MB; {r['leaks']} leaks; "
              f"planted recall cosine {r['planted_recall_cosine']} ({r['planted_crossing_above_threshold']}), pHash "
              f"{r['planted_recall_phash']} ({r['planted_crossing_within_radius']}); exact check "
              f"{r['checked_recall']} of {r['checked_pairs']} pairs from {r['checked_rows']} rows", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
