"""How the duplicate cascade's searches grow with N: the pHash range search (MIH vs faiss's flat index), and stages.

    .venv/bin/python bench/dedup_scale.py [--sizes 10000,100000,1000000] [--flat-limit 1200] [--json PATH]
    .venv/bin/python bench/dedup_scale.py --stages [--sizes 100000,1000000] [--dim 256]

Search comparison (default). For each N, each search and each method in a fresh process (so that peak RSS is that
method's): N uniform random 64-bit pHashes, 1% of them planted as near copies of other rows at distances cycling
through 0..radius; and 4 uniform centre-crop hashes a row, with another 1% of full-frame hashes planted near one
crop hash of another row (the cropped-copy case). Two searches, as `phash_pairs` runs them with the default
settings: pHash vs pHash within `phash_radius` (N x N) and pHash vs crop hashes within `crop_radius` (N x 4N).
Each is timed with `radius_search` (multi-index hashing where the cost model picks it) and with faiss's exact flat
index. Reported: wall and CPU seconds, the plan, peak RSS, pairs, planted recall, whether every returned distance
is right, and whether the two methods returned the same arrays (a sha256 of the sorted result). A flat search whose
time extrapolated from the previous size (x (N/N')^2, quadratic) exceeds `--flat-limit` seconds is not run: its
time is printed as extrapolated, and equality is then checked by planted recall and distances only.

`--stages`: the previous benchmark, seconds and peak RSS of `phash_pairs` (both searches plus the dHash check) and
of `similarity` + `embedding_pairs` on synthetic hashes and `--dim` embeddings with planted copies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time

import numpy as np

PLANTED_FRACTION = 0.01
SCALES = 4


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flip_masks(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One uniformly random 64-bit mask of each given weight (vectorised)."""
    ranks = np.argsort(np.argsort(rng.random((len(weights), 64)), axis=1), axis=1)
    bits = (ranks < weights[:, None]).astype(np.uint64) << np.arange(64, dtype=np.uint64)
    return np.bitwise_or.reduce(bits, axis=1)


def synthetic(n: int, radius: int, crop_radius: int) -> dict:
    """Uniform hashes with planted near copies at known distances (deterministic in n)."""
    rng = np.random.default_rng(n)
    phash = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    crop = rng.integers(0, 2**64 - 1, size=(n, SCALES), dtype=np.uint64, endpoint=True)
    k = max(1, int(n * PLANTED_FRACTION))
    rows = rng.permutation(n)[:3 * k]
    src, dst = rows[:k], rows[k:2 * k]  # full-frame copies: dst = src at 0..radius bits
    phash[dst] = phash[src] ^ flip_masks(rng, np.arange(k) % (radius + 1))
    cropped, scale = rows[2 * k:], rng.integers(0, SCALES, k)  # cropped copies: near a crop hash of src
    phash[cropped] = crop[src, scale] ^ flip_masks(rng, np.arange(k) % (crop_radius + 1))
    return {"phash": phash, "crop": crop.reshape(-1), "self": (dst, src), "crop_pairs": (cropped, src * SCALES + scale)}


