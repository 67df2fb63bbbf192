"""Embedding throughput: `curator clean`'s embedding pass against a plain loop, same images, same weights.

    .venv/bin/python bench/embed_throughput.py [--data ../shared/data/wikiart-dev] [--repeats 3]

Each contender runs in a fresh subprocess (the allocator setting is per process), alternating, and the median of
each is reported:
- plain: PIL open + timm's eval transform + fp32 lite0, batch 64, glibc's allocator as shipped, one process.
- ours: `curator.stages.clean.clean` with its defaults (allocator fix, dtype by capability check, decode workers),
  on a cold cache; then a rerun on the warm cache. Its "whole process" stops where the plain loop's work stops
  (every image judged, fingerprinted and embedded); the later stages of `clean` (quality, neighbours, duplicates,
  mislabels, report) are timed and printed separately.
It also measures how often bf16 and fp16 autocast change lite0's ImageNet top-1 against fp32 (the dtype rule in
curator/core/runtime.py stands on it: a low-precision default must agree on >= 99%).
Whole-process time includes importing torch and loading the model in both contenders.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_plain(data: Path, batch_size: int = 64) -> dict:
    t0 = time.perf_counter()
    import timm
    import torch
    from PIL import Image

    from curator.embedding.backbones import load_backbone

    backbone = load_backbone()
    model = backbone.model
    transform = timm.data.create_transform(**backbone.data_config, is_training=False)
    paths = sorted(data.rglob("*.jpg"))
    t_start = time.perf_counter()
    outputs = []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]])
            outputs.append(model.forward_head(model.forward_features(batch), pre_logits=True))
    steady = time.perf_counter() - t_start
    return {"images": len(paths), "steady_s": steady, "total_s": time.perf_counter() - t0}


def run_ours(data: Path, workspace: Path) -> dict:
    t0 = time.perf_counter()
    from curator.core.runtime import configure_allocator
    from curator.stages.clean import CleanSettings, clean

    configure_allocator()
    result = clean(CleanSettings(root=data, workspace=workspace))
    whole = time.perf_counter() - t0
    later = sum(result.timings.get(k, 0.0) for k in ("quality", "neighbours", "duplicates", "mislabels", "report"))
    return {"images": result.embed.computed + result.embed.reused, "computed": result.embed.computed,
            "steady_s": result.embed.seconds, "total_s": whole - later, "clean_s": whole, "later_s": later,
            "dtype": result.runtime.dtype, "dtype_reason": result.runtime.reason, "timings": result.timings}


def run_agreement(data: Path, limit: int) -> dict:
    """ImageNet top-1 under bf16 and fp16 autocast against fp32, on every k-th image (`limit` in all)."""
    import numpy as np
    import torch
    from PIL import Image

    from curator.core.runtime import configure_allocator
    from curator.embedding.backbones import load_backbone
    from curator.embedding.preprocess import Preprocess

    configure_allocator()
    backbone = load_backbone()
    pre = Preprocess.from_data_config(backbone.data_config)
    model = backbone.model.to(memory_format=torch.channels_last)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    every = sorted(data.rglob("*.jpg"))
    paths = every[:: max(1, len(every) // limit)][:limit]
    agree = {"bfloat16": 0, "float16": 0}
    for i in range(0, len(paths), 50):
        arrays = [pre.pixels(Image.open(p).convert("RGB")) for p in paths[i:i + 50]]
        x = torch.from_numpy(np.stack(arrays)).float().sub(mean).div(std)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref = model(x).argmax(1)
            for name in agree:
                with torch.autocast("cpu", dtype=getattr(torch, name)):
                    agree[name] += int((model(x).argmax(1) == ref).sum())
    return {"agree": agree, "total": len(paths)}


def subprocess_json(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "wikiart-dev")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agreement-images", type=int, default=1000)
    parser.add_argument("--role", choices=["plain", "ours", "agreement"], help=argparse.SUPPRESS)
    parser.add_argument("--workspace", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.data.resolve()
    if args.role == "plain":
        print(json.dumps(run_plain(data)))
        return
    if args.role == "ours":
        print(json.dumps(run_ours(data, args.workspace)))
        return
    if args.role == "agreement":
        print(json.dumps(run_agreement(data, args.agreement_images)))
        return

    import os

    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); data: {data}")
    plain, ours, warm = [], [], []
    for rep in range(args.repeats):
        p = subprocess_json(["--role", "plain", "--data", str(data)])
        plain.append(p)
        print(f"  rep {rep + 1}: plain {p['images'] / p['total_s']:.1f} img/s whole process "
              f"({p['images'] / p['steady_s']:.1f} steady)", flush=True)
        workspace = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
        try:
            o = subprocess_json(["--role", "ours", "--data", str(data), "--workspace", str(workspace)])
            ours.append(o)
            w = subprocess_json(["--role", "ours", "--data", str(data), "--workspace", str(workspace)])
            warm.append(w)
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        print(f"  rep {rep + 1}: ours  {o['images'] / o['total_s']:.1f} img/s whole process "
              f"({o['images'] / o['steady_s']:.1f} steady, {o['dtype']}); warm rerun {w['total_s']:.1f} s "
              f"({w['computed']} computed)", flush=True)
    agreement = subprocess_json(["--role", "agreement", "--data", str(data),
                                 "--agreement-images", str(args.agreement_images)])

    def med(runs, key="total_s"):
        return statistics.median(r["images"] / r[key] for r in runs)

    print()
    print(f"images: {plain[0]['images']}, repeats: {args.repeats} (median)")
    print(f"plain loop  whole process {med(plain):7.1f} img/s   steady {med(plain, 'steady_s'):7.1f} img/s")
    print(f"ours        whole process {med(ours):7.1f} img/s   steady {med(ours, 'steady_s'):7.1f} img/s   "
          f"dtype {ours[0]['dtype']} ({ours[0]['dtype_reason']})")
    print(f"ratio       whole process {med(ours) / med(plain):7.2f}x        steady "
          f"{med(ours, 'steady_s') / med(plain, 'steady_s'):7.2f}x")
    print(f"ours, later stages of clean (quality, neighbours, duplicates, mislabels, report): "
          f"{statistics.median(o['later_s'] for o in ours):.1f} s; whole `clean` "
          f"{statistics.median(o['clean_s'] for o in ours):.1f} s")
    print(f"warm-cache rerun: {statistics.median(w['clean_s'] for w in warm):.1f} s whole clean, "
          f"{warm[0]['computed']} embeddings computed")
    for name, agree in agreement["agree"].items():
        print(f"top-1 agreement of {name} autocast with fp32: {agree}/{agreement['total']} "
              f"({100 * agree / agreement['total']:.1f}%)")


if __name__ == "__main__":
    main()
