"""`classify dir` against a plain reference loop: images/s, top-1 agreement, and peak memory as the folder grows.

Reference: torchvision `ImageFolder` + `DataLoader` (2 workers) + the same timm model in fp32 with timm's eval
transform, every output kept in memory and written once. Ours: `classify.predict.classify_dir` with its defaults.
Each run is a fresh process (so the allocator setting of one cannot help the other), alternating, median of each.

    .venv/bin/python bench/throughput.py [--data ../shared/data/wikiart-dev] [--images 1000] [--repeats 3]
        [--scale 1000,10000,100000]

The scale runs classify hard-linked copies of the same paintings (N files) and report each run's peak RSS (main
process, and the largest decode worker).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("bench/out/throughput")


def make_tree(src: Path, dest: Path, n: int) -> Path:
    """`n` hard links to the paintings under `src`, in class folders (repeating the paintings when n is larger)."""
    if dest.is_dir() and sum(1 for _ in dest.rglob("*.jpg")) == n:
        return dest
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    tmp = dest.with_name(dest.name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp), str(dest)], check=True)
    for i in range(n):
        p = files[i % len(files)]
        target = tmp / p.parent.name / (f"{i // len(files)}_{p.name}" if n > len(files) else p.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(p, target)
    tmp.rename(dest)
    return dest


def run_ours(tree: Path, out: Path) -> dict:
    from classify.predict import PredictSettings, classify_dir

    out.unlink(missing_ok=True)
    t = time.perf_counter()
    result = classify_dir(tree, out, PredictSettings())
    wall = time.perf_counter() - t
    return {"files": result.files, "seconds": wall, "images_per_second": result.files / wall}


def run_reference(tree: Path, out: Path) -> dict:
    import polars as pl
    import timm.data
    import torch
    from torchvision.datasets import ImageFolder

    from curator.embedding.backbones import load_backbone

    t = time.perf_counter()
    backbone = load_backbone()
    model = backbone.model.eval()
    transform = timm.data.create_transform(**backbone.data_config, is_training=False)
    dataset = ImageFolder(str(tree), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=2)
    outputs = []
    with torch.inference_mode():
        for x, _ in loader:
            outputs.append(model(x).softmax(1))
    probs = torch.cat(outputs)
    conf, top = probs.max(1)
    paths = [Path(p).relative_to(tree).as_posix() for p, _ in dataset.samples]
    pl.DataFrame({"path": paths, "top": top.numpy(), "confidence": conf.numpy()}).write_parquet(out)
    wall = time.perf_counter() - t
    return {"files": len(paths), "seconds": wall, "images_per_second": len(paths) / wall}


def child(kind: str, tree: Path, out: Path) -> None:
    result = run_ours(tree, out) if kind == "ours" else run_reference(tree, out)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_child_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def spawn(kind: str, tree: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--tree", str(tree), "--out", str(out)],
                          capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} run failed: {proc.stderr[-2000:]}")


def agreement(ours: Path, ref: Path) -> float:
    import polars as pl
    from timm.data import ImageNetInfo

    names = ImageNetInfo()
    a = pl.read_parquet(ours).select("path", "label")
    b = pl.read_parquet(ref).with_columns(
        pl.col("top").map_elements(names.index_to_description, return_dtype=pl.String).alias("ref_label"))
    joined = a.join(b, on="path")
    return float((joined["label"] == joined["ref_label"]).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wikiart-dev"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", default="")
    parser.add_argument("--child")
    parser.add_argument("--tree", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tree, args.out)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpu": Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0].strip(": "),
                     "cores": os.cpu_count()}
    if args.repeats:
        compare(args, results)
    if args.scale:
        scale(args, results)
    (OUT / "result.json").write_text(json.dumps(results, indent=2))


def compare(args, results: dict) -> None:
    tree = make_tree(args.data, OUT / f"tree-{args.images}", args.images)
    runs = {"ours": [], "reference": []}
    for i in range(args.repeats):
        for kind in ("reference", "ours") if i % 2 else ("ours", "reference"):
            r = spawn(kind, tree, OUT / f"{kind}.parquet")
            runs[kind].append(r)
            print(f"{kind} run {i + 1}: {r['images_per_second']:.1f} images/s, peak RSS {r['peak_rss_mb']:.0f} MB",
                  flush=True)
    med = {k: statistics.median(r["images_per_second"] for r in v) for k, v in runs.items()}
    results["images"] = args.images
    results["median_images_per_second"] = med
    results["speedup"] = med["ours"] / med["reference"]
    results["top1_agreement"] = agreement(OUT / "ours.parquet", OUT / "reference.parquet")
    results["runs"] = runs
    print(f"ours {med['ours']:.1f} vs reference {med['reference']:.1f} images/s: {results['speedup']:.2f}x; "
          f"top-1 agreement {results['top1_agreement']:.4f}", flush=True)


def scale(args, results: dict) -> None:
    results["scale"] = {}
    for n in (int(x) for x in args.scale.split(",")):
        t = make_tree(args.data, OUT / f"scale-{n}", n)
        r = spawn("ours", t, OUT / f"scale-{n}.parquet")
        results["scale"][n] = r
        print(f"scale {n}: {r['images_per_second']:.1f} images/s, peak RSS {r['peak_rss_mb']:.0f} MB main, "
              f"{r['peak_child_rss_mb']:.0f} MB largest worker", flush=True)
        (OUT / f"scale-{n}.parquet").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