def search(n: int, which: str, method: str) -> dict:
    """One timed search in this process."""
    from curator.core.hamming_search import choose_plan, popcount64, radius_search
    from curator.stages.duplicates import DuplicateSettings

    settings = DuplicateSettings()
    data = synthetic(n, settings.phash_radius, settings.crop_radius)
    radius = settings.phash_radius if which == "self" else settings.crop_radius
    queries, base = data["phash"], data["phash"] if which == "self" else data["crop"]
    planted_q, planted_b = data[which if which == "self" else "crop_pairs"]
    import faiss  # noqa: F401  (imported before the clock starts: its import is not the search's cost)

    rss_before = rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    q, b, d = radius_search(queries, base, radius, method=method)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rss_search = rss_mb()  # before the checks below, whose Python set of pairs is larger than the search's arrays
    found = set(zip(q.tolist(), b.tolist()))
    recall = float(np.mean([(int(x), int(y)) in found for x, y in zip(planted_q, planted_b)]))
    digest = hashlib.sha256(b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes() for a in (q, b, d))).hexdigest()
    plan = choose_plan(len(queries), len(base), radius) if method == "auto" else None
    return {"n": n, "which": which, "method": method, "radius": radius, "queries": len(queries), "base": len(base),
            "wall_s": wall, "cpu_s": cpu, "pairs": len(q), "planted_recall": recall,
            "distances_ok": bool((popcount64(queries[q] ^ base[b]) == d).all() and (d <= radius).all()),
            "sha256": digest, "plan": None if plan is None else {"bits": plan.bits, "radii": plan.radii},
            "rss_before_mb": rss_before, "peak_rss_mb": rss_search}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan_text(plan: dict | None) -> str:
    if plan is None:
        return "flat fallback"
    return "MIH " + "/".join(map(str, plan["bits"])) + " bits, r " + "/".join(map(str, plan["radii"]))


def flat_run(n: int, which: str, last: dict[str, dict], flat_limit: float) -> dict:
    """The flat index's measurement, or its extrapolation (x (N/N')^2) from the last size measured when too slow."""
    prev = last.get(which)
    if prev is not None:
        scale = (n / prev["n"]) ** 2
        if prev["wall_s"] * scale > flat_limit:
            return {"n": n, "wall_s": prev["wall_s"] * scale, "cpu_s": prev["cpu_s"] * scale, "extrapolated": True}
    last[which] = child(["--role", "search", "--n", str(n), "--which", which, "--method", "flat"])
    return last[which]


def report_line(new: dict, old: dict, forced: dict | None) -> str:
    label = "pHash x pHash" if new["which"] == "self" else f"pHash x {SCALES} crops"
    text = (f"N={new['n']:>9,} {label:<17} r={new['radius']}: new {new['wall_s']:7.1f} s (cpu {new['cpu_s']:.1f} s, "
            f"{plan_text(new['plan'])}, peak RSS {new['peak_rss_mb']:.0f} MB, {new['rss_before_mb']:.0f} before)")
    if forced is not None:  # auto chose the flat index here: what MIH would have taken
        text += f" [MIH forced: {forced['wall_s']:.2f} s{'' if forced['sha256'] == new['sha256'] else ', DIFFERENT'}]"
    if old.get("extrapolated"):
        text += f" | flat {old['wall_s']:8.1f} s (cpu {old['cpu_s']:.0f} s) EXTRAPOLATED x(N/N')^2, not run"
        same = "flat not run"
    else:
        text += f" | flat {old['wall_s']:8.1f} s (cpu {old['cpu_s']:.1f} s, peak RSS {old['peak_rss_mb']:.0f} MB)"
        same = "same arrays as flat" if old["sha256"] == new["sha256"] else "DIFFERENT FROM FLAT"
    return (text + f" | flat/new wall {old['wall_s'] / new['wall_s']:.1f}x, cpu {old['cpu_s'] / new['cpu_s']:.1f}x"
            f" | {new['pairs']:,} pairs, planted recall {new['planted_recall']:.3f}, distances "
            f"{'ok' if new['distances_ok'] else 'WRONG'}, {same}")


def compare(sizes: list[int], flat_limit: float, json_path: str | None) -> None:
    """The default `radius_search` (MIH where chosen) against faiss's flat index, per size and search."""
    last: dict[str, dict] = {}
    records = []
    for n in sizes:
        for which in ("self", "crop"):
            new = child(["--role", "search", "--n", str(n), "--which", which, "--method", "auto"])
            old = flat_run(n, which, last, flat_limit)
            forced = None
            if new["plan"] is None:
                forced = child(["--role", "search", "--n", str(n), "--which", which, "--method", "mih"])
            print(report_line(new, old, forced), flush=True)
            records.append({"new": new, "flat": old, "mih_forced": forced})
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(records, fh, indent=1)


