"""A million images on one machine (issue 16): seconds and peak memory of what grows with N.

    .venv/bin/python bench/scale.py listing [--files 1000000] [--done 999000] [--dir DIR]
    .venv/bin/python bench/scale.py tree --dev ../shared/data/wikiart-dev [--files 30000] [--dir DIR] [--keep DIR]
    .venv/bin/python bench/scale.py later [--sizes 10000,100000,1000000] [--dim 2304] [--dir DIR]

- listing (c): a tree of `--files` hard links to one sample JPEG (1,000 per folder) is listed the way
  `classify dir` lists it (`classify.predict.Inputs`, the lazy `curator.core.images.iter_files`), and a `--resume` is
  prepared the way `classify dir` prepares it: parts holding `--done` rows are read (`read_parts`) and the listing
  is filtered against them (`Chunks`) down to the files still to do. No model runs. Each phase runs in a process of
  its own, so its peak RSS is its own.
- later (a): `curator clean`'s later stages (`curator.stages.clean.later_stages`: image quality, the neighbour graph,
  the duplicate cascade, the mislabel stage; everything after the embedding pass but the report) on a synthetic
  workspace of N rows: "real-like" embeddings (`curator.core.neighbours.synthetic_embeddings`, 1% planted
  near-copies) written into the workspace's embedding store (`curator.embedding.embed.EmbeddingCache`, the store
  `curator clean` fills) and a stage-1 manifest whose hashes agree with them (a copy's pHash a few bits from its
  original's), with 2% of the other rows' labels swapped. The stages run in a process of their own: seconds per
  stage, its peak RSS, the planted pairs found in one duplicate cluster (and by the embedding stage alone), and the
  swapped labels flagged.
- tree (b): `curator clean` end to end on the wikiart-dev paintings plus transformed copies (re-encodes, resizes,
  crops; about 8 of every painting, of every kind) up to `--files`, against the paintings alone: seconds per image,
  peak RSS, recall of the planted copies (in their original's cluster), overall and per copy kind, and what each stage
  of the cascade linked on its own. `--keep DIR` leaves the trees and workspaces there.

Results and the machine go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def own_peak_mb() -> float:
    """This process's own peak RSS in MB: VmHWM of /proc/self/status, which starts afresh at exec. ru_maxrss does
    not: a process inherits the peak of the parent that started it (a parent holding 1.9 GB made a child that held
    11 MB report 1.9 GB), so a phase started by a parent that had built a large workspace reported the parent's
    memory. ru_maxrss where /proc is absent."""
    import resource

    peak = _memory_status().get("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> dict[str, float]:
    """This process's resident memory now, in MB, by kind (RssAnon, RssFile, RssShmem; empty where /proc is absent)."""
    return {k: v for k, v in _memory_status().items() if k.startswith("Rss")}


