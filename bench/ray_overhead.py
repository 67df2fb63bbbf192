"""Ray's overhead on one machine: `classify dir` with the local engine against `--engine ray`, same tree, one run.

The tree is made by the bench under bench/out/ray_overhead/tree: data/sample's paintings as they are (hard links) and
upscaled to 1,600 px on the long side (JPEG quality 90, like a photographed painting), `--copies` times each. Each
engine classifies it from scratch in a fresh process, alternating (local, ray, local, ray, ...) so that the load of
the machine, shared with other jobs, falls on both alike; the median of `--repeats` runs is kept. Two ratios:
- wall: the whole command, Ray's start-up (a local Ray on every core), model loading and listing included: what a
  user of one machine pays for `--engine ray`;
- pipeline: the engines' own seconds (`PredictResult.seconds`: from the first batch, or the listing, to the last row),
  so Ray Data's per-batch costs (object store, serialisation, scheduling) without its fixed start-up.
With `--embed`, the embedding pass of `curator clean` (`embed_files` against `RayEmbedder`) is timed the same way.
The load average (`uptime`) before and after is printed and saved, since the numbers mean little without it.

    .venv/bin/python bench/ray_overhead.py [--copies 1] [--repeats 2] [--embed]

Writes bench/out/ray_overhead/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "ray_overhead"
SAMPLE = REPO / "data" / "sample"
UPSCALE = 1600

#: One timed run in a fresh interpreter; argv: engine (local|ray), task (classify|embed), tree, scratch folder.
#: Prints one JSON line: files, wall seconds (the whole call), pipeline seconds (the engine's own).
RUN = """
import json, shutil, sys, time
from pathlib import Path
engine, task, tree, scratch = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
shutil.rmtree(scratch, ignore_errors=True)
scratch.mkdir(parents=True)
start = time.perf_counter()
if task == "classify":
    from classify.predict import PredictSettings, classify_dir
    if engine == "ray":
        from classify.ray_engine import classify_dir_ray
        result = classify_dir_ray(tree, scratch / "p.parquet", PredictSettings())
    else:
        result = classify_dir(tree, scratch / "p.parquet", PredictSettings())
    files, pipeline = result.files, result.seconds
else:
    from curator.embedding.backbones import load_backbone
    from curator.embedding.embed import cache_for, embed_files
    from curator.core.images import ReadPolicy, scan
    from curator.core.runtime import select_runtime
    from curator.embedding.ray_embed import RayEmbedder
    backbone = load_backbone("efficientnet_lite0")
    paths = scan(tree)
    embed = RayEmbedder() if engine == "ray" else embed_files
    report = embed(paths, backbone, cache_for(scratch, backbone), select_runtime(), policy=ReadPolicy(tree))
    files, pipeline = len(report.infos), report.seconds
print(json.dumps({"files": files, "wall": time.perf_counter() - start, "pipeline": pipeline}))
"""


def make_tree(dest: Path, copies: int) -> Path:
    """data/sample's paintings `copies` times: hard links, plus upscales to UPSCALE px on the long side."""
    from PIL import Image

    paintings = sorted(SAMPLE.rglob("*.jpg"))
    marker = dest.with_name(f"{dest.name}.made-{copies}-{len(paintings)}")  # beside it: not a row
    if marker.exists():
        return dest
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    for copy in range(copies):
        for p in paintings:
            folder = dest / p.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            os.link(p, folder / f"{copy}_{p.name}")
            with Image.open(p) as im:
                scale = UPSCALE / max(im.size)
                big = im.convert("RGB").resize((round(im.width * scale), round(im.height * scale)),
                                               Image.Resampling.BICUBIC)
            big.save(folder / f"{copy}_{p.stem}_1600.jpg", quality=90)
    marker.touch()
    return dest


def uptime() -> str:
    """The load averages, as `uptime` prints them."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def timed(engine: str, task: str, tree: Path) -> dict:
    """One run of `engine` on `tree` in a fresh interpreter."""
    scratch = OUT / f"scratch-{engine}-{task}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", RUN, engine, task, str(tree), str(scratch)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{engine} {task} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(task: str, tree: Path, repeats: int) -> dict:
    """Alternating runs of both engines; medians and the ratios ray / local."""
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for _ in range(repeats):
        for engine in ("local", "ray"):
            runs[engine].append(timed(engine, task, tree))
            print(f"  {task} {engine}: {runs[engine][-1]}", flush=True)
    median = {engine: {key: statistics.median(r[key] for r in rs) for key in ("wall", "pipeline")}
              for engine, rs in runs.items()}
    files = runs["local"][0]["files"]
    assert all(r["files"] == files for rs in runs.values() for r in rs), "the engines saw different files"
    return {"files": files, "runs": runs, "median": median,
            "ratio_wall": median["ray"]["wall"] / median["local"]["wall"],
            "ratio_pipeline": median["ray"]["pipeline"] / median["local"]["pipeline"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=1, help="copies of the sample (each: as is + 1,600 px)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--embed", action="store_true", help="also time curator clean's embedding pass")
    args = parser.parse_args()
    tree = make_tree(OUT / "tree", args.copies)
    result = {"cores": len(os.sched_getaffinity(0)), "uptime_before": uptime(), "tasks": {}}
    print(f"tree: {tree} ({sum(1 for _ in tree.rglob('*.jpg'))} images); {result['uptime_before']}", flush=True)
    for task in ("classify", *(["embed"] if args.embed else [])):
        result["tasks"][task] = compare(task, tree, args.repeats)
    result["uptime_after"] = uptime()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    for task, r in result["tasks"].items():
        m = r["median"]
        print(f"{task}: {r['files']} files; wall local {m['local']['wall']:.1f} s, ray {m['ray']['wall']:.1f} s "
              f"(ratio {r['ratio_wall']:.2f}); pipeline local {m['local']['pipeline']:.1f} s, ray "
              f"{m['ray']['pipeline']:.1f} s (ratio {r['ratio_pipeline']:.2f})")
    print(f"load: before {result['uptime_before']}; after {result['uptime_after']}")


if __name__ == "__main__":
    main()