def stages(n: int, dim: int) -> dict:
    """The previous benchmark: `phash_pairs` and the embedding stage on synthetic data with planted copies."""
    from curator.stages.duplicates import DuplicateSettings, embedding_pairs, phash_pairs, similarity

    rng = np.random.default_rng(n)
    phash = rng.integers(0, 2**63, size=n, dtype=np.uint64) << np.uint64(1) | rng.integers(0, 2, n, dtype=np.uint64)
    dhash = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    crop = rng.integers(0, 2**63, size=(n, 4), dtype=np.uint64)
    planted = rng.choice(n // 2, size=n // 100, replace=False)
    copies = planted + n // 2
    phash[copies] = phash[planted] ^ flip_masks(rng, rng.integers(0, 5, len(planted)))
    dhash[copies] = dhash[planted] ^ rng.integers(0, 2, len(planted), dtype=np.uint64)
    settings = DuplicateSettings()
    t0 = time.perf_counter()
    pairs = phash_pairs(phash, dhash, crop, settings)
    hash_seconds = time.perf_counter() - t0
    rss_after_hash = rss_mb()
    found = set(zip(pairs["i"].to_list(), pairs["j"].to_list()))
    hash_recall = np.mean([(int(s), int(d)) in found for s, d in zip(planted, copies)])

    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb[copies] = emb[planted] + rng.normal(scale=0.1, size=(len(planted), dim)).astype(np.float32)
    colour = np.zeros((n, 32))
    t0 = time.perf_counter()
    sim = similarity(emb, settings.embed_neighbours)
    verified_phash = phash.copy()
    verified_phash[copies] = phash[planted]  # the embedding stage verifies by pHash: give the copies matching hashes
    emb_pairs = embedding_pairs(sim, verified_phash, crop, colour, settings)
    embed_seconds = time.perf_counter() - t0
    found = set(zip(emb_pairs["i"].to_list(), emb_pairs["j"].to_list()))
    embed_recall = np.mean([(int(s), int(d)) in found for s, d in zip(planted, copies)])
    return {"n": n, "hash_seconds": hash_seconds, "hash_pairs": len(pairs), "hash_recall": float(hash_recall),
            "rss_after_hash_mb": rss_after_hash, "embed_seconds": embed_seconds, "embed_pairs": len(emb_pairs),
            "embed_recall": float(embed_recall), "index": neighbour_search(n),
            "peak_rss_mb": rss_mb()}


def neighbour_search(n: int) -> str:
    """How `similarity` searched n rows: the shared neighbour graph of `curator.core.neighbours` (exact up to its
    `EXACT_LIMIT`, above it PCA-256 + IVF fast-scan product codes with candidates re-scored exactly)."""
    from curator.core.neighbours import EXACT_LIMIT

    return "exact (flat)" if n <= EXACT_LIMIT else "PCA-256 + IVF fast-scan, re-scored exactly"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--flat-limit", type=float, default=1200.0,
                        help="skip (and extrapolate) a flat search expected to take longer, seconds")
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--stages", action="store_true", help="time phash_pairs and the embedding stage instead")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--which", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "search":
        print(json.dumps(search(args.n, args.which, args.method)))
        return
    if args.role == "stages":
        print(json.dumps(stages(args.n, args.dim)))
        return
    sizes = [int(x) for x in args.sizes.split(",")]
    if not args.stages:
        compare(sizes, args.flat_limit, args.json)
        return
    for n in sizes:
        r = child(["--role", "stages", "--n", str(n), "--dim", str(args.dim)])
        print(f"N={n:>9,}: phash stage {r['hash_seconds']:7.1f} s ({r['hash_pairs']} pairs, planted recall "
              f"{r['hash_recall']:.3f}, RSS {r['rss_after_hash_mb']:.0f} MB); embedding stage ({r['index']}, dim "
              f"{args.dim}) {r['embed_seconds']:7.1f} s ({r['embed_pairs']} pairs, planted recall "
              f"{r['embed_recall']:.3f}); peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
