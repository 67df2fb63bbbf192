"""A million images on one machine (issue 16): seconds and peak memory of what grows with N.

    .venv/bin/python bench/scale.py listing [--files 1000000] [--done 999000] [--dir DIR]
    .venv/bin/python bench/scale.py tree --dev ../shared/data/wikiart-dev [--files 30000] [--dir DIR]

- listing (c): a tree of `--files` hard links to one sample JPEG (1,000 per folder) is listed the way
  `classify dir` lists it (`classify.predict._Inputs`, the lazy `curator.core.images.iter_files`), and a `--resume` is
  prepared the way `classify dir` prepares it: parts holding `--done` rows are read (`_read_parts`) and the listing
  is filtered against them (`_Chunks`) down to the files still to do. No model runs. Each phase runs in a process of
  its own, so its peak RSS is its own.
- (a), the later stages at 10k-1M rows, is measured for now by bench/neighbours_scale.py (the neighbour graph and
  the mislabel stage on synthetic "real-like" embeddings) and bench/dedup_scale.py (the pHash search).
- tree (b): `curator clean` end to end on the wikiart-dev paintings plus transformed copies (re-encodes, resizes,
  crops) up to `--files`, against the paintings alone: seconds per image, peak RSS, recall of the planted copies.

Results and the machine go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(phase: str, args: list[str]) -> dict:
    """Run `bench/scale.py _<phase> ARGS` in a fresh process; its JSON result with its own peak RSS (`rss_mb`)."""
    proc = subprocess.Popen([sys.executable, __file__, f"_{phase}", *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"phase {phase} failed with status {status}")
    result = json.loads(out.strip().splitlines()[-1])
    result["rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return result


# ---- (c) listing and resume bookkeeping -------------------------------------------------------------------------

def make_link_tree(root: Path, files: int, per_folder: int = 1000, per_inode: int = 50_000) -> float:
    """`files` hard links to copies of one sample JPEG (`per_inode` links each: ext4 allows 65,000), `per_folder`
    per folder; seconds taken."""
    source = next((REPO / "data" / "sample").rglob("*.jpg"))
    t0 = time.perf_counter()
    for k in range(files):
        if k % per_inode == 0:
            original = root.parent / f"original-{k // per_inode}.jpg"
            shutil.copyfile(source, original)
        folder = root / f"d{k // per_folder:05d}"
        if k % per_folder == 0:
            folder.mkdir(parents=True)
        os.link(original, folder / f"f{k:07d}.jpg")
    return time.perf_counter() - t0


def write_done_parts(root: Path, out: Path, done: int, per_part: int = 50_000) -> None:
    """Parts of an interrupted `classify dir` run holding the first `done` files of the listing (other columns
    null: only `path` and `path_escaped` are read on resume)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from classify.predict import _Inputs, _schema, parts_folder
    from curator.core.paths import relative_text

    schema = _schema(False)
    parts = parts_folder(out)
    parts.mkdir(parents=True)
    names = []
    for path in _Inputs(root, out, False):
        if len(names) == done:
            break
        names.append(relative_text(path, root)[0])
    for start in range(0, done, per_part):
        chunk = names[start:start + per_part]
        columns = {f.name: pa.nulls(len(chunk), f.type) for f in schema}
        columns["path"] = pa.array(chunk, pa.string())
        columns["path_escaped"] = pa.array([False] * len(chunk), pa.bool_())
        pq.write_table(pa.table(columns, schema=schema), parts / f"part-{start // per_part:06d}.parquet")


def phase_base() -> dict:
    """The imports alone (torch, timm, polars through classify.predict): the floor under every phase's RSS."""
    import classify.predict  # noqa: F401

    return {"seconds": 0.0}


def phase_list(root: str, out: str) -> dict:
    from classify.predict import _Inputs

    t0 = time.perf_counter()
    total = sum(1 for _ in _Inputs(Path(root), Path(out), False))
    return {"files": total, "seconds": round(time.perf_counter() - t0, 2)}


def phase_resume(root: str, out: str) -> dict:
    from classify.predict import _Chunks, _Inputs, _read_parts, _schema, parts_folder

    t0 = time.perf_counter()
    _, done, rows = _read_parts(parts_folder(Path(out)), _schema(False))
    t_parts = time.perf_counter() - t0
    inputs = _Inputs(Path(root), Path(out), False)
    total = sum(1 for _ in inputs)
    todo = sum(len(batch) for batch in _Chunks(inputs, frozenset(done), 256)())
    return {"done_rows": rows, "files": total, "todo": todo, "read_parts_s": round(t_parts, 2),
            "seconds": round(time.perf_counter() - t0, 2)}


def run_listing(files: int, done: int, base: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="scale-listing-", dir=base))
    try:
        root, out = work / "tree", work / "preds.parquet"
        made = make_link_tree(root, files)
        write_done_parts(root, out, done)
        base = child("base", [])
        listing = child("list", [str(root), str(out)])
        resume = child("resume", [str(root), str(out)])
        return {"files": files, "done": done, "make_tree_s": round(made, 1), "base": base, "listing": listing, "resume": resume}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_listing(r: dict) -> None:
    print(f"\n(c) classify dir bookkeeping on {r['files']:,} hard links (tree made in {r['make_tree_s']} s)")
    print(f"{'phase':<44}{'seconds':>9}{'peak RSS MB':>13}")
    print(f"{'imports alone (the floor under each phase)':<44}{'':>9}{r['base']['rss_mb']:>13}")
    print(f"{'listing (what classify dir counts first)':<44}{r['listing']['seconds']:>9}{r['listing']['rss_mb']:>13}")
    res = r["resume"]
    print(f"{'resume: read parts of ' + format(res['done_rows'], ',') + ' rows':<44}{res['read_parts_s']:>9}")
    print(f"{'resume: parts + listing + filter to ' + format(res['todo'], ',') + ' to do':<44}"
          f"{res['seconds']:>9}{res['rss_mb']:>13}")


