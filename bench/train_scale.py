"""Probe-only `classify train` (the default, `--epochs 0`): seconds, peak RSS and bytes written under the workspace's
`cache/`, first run and rerun, per backbone, with where the time went (`TrainResult.timings`).

    .venv/bin/python bench/train_scale.py [--data data/sample] [--models efficientnet_lite0,efficientnet_lite2]
        [--dir DIR] [--json OUT]

`--data` is cleaned (`curator clean`, lite0, artist groups) and split into a fresh workspace under `--dir` (default:
a temporary folder beside the repository). Then, per backbone, `classify train --epochs 0` runs twice in a fresh
process each (so peak RSS is the run's own):
- lite0 is the backbone `curator clean` used: its embeddings are in the workspace's store already;
- lite2 (`classify train`'s default) is not: the first run computes its embeddings (through the data plane) and
  appends them to the store, the rerun finds them there.
Reported per run: seconds (wall, in the child, imports excluded), peak RSS, bytes added under cache/pixels and
cache/embeddings, and which data path ran (model.json's `data`). `old pixels` is what the path before issue 16
wrote first on every run, probe-only included: one pixel-cache record per image (side `Preprocess.resize`,
side x side x 3 bytes + 36); `bench/train_scale.py --fill` times that fill alone (`classify.data.fill_pixel_cache`).
The machine's load (`/proc/loadavg`) is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATTERN = r"^([^_]+)_"


def tree_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (0 when it does not exist)."""
    if not folder.exists():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def cache_bytes(workspace: Path) -> dict[str, int]:
    return {part: tree_bytes(workspace / "cache" / part) for part in ("pixels", "embeddings")}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def prepare(data: Path, workspace: Path) -> float:
    """`curator clean` + `curator split` of `data` into `workspace`; returns the seconds taken."""
    from curator.stages.clean import CleanSettings, clean
    from curator.stages.splits import SplitSettings, make_splits

    t0 = time.perf_counter()
    clean(CleanSettings(root=data, workspace=workspace, group_pattern=PATTERN, workers=1))
    make_splits(workspace, SplitSettings(group_pattern=PATTERN))
    return time.perf_counter() - t0


def one_run(workspace: Path, model: str, out: Path) -> dict:
    """In the child: one probe-only training run; seconds, val numbers and the data paths model.json names."""
    from classify.train import TrainSettings, train

    t0 = time.perf_counter()
    result = train(workspace / "splits.parquet", out, TrainSettings(model=model, epochs=0))
    seconds = time.perf_counter() - t0
    meta = json.loads((out / "model.json").read_text())
    return {"seconds": round(seconds, 2), "val_accuracy": round(result.val["accuracy"], 4),
            "val_macro_f1": round(result.val["macro_f1"], 4), "data": meta.get("data"),
            "timings": {k: round(v, 2) for k, v in result.timings.items()}}


def in_child(workspace: Path, model: str, out: Path) -> dict:
    """`one_run` in a fresh process, with its peak RSS and the bytes it added under cache/."""
    before = cache_bytes(workspace)
    proc = subprocess.run([sys.executable, __file__, "--child", str(workspace), model, str(out)], cwd=REPO,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"training {model} failed: {proc.stderr.strip().splitlines()[-1:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    after = cache_bytes(workspace)
    row.update({f"{k} bytes added": after[k] - before[k] for k in after})
    return row


def fill_seconds(workspace: Path, model: str, scratch: Path) -> tuple[float, int, int]:
    """What the old path did first on every run: decode every train/val image into a pixel cache (here a scratch
    folder, so the workspace is not touched). Returns (seconds, records, bytes)."""
    from classify.data import PixelCache, file_items, fill_pixel_cache, read_split_table
    from curator.embedding.backbones import load_backbone

    table = read_split_table(workspace / "splits.parquet")
    frame = table.frame.filter(table.frame["split"].is_in(["train", "val"]))
    cache = PixelCache(scratch, load_backbone(model).preprocess)
    t0 = time.perf_counter()
    fill_pixel_cache(cache, file_items(frame), workers=1)
    return time.perf_counter() - t0, len(cache), tree_bytes(scratch)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        row = one_run(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
        row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(row))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "sample")
    parser.add_argument("--models", default="efficientnet_lite0,efficientnet_lite2")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--fill", action="store_true", help="also time the old path's pixel fill alone")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"load before: {loadavg()} ({os.cpu_count()} cores)")
    base = Path(tempfile.mkdtemp(prefix="train-scale-", dir=args.dir or REPO.parent))
    try:
        workspace = base / "ws"
        prep = prepare(args.data, workspace)
        print(f"clean + split of {args.data}: {prep:.1f} s")
        from classify.data import read_split_table
        from curator.embedding.backbones import load_backbone

        table = read_split_table(workspace / "splits.parquet")
        images = len(table.frame)  # the old path decoded every row of the splits file, test included
        rows = []
        for model in args.models.split(","):
            side = load_backbone(model).preprocess.resize
            old_pixels = images * (side * side * 3 + 36)
            for attempt in ("first", "rerun"):
                row = {"model": model, "run": attempt, "images": images, "old pixels bytes": old_pixels,
                       **in_child(workspace, model, base / f"run-{model}-{attempt}")}
                rows.append(row)
            if args.fill:
                seconds, records, written = fill_seconds(workspace, model, base / f"fill-{model}")
                rows.append({"model": model, "run": "old fill alone", "images": records, "seconds": round(seconds, 2),
                             "pixels bytes added": written})
        columns = ["model", "run", "images", "seconds", "peak_rss_mb", "pixels bytes added", "embeddings bytes added",
                   "old pixels bytes", "val_accuracy"]
        print("| " + " | ".join(columns) + " | where the time went (s) | data paths |")
        print("|" + "---|" * (len(columns) + 2))
        for row in rows:
            timings = ", ".join(f"{k} {v}" for k, v in (row.get("timings") or {}).items() if k != "total")
            data = ", ".join(f"{k}: {v}" for k, v in (row.get("data") or {}).items())
            print("| " + " | ".join(str(row.get(c, "")) for c in columns) + f" | {timings} | {data} |")
        print(f"load after: {loadavg()}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
