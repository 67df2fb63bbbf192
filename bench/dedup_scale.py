"""How stages 2 and 3 of the duplicate cascade grow with N: synthetic hashes and embeddings with planted pairs.

    .venv/bin/python bench/dedup_scale.py [--sizes 100000,1000000] [--dim 256]

For each N, in a fresh process: N random 64-bit pHashes/dHashes with 4 crop hashes each, 1% of them planted as
near copies (pHash flipped in 0-4 bits, dHash in 0-3); and N random unit embeddings of `--dim` dimensions (the real
lite0 embedding is 2,304 wide: at 1M images that is 9 GB in float32, more than this machine can hold twice) with the
same rows planted at cosine ~0.99. Reports seconds and peak RSS of `phash_pairs` and of `similarity` +
`embedding_pairs`, and whether every planted pair was found.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def run(n: int, dim: int) -> dict:
    from curator.duplicates import DuplicateSettings, embedding_pairs, phash_pairs, similarity

    rng = np.random.default_rng(n)
    phash = rng.integers(0, 2**63, size=n, dtype=np.uint64) << np.uint64(1) | rng.integers(0, 2, n, dtype=np.uint64)
    dhash = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    crop = rng.integers(0, 2**63, size=(n, 4), dtype=np.uint64)
    planted = rng.choice(n // 2, size=n // 100, replace=False)
    copies = planted + n // 2
    for src, dst in zip(planted, copies):
        flip = np.uint64(0)
        for bit in rng.choice(64, size=int(rng.integers(0, 5)), replace=False):
            flip |= np.uint64(1) << np.uint64(bit)
        phash[dst] = phash[src] ^ flip
        dhash[dst] = dhash[src] ^ (np.uint64(1) if rng.random() < 0.5 else np.uint64(0))
    settings = DuplicateSettings()
    t0 = time.perf_counter()
    pairs = phash_pairs(phash, dhash, crop, settings)
    hash_seconds = time.perf_counter() - t0
    rss_after_hash = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
            "embed_recall": float(embed_recall), "index": "IndexFlatIP" if n <= 200_000 else "HNSW",
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--role", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        print(json.dumps(run(args.role, args.dim)))
        return
    for n in [int(x) for x in args.sizes.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--role", str(n), "--dim", str(args.dim)], check=True,
                             capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"N={n:>9,}: phash stage {r['hash_seconds']:7.1f} s ({r['hash_pairs']} pairs, planted recall "
              f"{r['hash_recall']:.3f}, RSS {r['rss_after_hash_mb']:.0f} MB); embedding stage ({r['index']}, dim "
              f"{args.dim}) {r['embed_seconds']:7.1f} s ({r['embed_pairs']} pairs, planted recall "
              f"{r['embed_recall']:.3f}); peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
