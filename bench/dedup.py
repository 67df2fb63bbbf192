"""Duplicate detection on real paintings with planted copies: ours against imagededup (PHash and CNN), one run.

    .venv/bin/pip install imagededup        # bench-only peer
    .venv/bin/python bench/dedup.py [--data ../shared/data/wikiart-dev] [--copies 300]

Plants `--copies` copies (byte copy, JPEG re-encode at quality 25-45, 50-70% resize as JPEG or PNG, 5-10% per side
centre crop, 10-15% brightness/saturation jitter; equal numbers of each) of randomly chosen paintings into a copy of
the data, then runs, each in its own subprocess on the same tree:
- ours: `curator clean` with its defaults (embeddings computed from scratch: a fresh workspace);
- imagededup PHash, max_distance_threshold 10 (its documented default);
- imagededup CNN with the same lite0 weights and preprocessing (its own MobileNetV3 weights need a download),
  min_similarity_threshold 0.85 and 0.90.

Reports per method: recall (planted copies clustered with their original, per kind), pairs reported, pairs that
touch a planted copy and are wrong, pairs among the original paintings (real duplicates or false merges: written
to a contact sheet for a person to judge), seconds. Pairs are made into clusters by union-find for every method.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "dedup"


def run_ours(root: Path, workspace: Path) -> dict:
    t0 = time.perf_counter()
    from curator.core.runtime import configure_allocator
    from curator.stages.clean import CleanSettings, clean

    configure_allocator()
    shutil.rmtree(workspace, ignore_errors=True)
    result = clean(CleanSettings(root=root, workspace=workspace))
    df = result.manifest
    paths = df["path"].to_list()
    pairs = [[paths[i], paths[j], stage] for i, j, stage in result.pairs.select("i", "j", "stage").iter_rows()]
    kept = dict(zip(paths, df["keep"].to_list()))
    return {"seconds": time.perf_counter() - t0, "pairs": pairs, "kept": kept, "timings": result.timings}


def run_imagededup(root: Path, method: str, threshold: float) -> dict:
    t0 = time.perf_counter()
    if method == "phash":
        from imagededup.methods import PHash

        found = PHash(verbose=False).find_duplicates(image_dir=root, max_distance_threshold=int(threshold),
                                                     recursive=True)
    else:
        import timm
        import torch
        from imagededup.methods import CNN
        from imagededup.utils import CustomModel

        from curator.embedding.backbones import load_backbone

        backbone = load_backbone()

        class Pooled(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, x):
                return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

        transform = timm.data.create_transform(**backbone.data_config, is_training=False)
        cnn = CNN(verbose=False, model_config=CustomModel(name="efficientnet_lite0", model=Pooled(backbone.model),
                                                          transform=transform))
        found = cnn.find_duplicates(image_dir=root, min_similarity_threshold=threshold, recursive=True)
    pairs = sorted({tuple(sorted((a, b if isinstance(b, str) else b[0]))) for a, dups in found.items()
                    for b in dups})
    return {"seconds": time.perf_counter() - t0, "pairs": [[a, b, method] for a, b in pairs], "kept": None}


def clusters_of(pairs: list, nodes: list[str]) -> dict[str, int]:
    index = {p: i for i, p in enumerate(nodes)}
    parent = list(range(len(nodes)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, *_ in pairs:
        ra, rb = find(index[a]), find(index[b])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {p: find(i) for p, i in index.items()}


def evaluate(name: str, result: dict, truth, nodes: list[str]) -> dict:
    copy_of = dict(zip(truth["copy"], truth["original"]))
    kind_of = dict(zip(truth["copy"], truth["kind"]))
    cluster = clusters_of(result["pairs"], nodes)
    per_kind: dict[str, list[int]] = {}
    one_kept = 0
    for copy, original in copy_of.items():
        hit = cluster[copy] == cluster[original]
        per_kind.setdefault(kind_of[copy], []).append(int(hit))
        if hit and result["kept"] is not None:
            members = [p for p in nodes if cluster[p] == cluster[copy]]
            one_kept += int(sum(result["kept"][p] for p in members) == 1)
    wrong_planted, among_originals = [], []
    for a, b, stage in result["pairs"]:
        if a in copy_of or b in copy_of:
            ga = copy_of.get(a, a)
            gb = copy_of.get(b, b)
            if ga != gb and cluster[ga] != cluster[gb]:
                wrong_planted.append((a, b, stage))
        else:
            among_originals.append((a, b, stage))
    recall = sum(sum(v) for v in per_kind.values()) / len(copy_of)
    return {
        "method": name, "seconds": result["seconds"], "recall": recall,
        "recall_per_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
        "one_kept": one_kept if result["kept"] is not None else None,
        "pairs": len(result["pairs"]), "wrong_planted_pairs": wrong_planted, "original_pairs": among_originals,
    }


def contact_sheet(pairs: list, root: Path, path: Path, limit: int = 60) -> None:
    """Side-by-side thumbnails of pairs, one pair a row, for a person to judge."""
    from PIL import Image, ImageDraw

    pairs = pairs[:limit]
    if not pairs:
        return
    cell = 128
    sheet = Image.new("RGB", (2 * cell + 260, cell * len(pairs)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (a, b, stage) in enumerate(pairs):
        for col, p in enumerate((a, b)):
            im = Image.open(root / p).convert("RGB")
            im.thumbnail((cell, cell))
            sheet.paste(im, (col * cell, row * cell))
        draw.text((2 * cell + 4, row * cell + 4), f"{row}: {stage}\n{a[:36]}\n{b[:36]}", fill="black")
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "wikiart-dev")
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--threshold", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = OUT / "raw"
    if args.role:
        if args.role == "ours":
            result = run_ours(root, OUT / "ws")
        else:
            result = run_imagededup(root, args.role, args.threshold)
        args.result.write_text(json.dumps(result))
        return

    from curator.stages.planting import KINDS, plant_tree

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    sources = sorted(p for p in args.data.rglob("*.jpg"))
    rng = np.random.default_rng(args.seed)
    originals = [sources[i] for i in rng.choice(len(sources), size=args.copies, replace=False)]
    truth = plant_tree(args.data, root, originals, KINDS, seed=args.seed)
    truth.write_csv(OUT / "truth.csv")
    nodes = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    print(f"tree: {len(nodes)} images ({len(sources)} paintings + {len(truth)} planted copies)", flush=True)
    runs = [("ours", "ours", None), ("imagededup PHash d<=10", "phash", 10),
            ("imagededup CNN lite0 >=0.85", "cnn", 0.85), ("imagededup CNN lite0 >=0.90", "cnn", 0.90)]
    reports = []
    for name, role, threshold in runs:
        result_path = OUT / f"result-{role}-{threshold}.json"
        cmd = [sys.executable, __file__, "--role", role, "--data", str(args.data), "--result", str(result_path)]
        if threshold is not None:
            cmd += ["--threshold", str(threshold)]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{name}: failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
            continue
        result = json.loads(result_path.read_text())
        report = evaluate(name, result, truth, nodes)
        reports.append(report)
        sheet = OUT / f"original-pairs-{role}-{threshold}.png"
        contact_sheet(report["original_pairs"], root, sheet)
        kinds = " ".join(f"{k} {v:.2f}" for k, v in report["recall_per_kind"].items())
        kept = f", exactly one kept in {report['one_kept']}/{len(truth)}" if report["one_kept"] is not None else ""
        print(f"{name:28s} recall {report['recall']:.3f} ({kinds}){kept}; pairs {report['pairs']}, "
              f"wrong pairs on planted copies {len(report['wrong_planted_pairs'])}, pairs among originals "
              f"{len(report['original_pairs'])} (sheet {sheet.name}); {report['seconds']:.1f} s", flush=True)
    (OUT / "report.json").write_text(json.dumps(reports, indent=1))
    ours = next((r for r in reports if r["method"] == "ours"), None)
    if ours:
        for a, b, stage in ours["wrong_planted_pairs"][:20]:
            print(f"  wrong: {a} ~ {b} ({stage})")


if __name__ == "__main__":
    main()
