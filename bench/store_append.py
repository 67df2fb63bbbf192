"""Appending embeddings to the cache: the old concatenate-per-batch loop vs `curator.core.store.RecordStore`.

    .venv/bin/python bench/store_append.py [--sizes 10000,20000,40000,100000] [--dim 2304] [--batch 32]
        [--old-limit 900] [--dir DIR]

For each N, N rows of `--dim` float16 (random, with random sha256 keys) are appended in batches of `--batch`, each
way in a fresh process (so that peak RSS is that way's own), into a file under `--dir` (default: a temporary folder
beside the repository, on the same disk as a workspace would be):
- old: an inline copy of the loop `EmbeddingCache.append` ran before the store (write the batch, flush, fsync, then
  `np.concatenate` the whole in-memory matrix and extend a dict index);
- new: `EmbeddingCache.append` on the store (write the batch, extend the index; fsync every 64 MB and on close).
Then the file is reopened and 32 rows are read back (`open+get`), for the new way only.
Reported: seconds, old/new ratio, peak RSS of each process (and, `base`, that of the imports alone, the same for
both). An old run whose time extrapolated quadratically from
the previous size exceeds `--old-limit` seconds is not run; its time is printed as extrapolated (marked `~`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _batches(n: int, dim: int, batch: int):
    """(hex shas, float32 vectors) batches: fresh shas, vectors cycled from 16 random batches made up front (so
    that both ways time appending, not the random number generator)."""
    pool = np.random.default_rng(0).standard_normal((16, batch, dim), dtype=np.float32)
    for b, start in enumerate(range(0, n, batch)):
        k = min(batch, n - start)
        shas = [hashlib.sha256(f"{start + i}".encode()).hexdigest() for i in range(k)]
        yield shas, pool[b % 16, :k]


def run_old(path: Path, n: int, dim: int, batch: int) -> dict:
    """Today's loop before the store, inline: fsync per batch and an O(N) concatenate per batch."""
    record = np.dtype([("sha", "u1", (32,)), ("vec", "<f2", (dim,))])
    index: dict[bytes, int] = {}
    matrix = np.zeros((0, dim), dtype=np.float16)
    t0 = time.perf_counter()
    for shas, vectors in _batches(n, dim, batch):
        records = np.empty(len(shas), dtype=record)
        records["sha"] = np.frombuffer(b"".join(bytes.fromhex(s) for s in shas), dtype=np.uint8).reshape(-1, 32)
        records["vec"] = vectors.astype(np.float16)
        finite = np.isfinite(records["vec"]).all(axis=1)
        records = records[finite]
        with open(path, "ab") as fh:
            fh.write(records.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        start = len(matrix)
        matrix = np.concatenate([matrix, records["vec"]])
        for i, sha in enumerate(records["sha"]):
            index[sha.tobytes()] = start + i
    return {"append_s": time.perf_counter() - t0}


def run_new(path: Path, n: int, dim: int, batch: int) -> dict:
    """`EmbeddingCache.append` on the record store, then a reopen and a 32-row `get`."""
    from curator.embedding.embed import EmbeddingCache

    cache = EmbeddingCache(path.parent, path.stem, dim)
    t0 = time.perf_counter()
    for shas, vectors in _batches(n, dim, batch):
        cache.append(shas, vectors)
    cache.close()
    append_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reopened = EmbeddingCache(path.parent, path.stem, dim)
    wanted = [hashlib.sha256(f"{i}".encode()).hexdigest() for i in range(0, n, max(1, n // 32))]
    reopened.get(wanted)
    return {"append_s": append_s, "open_get_s": time.perf_counter() - t0}


def child(way: str, n: int, dim: int, batch: int, directory: Path) -> None:
    import curator.embedding.embed  # noqa: F401  both ways carry the same imports, so the RSS columns compare appending

    path = directory / f"{way}-{n}.emb"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = (run_old if way == "old" else run_new)(path, n, dim, batch)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["base_rss_mb"] = base
    result["file_mb"] = path.stat().st_size / 2**20
    path.unlink()
    print(json.dumps(result))


def measure(way: str, n: int, dim: int, batch: int, directory: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", way, "--sizes", str(n), "--dim", str(dim),
                          "--batch", str(batch), "--dir", str(directory)],
                         check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,20000,40000,100000")
    parser.add_argument("--dim", type=int, default=2304)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--old-limit", type=float, default=900.0)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        child(args.child, sizes[0], args.dim, args.batch, args.dir)
        return
    directory = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    try:
        print(f"rows of {args.dim} float16 in batches of {args.batch}, files in {directory}")
        print(f"{'N':>8} {'old s':>9} {'new s':>8} {'old/new':>8} {'open+get s':>10} {'old RSS MB':>10} "
              f"{'new RSS MB':>10} {'base MB':>8} {'file MB':>8}")
        previous: tuple[int, float] | None = None
        for n in sizes:
            new = measure("new", n, args.dim, args.batch, directory)
            guess = previous[1] * (n / previous[0]) ** 2 if previous else 0.0
            if guess > args.old_limit:
                old_s, old_rss, mark = guess, float("nan"), "~"
            else:
                old = measure("old", n, args.dim, args.batch, directory)
                old_s, old_rss, mark = old["append_s"], old["peak_rss_mb"], ""
                previous = (n, old_s)
            print(f"{n:>8} {mark + f'{old_s:.2f}':>9} {new['append_s']:>8.2f} {old_s / new['append_s']:>8.1f} "
                  f"{new['open_get_s']:>10.2f} {old_rss:>10.0f} {new['peak_rss_mb']:>10.0f} {new['base_rss_mb']:>8.0f} "
                  f"{new['file_mb']:>8.0f}",
                  flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