# ---- (b) curator clean end to end on a tree of paintings and their copies -------------------------------------------

COPY_KINDS = ("reencode", "resize", "crop")


def make_copy_tree(dev: Path, out: Path, files: int, seed: int = 0) -> list[tuple[str, str]]:
    """`out` holds every painting of `dev` (hard links) and transformed copies of them
    (`curator.stages.planting.make_copy`: JPEG re-encodes at quality 25-45, 0.5-0.7x resizes, 5-10% crops) beside their
    originals, up to `files` in all. Returns the planted (copy, original) pairs as paths relative to `out`."""
    import io

    import numpy as np
    from PIL import Image

    from curator.stages.planting import make_copy

    rng = np.random.default_rng(seed)
    originals = sorted(p for p in dev.rglob("*.jpg"))
    for path in originals:
        dest = out / path.relative_to(dev)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, dest)
    planted = []
    for n in range(max(0, files - len(originals))):
        path = originals[n % len(originals)]
        rel = path.relative_to(dev)
        data = path.read_bytes()
        kind = COPY_KINDS[n % len(COPY_KINDS)]
        copy, ext = make_copy(Image.open(io.BytesIO(data)).convert("RGB"), data, kind, rng)
        copy_rel = rel.with_name(f"{rel.stem}__copy{n // len(originals)}-{kind}{ext}")
        (out / copy_rel).write_bytes(copy)
        planted.append((copy_rel.as_posix(), rel.as_posix()))
    return planted


def phase_clean(root: str, workspace: str) -> dict:
    from curator.stages.clean import CleanSettings, clean

    t0 = time.perf_counter()
    result = clean(CleanSettings(root=Path(root), workspace=Path(workspace), group_pattern="^([^_]+)_"))
    return {"files": len(result.manifest), "seconds": round(time.perf_counter() - t0, 1),
            "timings": {k: round(v, 1) for k, v in result.timings.items()}}


def planted_recall(workspace: Path, planted: list[tuple[str, str]]) -> float:
    """Share of planted copies in the same duplicate cluster as their original."""
    from curator.core import manifest

    frame = manifest.read(workspace)
    cluster = dict(zip(frame["path"].to_list(), frame["cluster"].to_list()))
    found = sum(1 for copy, original in planted if cluster[copy] is not None and cluster[copy] == cluster[original])
    return found / max(1, len(planted))


def run_tree(dev: Path, files: int, base: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="scale-tree-", dir=base))
    try:
        small, large = work / "small", work / "large"
        make_copy_tree(dev, small, 0)
        t0 = time.perf_counter()
        planted = make_copy_tree(dev, large, files)
        made = time.perf_counter() - t0
        runs = {}
        for name, root in (("small", small), ("large", large)):
            runs[name] = child("clean", [str(root), str(work / f"ws-{name}")])
            runs[name]["per_image_ms"] = round(1000 * runs[name]["seconds"] / runs[name]["files"], 2)
        runs["large"]["recall"] = round(planted_recall(work / "ws-large", planted), 4)
        return {"files": files, "planted": len(planted), "make_tree_s": round(made, 1), **runs,
                "ratio": round(runs["large"]["per_image_ms"] / runs["small"]["per_image_ms"], 3)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_tree(r: dict) -> None:
    print(f"\n(b) curator clean end to end: {r['large']['files']:,} files ({r['planted']:,} planted copies) vs "
          f"{r['small']['files']:,}")
    print(f"{'run':<8}{'files':>8}{'seconds':>9}{'ms/image':>10}{'peak RSS MB':>13}  stages (s)")
    for name in ("small", "large"):
        x = r[name]
        print(f"{name:<8}{x['files']:>8,}{x['seconds']:>9}{x['per_image_ms']:>10}{x['rss_mb']:>13}  {x['timings']}")
    print(f"time per image, large / small: {r['ratio']}x; planted-copy recall {r['large']['recall']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    listing = sub.add_parser("listing")
    listing.add_argument("--files", type=int, default=1_000_000)
    listing.add_argument("--done", type=int, default=999_000)
    listing.add_argument("--dir", type=Path, default=REPO.parent)
    listing.add_argument("--json", type=Path)
    tree = sub.add_parser("tree")
    tree.add_argument("--dev", type=Path, default=REPO.parent / "shared" / "data" / "wikiart-dev")
    tree.add_argument("--files", type=int, default=30_000)
    tree.add_argument("--dir", type=Path, default=REPO.parent)
    tree.add_argument("--json", type=Path)
    for name in ("_base", "_list", "_resume", "_clean"):
        sub.add_parser(name).add_argument("args", nargs="*")
    args = parser.parse_args()
    if args.what.startswith("_"):
        fn = {"_base": phase_base, "_list": phase_list, "_resume": phase_resume, "_clean": phase_clean}[args.what]
        print(json.dumps(fn(*args.args)))
        return
    if args.what == "listing":
        result = run_listing(args.files, args.done, args.dir)
        print_listing(result)
    if args.what == "tree":
        result = run_tree(args.dev, args.files, args.dir)
        print_tree(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
