"""Allocator and dtype effects on batched CPU inference: lite0 model only, random input, one subprocess per setting.

    .venv/bin/python bench/allocator.py [--seconds 10] [--batch-sizes 32,64]

Settings: glibc as shipped; glibc after `curator.core.runtime.configure_allocator()` (what our commands do); jemalloc
preloaded (only if /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 exists); and bf16 autocast after the allocator fix.
Reports images/s and the share of CPU time spent in the kernel (page faults show up there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


def measure(setting: str, batch_size: int, seconds: float) -> dict:
    if setting in ("fixed", "fixed+bf16"):
        from curator.core.runtime import configure_allocator

        configure_allocator()
    import torch

    from curator.embedding.backbones import load_backbone

    model = load_backbone().model.to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting.endswith("bf16")):
        for _ in range(2):
            model(x)
        before = os.times()
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += batch_size
        elapsed = time.perf_counter() - t0
        after = os.times()
    user, system = after.user - before.user, after.system - before.system
    return {"images_per_s": n / elapsed, "kernel_share": system / max(user + system, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-sizes", default="32,64")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        print(json.dumps(measure(args.role, args.batch_size, args.seconds)))
        return
    settings = ["glibc", "fixed", "fixed+bf16"] + (["jemalloc"] if JEMALLOC.exists() else [])
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        results = {}
        for setting in settings:
            env = dict(os.environ)
            if setting == "jemalloc":
                env["LD_PRELOAD"] = str(JEMALLOC)
            out = subprocess.run([sys.executable, __file__, "--role", setting, "--batch-size", str(batch_size),
                                  "--seconds", str(args.seconds)], check=True, capture_output=True, text=True,
                                 env=env)
            results[setting] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results["glibc"]["images_per_s"]
        for setting, r in results.items():
            print(f"batch {batch_size:3d}  {setting:11s} {r['images_per_s']:7.1f} img/s  "
                  f"kernel {100 * r['kernel_share']:4.0f}% of CPU  {r['images_per_s'] / base:5.2f}x glibc")


if __name__ == "__main__":
    main()