def _memory_status() -> dict[str, float]:
    """The memory lines of /proc/self/status (VmHWM, RssAnon, ...) in MB; empty where it does not exist."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    return {k: int(v) / 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}


def child(phase: str, args: list[str]) -> dict:
    """Run `bench/scale.py _<phase> ARGS` in a fresh process; its JSON result with its own peak RSS (`rss_mb`, from
    the child itself: see `own_peak_mb`) and CPU seconds."""
    proc = subprocess.Popen([sys.executable, __file__, f"_{phase}", *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"phase {phase} failed with status {status}")
    result = json.loads(out.strip().splitlines()[-1])
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
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

    from classify.predict import Inputs, output_schema, parts_folder
    from curator.core.paths import relative_text

    schema = output_schema(False)
    parts = parts_folder(out)
    parts.mkdir(parents=True)
    names = []
    for path in Inputs(root, out, False):
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
    from classify.predict import Inputs

    t0 = time.perf_counter()
    total = sum(1 for _ in Inputs(Path(root), Path(out), False))
    return {"files": total, "seconds": round(time.perf_counter() - t0, 2)}


def phase_resume(root: str, out: str) -> dict:
    from classify.predict import Chunks, Inputs, output_schema, parts_folder, read_parts

    t0 = time.perf_counter()
    _, done, rows = read_parts(parts_folder(Path(out)), output_schema(False))
    t_parts = time.perf_counter() - t0
    inputs = Inputs(Path(root), Path(out), False)
    total = sum(1 for _ in inputs)
    todo = sum(len(batch) for batch in Chunks(inputs, done, 256)())
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
        return {"files": files, "done": done, "make_tree_s": round(made, 1), "base": base, "listing": listing,
                "resume": resume}
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


# ---- (a) the later stages on synthetic rows -----------------------------------------------------------------------

LAYOUT_PART = "pooled"  # one feature part: the embedding is the whole (normalised) vector


def make_synthetic_workspace(n: int, dim: int, workspace: Path, seed: int = 0, swap_share: float = 0.02) -> dict:
    """A workspace as `curator clean`'s embedding pass would leave it for `n` images: the embedding store filled
    with "real-like" vectors (`curator.core.neighbours.synthetic_embeddings`, 1% planted near-copies, written
    through `EmbeddingCache.append` in batches) and a stage-1 manifest (`stage1.parquet`) whose hashes agree (a
    copy's pHash is 0-3 bits from its original's, its dHash 0-4, its crops 0-2, its colour the same; other rows'
    hashes random), with image statistics for the quality checks and `swap_share` of the other rows' labels moved
    to another class. The truth goes to `truth.npz`; returns the counts."""
    import hashlib

    import numpy as np
    import polars as pl

    from curator.core import manifest
    from curator.core.neighbours import synthetic_embeddings
    from curator.embedding.embed import EmbeddingCache

    rng = np.random.default_rng(seed)
    workspace.mkdir(parents=True)
    scratch = np.memmap(workspace / "scratch.f16", dtype=np.float16, mode="w+", shape=(n, dim))
    made = synthetic_embeddings(n, dim, seed=seed, out=scratch)
    cache = EmbeddingCache(workspace / "cache" / "embeddings", "synthetic", dim, {LAYOUT_PART: (0, dim)})
    shas = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in range(n)]
    for start in range(0, n, 8192):
        cache.append(shas[start:start + 8192], np.asarray(scratch[start:start + 8192], dtype=np.float32))
    cache.close()
    del scratch
    (workspace / "scratch.f16").unlink()

    def flips(bits: int, size: int) -> np.ndarray:
        masks = np.zeros(size, dtype=np.uint64)
        for _ in range(bits):
            hit = rng.random(size) < 0.75
            masks |= np.where(hit, np.uint64(1) << rng.integers(0, 64, size).astype(np.uint64), np.uint64(0))
        return masks

    planted = made["planted"]
    original, copy = planted[:, 0], planted[:, 1]
    phash = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    dhash = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2)
    crops = rng.integers(0, 2**63, (n, 4), dtype=np.uint64) * np.uint64(2)
    colour = rng.integers(-60, 60, (n, 32), dtype=np.int8)
    phash[copy] = phash[original] ^ flips(3, len(copy))
    dhash[copy] = dhash[original] ^ flips(4, len(copy))
    crops[copy] = crops[original] ^ flips(2, len(copy))[:, None]
    colour[copy] = colour[original]
    labels = made["labels"].copy()
    classes = int(labels.max()) + 1
    others = np.setdiff1d(np.arange(n), planted.ravel())
    swapped = np.sort(rng.choice(others, int(swap_share * n), replace=False))
    labels[swapped] = (labels[swapped] + rng.integers(1, classes, len(swapped))) % classes
    groups = made["groups"]

    def hexes(values: np.ndarray) -> list[str]:
        return [f"{v:016x}" for v in values.tolist()]

    frame = pl.DataFrame({
        "id": [f"{i:016x}" for i in range(n)],
        "path": [f"c{c:02d}/a{g}_{i}.jpg" for i, (c, g) in enumerate(zip(labels.tolist(), groups.tolist()))],
        "label": [f"c{c:02d}" for c in labels.tolist()], "group": [f"a{g}" for g in groups.tolist()],
        "sha256": shas, "bytes": rng.integers(200_000, 4_000_000, n), "width": np.full(n, 1600, dtype=np.int32),
        "height": rng.integers(1000, 2000, n).astype(np.int32), "format": ["JPEG"] * n, "mode": ["RGB"] * n,
        "status": ["ok"] * n, "reason": [None] * n, "keep": [True] * n,
        "pixel_sha256": [hashlib.sha256(f"px{seed}:{i}".encode()).hexdigest() for i in range(n)],
        "phash": hexes(phash), "dhash": hexes(dhash),
        "crop_phash": [hexes(row) for row in crops], "colour": [row.tobytes().hex() for row in colour],
    }, schema=manifest.schema())
    frame = frame.with_columns(
        pl.lit(False).alias("path_escaped"),
        pl.Series("brightness", rng.normal(0.45, 0.12, n).clip(0, 1), dtype=pl.Float32),
        pl.Series("sharpness", rng.lognormal(5.0, 0.8, n), dtype=pl.Float32),
        pl.Series("entropy", rng.normal(7.2, 0.4, n).clip(0, 8), dtype=pl.Float32),
    )
    manifest.write_atomic(frame, workspace / "stage1.parquet", {"backbone_key": "synthetic",
                                                                 "feature_layout": {LAYOUT_PART: [0, dim]}})
    np.savez(workspace / "truth.npz", planted=planted, swapped=swapped)
    return {"planted": len(planted), "swapped": len(swapped)}


class StageLog:
    """Progress of the later stages on stderr (wall and CPU seconds, peak RSS), so that a long run shows where it
    is: each stage's start, and every tenth of a stage's rows. Called as `events(kind, info)`."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stage, self.total, self.done, self.next = "", 0, 0, 0

    def say(self, text: str) -> None:
        rss, now = own_peak_mb(), resident_mb()
        print(f"[{time.perf_counter() - self.t0:7.0f} s, {time.process_time():7.0f} s CPU, peak {rss:,.0f} MB, now "
              f"{now.get('RssAnon', 0):,.0f} anon + {now.get('RssFile', 0):,.0f} file] {text}",
              file=sys.stderr, flush=True)

    def start(self, stage: str, total: int) -> None:
        self.stage, self.total, self.done, self.next = stage, total, 0, max(1, total // 10)
        self.say(f"start {stage}")

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.done >= self.next:
            self.say(f"{self.stage}: {self.done:,} of {self.total:,}")
            self.next += max(1, self.total // 10)

    def __call__(self, kind: str, info: dict) -> None:
        """The progress protocol's receiver (`curator.core.progress`): stages, advances and notes."""
        if kind == "stage":
            self.start(info["name"], info["total"] or 0)
        elif kind == "advance":
            self.advance(info.get("n", 1))
        elif kind == "note":
            self.say(info["text"])


def phase_later(workspace: str, dim: str) -> dict:
    """`curator.stages.clean.later_stages` on a synthetic workspace (`make_synthetic_workspace`), timed; the
    planted pairs found and the swapped labels flagged."""
    import numpy as np
    import polars as pl

    from curator.core import manifest
    from curator.embedding.embed import EmbeddingCache
    from curator.stages.clean import CleanSettings, later_stages

    ws, width = Path(workspace), int(dim)
    layout = {LAYOUT_PART: (0, width)}
    t0 = time.perf_counter()
    frame = pl.read_parquet(ws / "stage1.parquet")
    cache = EmbeddingCache(ws / "cache" / "embeddings", "synthetic", width, layout, writable=False)
    opened = time.perf_counter() - t0
    t0 = time.perf_counter()
    log = StageLog()
    later = later_stages(frame, cache, layout, CleanSettings(root=ws, workspace=ws), ws / "cache" / "synthetic", log)
    total = time.perf_counter() - t0
    log.say("done")
    frame = manifest.validate(later.frame)
    truth = np.load(ws / "truth.npz")
    a, b = truth["planted"][:, 0], truth["planted"][:, 1]

    def together(column: str) -> float:
        values = np.asarray(frame[column].to_list(), dtype=object)
        return float(np.mean([x is not None and x == y for x, y in zip(values[a], values[b])])) if len(a) else 1.0

    flagged = frame["is_mislabel_issue"].fill_null(False).to_numpy()
    swapped = truth["swapped"]
    hits = float(flagged[swapped].sum())
    return {"rows": len(frame), "open_s": round(opened, 1), "seconds": round(total, 1),
            "timings": {k: round(v, 1) for k, v in later.timings.items()},
            "planted_pair_recall": round(together("cluster"), 4),
            "planted_embedding_recall": round(together("embedding_group"), 4),
            "swap_recall": round(hits / max(len(swapped), 1), 4),
            "swap_precision": round(hits / max(int(flagged.sum()), 1), 4), "flagged": int(flagged.sum())}


def run_later(sizes: list[int], dim: int, base: Path, keep: Path | None = None) -> list[dict]:
    """(a) at each size, in a fresh temporary workspace; with `keep` (one size), in `keep` instead, made there
    if it has no stage-1 manifest yet and kept (so that a rerun measures the stages alone)."""
    import numpy as np

    results = []
    for n in sizes:
        work = keep or Path(tempfile.mkdtemp(prefix=f"scale-later-{n}-", dir=base))
        try:
            t0 = time.perf_counter()
            if keep is not None and (keep / "ws" / "truth.npz").exists():
                with np.load(keep / "ws" / "truth.npz") as saved:
                    truth = {"planted": len(saved["planted"]), "swapped": len(saved["swapped"])}
            else:
                truth = make_synthetic_workspace(n, dim, work / "ws")
            made = round(time.perf_counter() - t0, 1)
            load_before = os.getloadavg()[0]
            result = child("later", [str(work / "ws"), str(dim)])
            results.append({"n": n, "dim": dim, "made_s": made, **truth, **result,
                            "load": [round(load_before, 1), round(os.getloadavg()[0], 1)]})
            print_later(results[-1:])
        finally:
            if keep is None:
                shutil.rmtree(work, ignore_errors=True)
    return results


def print_later(results: list[dict]) -> None:
    for r in results:
        print(f"\n(a) later stages on {r['rows']:,} synthetic rows x {r['dim']:,} ({r['planted']:,} planted copies, "
              f"{r['swapped']:,} swapped labels; workspace made in {r['made_s']} s; load {r['load'][0]} before, "
              f"{r['load'][1]} after)", flush=True)
        print(f"  total {r['seconds']} s ({r['cpu_s']} s of CPU in the process), peak RSS {r['rss_mb']:,} MB; "
              f"seconds per stage: {r['timings']}")
        print(f"  planted pairs in one cluster {r['planted_pair_recall']} (found by the embedding stage "
              f"{r['planted_embedding_recall']}); swapped labels flagged: recall {r['swap_recall']}, precision "
              f"{r['swap_precision']} ({r['flagged']:,} flagged)", flush=True)

# ---- (b) curator clean end to end on a tree of paintings and their copies -------------------------------------------

COPY_KINDS = ("reencode", "resize", "crop")


def make_copy_tree(dev: Path, out: Path, files: int, seed: int = 0,
                   originals: list[Path] | None = None) -> list[tuple[str, str]]:
    """`out` holds the paintings of `dev` (hard links; `originals`, paths under `dev`, when given: a subset) and
    transformed copies of them (`curator.stages.planting.make_copy`: JPEG re-encodes at quality 25-45, 0.5-0.7x
    resizes, 5-10% crops) beside their originals, up to `files` in all. Returns the planted (copy, original) pairs as
    paths relative to `out` (a copy's kind is in its name: `copy_kind`)."""
    import io

    import numpy as np
    from PIL import Image

    from curator.stages.planting import make_copy

    rng = np.random.default_rng(seed)
    originals = sorted(originals if originals is not None else dev.rglob("*.jpg"))
    for path in originals:
        dest = out / path.relative_to(dev)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, dest)
    planted = []
    for n in range(max(0, files - len(originals))):
        path = originals[n % len(originals)]
        rel = path.relative_to(dev)
        data = path.read_bytes()
        # kinds cycle along the originals and shift by one each round, so that every painting gets copies of every
        # kind (cycling on n alone gave all 8 copies of a painting one kind whenever 3 divides the originals' count)
        kind = COPY_KINDS[(n + n // len(originals)) % len(COPY_KINDS)]
        copy, ext = make_copy(Image.open(io.BytesIO(data)).convert("RGB"), data, kind, rng)
        copy_rel = rel.with_name(f"{rel.stem}__copy{n // len(originals)}-{kind}{ext}")
        (out / copy_rel).write_bytes(copy)
        planted.append((copy_rel.as_posix(), rel.as_posix()))
    return planted


def copy_kind(copy: str) -> str:
    """The kind of a planted copy (`make_copy_tree`), from its name."""
    return copy.rsplit("-", 1)[-1].split(".", 1)[0]


def phase_clean(root: str, workspace: str) -> dict:
    from curator.stages.clean import CleanSettings, clean

    t0 = time.perf_counter()
    result = clean(CleanSettings(root=Path(root), workspace=Path(workspace), group_pattern="^([^_]+)_"))
    return {"files": len(result.manifest), "seconds": round(time.perf_counter() - t0, 1),
            "timings": {k: round(v, 1) for k, v in result.timings.items()}}


def planted_recall(workspace: Path, planted: list[tuple[str, str]]) -> dict:
    """Share of planted copies in the same duplicate cluster as their original (`cluster`), overall and per copy kind
    (`copy_kind`), and per stage of the cascade: the share in the same `exact_group`, `phash_group` or
    `embedding_group` as their original (what that stage's pairs alone link)."""
    from curator.core import manifest

    frame = manifest.read(workspace)
    paths = frame["path"].to_list()
    kinds = [copy_kind(copy) for copy, _ in planted]

    def shares(column: str) -> dict[str, float]:
        of = dict(zip(paths, frame[column].to_list()))
        hit = [of[copy] is not None and of[copy] == of[original] for copy, original in planted]
        out = {"all": round(sum(hit) / max(1, len(hit)), 4)}
        for kind in COPY_KINDS:
            mine = [h for h, k in zip(hit, kinds) if k == kind]
            out[kind] = round(sum(mine) / max(1, len(mine)), 4)
        return out

    return {"cluster": shares("cluster"),
            **{stage: shares(f"{stage}_group") for stage in ("exact", "phash", "embedding")}}


def run_tree(dev: Path, files: int, base: Path, keep: Path | None = None) -> dict:
    """(b): the paintings alone and the tree of `files`, each cleaned in a process of its own; the trees and
    workspaces are deleted afterwards unless `keep` names a folder (new or empty) to make them in and leave."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        if any(keep.iterdir()):
            raise SystemExit(f"--keep {keep} is not empty")
    work = keep or Path(tempfile.mkdtemp(prefix="scale-tree-", dir=base))
    try:
        small, large = work / "small", work / "large"
        make_copy_tree(dev, small, 0)
        t0 = time.perf_counter()
        planted = make_copy_tree(dev, large, files)
        made = time.perf_counter() - t0
        (work / "planted.json").write_text(json.dumps(planted))
        runs = {}
        for name, root in (("small", small), ("large", large)):
            runs[name] = child("clean", [str(root), str(work / f"ws-{name}")])
            runs[name]["per_image_ms"] = round(1000 * runs[name]["seconds"] / runs[name]["files"], 2)
        found = planted_recall(work / "ws-large", planted)
        runs["large"]["recall"] = found["cluster"]["all"]
        return {"files": files, "planted": len(planted), "make_tree_s": round(made, 1), **runs,
                "ratio": round(runs["large"]["per_image_ms"] / runs["small"]["per_image_ms"], 3),
                "recall": found, "embedding_threshold": embedding_threshold(work / "ws-large")}
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def embedding_threshold(workspace: Path) -> float | None:
    """The embedding-stage cosine threshold the cascade used on a workspace (1 - 0.5 x the collection's typical
    nearest-neighbour gap), as `curator clean` recorded it in settings.json; None without embeddings."""
    recorded = json.loads((workspace / "settings.json").read_text())["duplicates"]["thresholds"]
    return recorded["embedding_min_cosine"]


def print_tree(r: dict) -> None:
    print(f"\n(b) curator clean end to end: {r['large']['files']:,} files ({r['planted']:,} planted copies) vs "
          f"{r['small']['files']:,}")
    print(f"{'run':<8}{'files':>8}{'seconds':>9}{'ms/image':>10}{'peak RSS MB':>13}  stages (s)")
    for name in ("small", "large"):
        x = r[name]
        print(f"{name:<8}{x['files']:>8,}{x['seconds']:>9}{x['per_image_ms']:>10}{x['rss_mb']:>13}  {x['timings']}")
    print(f"time per image, large / small: {r['ratio']}x; planted-copy recall {r['large']['recall']}; embedding-stage "
          f"threshold {r['embedding_threshold']}")
    print(f"{'recall':<10}" + "".join(f"{k:>10}" for k in ("all", *COPY_KINDS)))
    for stage, shares in r["recall"].items():
        print(f"{stage:<10}" + "".join(f"{shares[k]:>10}" for k in ("all", *COPY_KINDS)))


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
    tree.add_argument("--keep", type=Path, help="make the trees and workspaces in this (new or empty) folder and keep "
                                                "them, to inspect (settings.json, manifest, report)")
    later = sub.add_parser("later")
    later.add_argument("--sizes", default="10000,100000,1000000")
    later.add_argument("--dim", type=int, default=2304)
    later.add_argument("--dir", type=Path, default=REPO.parent)
    later.add_argument("--json", type=Path)
    later.add_argument("--keep", type=Path, help="one size: make the workspace here (or reuse it) and keep it")
    for name in ("_base", "_list", "_resume", "_clean", "_later"):
        sub.add_parser(name).add_argument("args", nargs="*")
    args = parser.parse_args()
    if args.what.startswith("_"):
        fn = {"_base": phase_base, "_list": phase_list, "_resume": phase_resume, "_clean": phase_clean,
              "_later": phase_later}[args.what]
        print(json.dumps({**fn(*args.args), "rss_mb": round(own_peak_mb(), 1)}))
        return
    if args.what == "listing":
        result = run_listing(args.files, args.done, args.dir)
        print_listing(result)
    if args.what == "tree":
        result = run_tree(args.dev, args.files, args.dir, args.keep)
        print_tree(result)
    if args.what == "later":
        result = run_later([int(v) for v in args.sizes.split(",")], args.dim, args.dir, args.keep)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
