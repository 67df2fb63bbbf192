"""`classify dir` at the hardware's limit: ceilings, ours (defaults and tuned), an older checkout, and timm's script.

Two trees are built by copying paintings (never into the repository; under --work or a temporary folder removed at
the end): the paintings as stored (224 px in wikiart-dev), and the same paintings upscaled to 1,600 px on the longer
side with Pillow's bicubic filter and saved as JPEG quality 90 (the size of real WikiArt downloads). The data is
../shared/data/wikiart-dev; where that is absent (a GPU machine without network) data/sample, the 150 public-domain
paintings in the repository, copied as often as the size asks. Nothing is downloaded: the weights are the offline
EfficientNet-Lite0 (`curator.embedding.backbones`).

On both trees, alternating (the order reversed every other round), each run a fresh process, pages in the OS cache:
- model only: a uint8 batch already on the device, normalised there, forward + softmax + top-5 (fp16 autocast on
  CUDA, fp32 with `configure_allocator()` on CPU), channels_last: the ceiling of the model side;
- decode only: today's CPU loader (`curator.core.images.read_image` with the draft size + `Preprocess.pixels`) in
  --decode-procs processes over the tree: the ceiling of the CPU decode side;
- `classify dir` with its defaults, and tuned (--batch-size/--workers given), as `python -m classify.cli dir`: the
  whole process is timed (import, model load, listing, writing Parquet), and the images/s the command itself reports
  is read from its table;
- with --baseline CHECKOUT, the same two `classify dir` runs from another checkout (PYTHONPATH=CHECKOUT, same
  interpreter), e.g. the committed code before a change;
- the peer, "timm inference.py pipeline (re-implemented: the script is not in the wheel)": timm's `inference.py`
  at its best settings (`-b 256 -j <cores-1> --amp --channels-last --topk 5 --fullname --no-console-results` on
  CUDA) rebuilt step by step from its source, because timm's pip package does not ship the script:
  `timm.data.create_dataset` (the ImageFolder-style reader), `timm.data.create_loader(use_prefetcher=True, ...,
  **data_config)`, the same weights on `tf_efficientnet_lite0`, cudnn.benchmark, fp16 autocast, labels mapped to
  ImageNet descriptions, top-5 written as CSV (with the csv module: the script uses pandas, which is not a
  dependency here). On CPU it runs fp32 (fp16 there is emulated) with the tuned batch size.
- top-1 agreement (the label text) of each `classify dir` output with the peer's, per tree.

    .venv/bin/python bench/gpu_throughput.py                      # CPU: 600 / 150 files, 2 rounds, a few minutes
    .venv/bin/python bench/gpu_throughput.py --baseline /tmp/atelier-head   # + the committed code, "before"
    python3 bench/gpu_throughput.py --json $OUT/gpu.json           # CUDA: 18,000 / 4,500 files
    .venv/bin/python bench/gpu_throughput.py --quick              # smoke run: tiny trees, one round

On an H100 with 16 cores one round of every method at the CUDA sizes was estimated at about 5 minutes (each
process's start is 10-15 s of it); `--repeats 1` or `--skip tuned,baseline-tuned` keeps a run inside a 10-minute
slot.

Prints one table (median images/s of the rounds per method and tree, ratios, agreement) and writes a JSON (every
run, the machine: CPU model, cores, GPU, versions) after each run, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikiart-dev"
SAMPLE = REPO / "data" / "sample"
SOURCE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PEER_NAME = "timm inference.py pipeline (re-implemented: the script is not in the wheel)"
METHODS = ("model", "decode", "defaults", "tuned", "baseline", "baseline-tuned", "peer")
TREE_VERSION = 1


# ---------------------------------------------------------------------------------------------------- the trees

def source_images(data: Path) -> list[Path]:
    """The paintings under `data`, in a stable order."""
    return sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in SOURCE_EXTENSIONS)


def upscale(job: tuple[Path, Path, int, int]) -> None:
    """One painting to `side` px on its longer side (bicubic), saved as JPEG at `quality`."""
    from PIL import Image, ImageOps

    src, dest, side, quality = job
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        scale = side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im.resize(size, Image.Resampling.BICUBIC).save(dest, "JPEG", quality=quality)


def build_tree(files: list[Path], dest: Path, n: int, side: int | None, quality: int, procs: int) -> Path:
    """`n` files in class folders under `dest`: copies of `files` (evenly picked when `n` is smaller, repeated in turn
    when it is larger), as stored (`side` None) or upscaled. Reused when a finished tree with the same recipe is
    there (the recipe is a JSON file beside the tree, not inside it, so that it is no row of anyone's output)."""
    if n < len(files):  # spread over the whole folder, so that every style is in the tree
        files = [files[i * len(files) // n] for i in range(n)]
    recipe = {"version": TREE_VERSION, "sources": [str(f) for f in files], "n": n, "side": side,
              "quality": quality}
    marker = dest.with_name(dest.name + ".json")
    if dest.is_dir() and marker.is_file() and json.loads(marker.read_text()) == recipe:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    for stale in (tmp, dest):
        shutil.rmtree(stale, ignore_errors=True)
    marker.unlink(missing_ok=True)
    targets = []
    for i in range(n):
        src = files[i % len(files)]
        target = tmp / src.parent.name / f"{i:06d}_{src.stem}{'.jpg' if side else src.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        targets.append(target)
    unique = min(n, len(files))
    if side is None:
        for i in range(unique):
            shutil.copyfile(files[i], targets[i])
    else:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            pool.map(upscale, [(files[i], targets[i], side, quality) for i in range(unique)], chunksize=4)
    for i in range(unique, n):
        shutil.copyfile(targets[i % len(files)], targets[i])
    tmp.rename(dest)
    marker.write_text(json.dumps(recipe))
    return dest


def warm_cache(tree: Path) -> int:
    """Read every file once so that every contender finds the pages in the OS cache; returns the bytes read."""
    total = 0
    for p in tree.rglob("*"):
        if p.is_file():
            total += len(p.read_bytes())
    return total


# ------------------------------------------------------------------------------------------ children (fresh processes)

def child_info() -> dict:
    """Versions and the accelerator, from a fresh process (the parent never imports torch)."""
    import numpy
    import PIL
    import timm
    import torch
    import torchvision

    info = {"torch": torch.__version__, "timm": timm.__version__, "torchvision": torchvision.__version__,
            "pillow": PIL.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "torch_threads": torch.get_num_threads()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count(), cuda_runtime=torch.version.cuda)
    return info


def child_model(device: str, batch_size: int, seconds: float) -> dict:
    """Model-only ceiling: a random uint8 batch on `device`, normalised there, forward, softmax, top-5."""
    import torch

    from curator.core.runtime import configure_allocator
    from curator.embedding.backbones import load_backbone

    configure_allocator()
    cuda = device == "cuda"
    torch.backends.cudnn.benchmark = True
    backbone = load_backbone("efficientnet_lite0")
    model = backbone.model.to(device).to(memory_format=torch.channels_last).eval()
    cfg = backbone.data_config
    mean = torch.tensor([255 * m for m in cfg["mean"]], device=device).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in cfg["std"]], device=device).view(1, 3, 1, 1)
    side = int(cfg["input_size"][-1])
    x = torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8, device=device)

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=cuda):
            inp = ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)
            model(inp).float().softmax(1).topk(5, dim=1)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(5 if cuda else 2):
        step()
    sync()
    batches, start = 0, time.perf_counter()
    while True:
        step()
        batches += 1
        if batches % 10 == 0 or not cuda:
            sync()
            if time.perf_counter() - start >= seconds:
                break
    wall = time.perf_counter() - start
    return {"images": batches * batch_size, "seconds": wall, "images_per_second": batches * batch_size / wall,
            "batch_size": batch_size, "dtype": "fp16 autocast" if cuda else "fp32"}


_PREPROCESS = None


def _decode_one(path: str) -> bool:
    """Today's CPU loader on one file: read through the safe loader, preprocess to uint8 CHW."""
    from curator.core.images import read_image

    decoded = read_image(Path(path), _PREPROCESS.draft_size)
    if not decoded.info.ok:
        return False
    _PREPROCESS.pixels(decoded.image)
    return True


def child_decode(tree: Path, procs: int) -> dict:
    """Decode-only ceiling: every file of `tree` through today's loader in `procs` processes (pool warmed first)."""
    import timm

    from curator.embedding.backbones import load_backbone
    from curator.embedding.preprocess import Preprocess

    global _PREPROCESS
    model = load_backbone("efficientnet_lite0").model
    _PREPROCESS = Preprocess.from_data_config(timm.data.resolve_model_data_config(model))
    del model
    files = [str(p) for p in sorted(tree.rglob("*")) if p.is_file()]
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        pool.map(abs, range(procs * 4))  # every process started before the clock does
        start = time.perf_counter()
        ok = sum(pool.imap_unordered(_decode_one, files, chunksize=16))
        wall = time.perf_counter() - start
    return {"images": len(files), "ok": ok, "seconds": wall, "images_per_second": len(files) / wall,
            "processes": procs, "preprocess": _PREPROCESS.key()}


def child_peer(tree: Path, out: Path, device: str, batch_size: int, workers: int) -> dict:
    """timm's inference.py, step by step as in its source (see the module docstring), on `tree` into `out` (CSV)."""
    import logging
    from contextlib import suppress
    from functools import partial

    import numpy as np
    import torch
    from timm.data import (
        DatasetInfoLabelMapper,
        ImageNetInfo,
        create_dataset,
        create_loader,
        infer_imagenet_subset,
        resolve_data_config,
    )
    from timm.utils import setup_default_logging

    from curator.embedding.backbones import load_backbone

    setup_default_logging()
    torch.backends.cudnn.benchmark = True
    cuda = device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device(device)
    amp_autocast = partial(torch.autocast, device_type=dev.type, dtype=torch.float16) if cuda else suppress
    # --model tf_efficientnet_lite0 with the offline weights: load_backbone builds exactly that timm model
    model = load_backbone("efficientnet_lite0").model
    num_classes = model.num_classes
    # inference.py's resolve_data_config(vars(args), model=model); resolve_input_data_config is newer than 1.0.29
    data_config = resolve_data_config({}, model=model, use_test_size=True)
    model = model.to(device=dev).eval().to(memory_format=torch.channels_last)  # --channels-last
    start = time.perf_counter()
    dataset = create_dataset(root=str(tree), name="", split="validation", class_map="")
    loader = create_loader(dataset, batch_size=batch_size, use_prefetcher=True, num_workers=workers, device=dev,
                           img_dtype=torch.float32, **data_config)
    to_label = np.vectorize(DatasetInfoLabelMapper(ImageNetInfo(infer_imagenet_subset({"num_classes": num_classes})),
                                                   label_type="description"), otypes=[object])
    top_k = min(5, num_classes)
    log = logging.getLogger("inference")
    all_indices, all_labels, all_outputs = [], [], []
    end = time.time()
    with torch.inference_mode():
        for batch_idx, (inp, _) in enumerate(loader):
            with amp_autocast():
                output = model(inp)
            output = output.softmax(-1)
            output, indices = output.topk(top_k)
            np_indices = indices.cpu().numpy()
            all_indices.append(np_indices)
            all_labels.append(to_label(np_indices))
            all_outputs.append(output.float().cpu().numpy())
            if batch_idx % 10 == 0:
                log.info("Predict: [%d/%d] Time %.3f", batch_idx, len(loader), time.time() - end)
            end = time.time()
    indices = np.concatenate(all_indices)
    labels = np.concatenate(all_labels)
    outputs = np.concatenate(all_outputs).astype(np.float32)
    filenames = loader.dataset.filenames(basename=False)  # --fullname
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "index", "label", "prob"])
        for name, idx, lab, prob in zip(filenames, indices, labels, outputs):
            writer.writerow([name, " ".join(map(str, idx)), "|".join(lab), " ".join(f"{p:.6f}" for p in prob)])
    wall = time.perf_counter() - start
    return {"images": len(filenames), "seconds": wall, "images_per_second": len(filenames) / wall,
            "batch_size": batch_size, "workers": workers, "amp": cuda, "data_config": {
                k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}}


def run_child(args: argparse.Namespace) -> None:
    """Entry point of a child process: one measurement, printed as one RESULT line."""
    if args.child == "info":
        result = child_info()
    elif args.child == "model":
        result = child_model(args.device, args.batch_size, args.model_seconds)
    elif args.child == "decode":
        result = child_decode(args.tree, args.decode_procs)
    elif args.child == "peer":
        result = child_peer(args.tree, args.out, args.device, args.peer_batch_size, args.workers)
    else:
        raise SystemExit(f"unknown child {args.child!r}")
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------- the parent

def child_env(code_root: Path) -> dict:
    """The environment of a contender: `code_root` first on the import path, a wide console, no buffering."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code_root), *filter(None, [env.get("PYTHONPATH")])])
    env.update(COLUMNS="200", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return env


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def spawn(kind: str, work: Path, extra: list[str]) -> dict:
    """One measurement in a fresh process of this script; whole-process seconds added."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=child_env(REPO), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            result["process_seconds"] = wall
            return result
    return {"error": f"exit {proc.returncode}: {last_line(proc.stderr) or last_line(proc.stdout)}",
            "process_seconds": wall}


def command_table(stdout: str) -> dict[str, str]:
    """The end-of-run table of `classify dir` as {column: value}, found by its 'images/s' header whatever the box
    style (the first data row with as many cells as the header)."""
    rows = [[c.strip() for c in re.split(r"[│┃|]", line)] for line in stdout.splitlines()]
    for i, cells in enumerate(rows):
        if "images/s" in cells:
            for later in rows[i + 1:]:
                if len(later) == len(cells) and any(later):
                    return {k: v for k, v in zip(cells, later) if k}
    return {}


def reported_rate(stdout: str) -> float | None:
    """The images/s that `classify dir` reports in its end-of-run table."""
    try:
        return float(command_table(stdout).get("images/s", "").replace(",", ""))
    except ValueError:
        return None


def run_classify(code_root: Path, tree: Path, out: Path, work: Path, options: list[str]) -> dict:
    """`classify dir TREE --out OUT OPTIONS` from `code_root` in a fresh process: whole-process and reported rates."""
    import pyarrow.parquet as pq

    out.unlink(missing_ok=True)
    shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
    cmd = [sys.executable, "-m", "classify.cli", "dir", str(tree), "--out", str(out), *options]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=child_env(code_root), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"exit {proc.returncode}: {last_line(proc.stderr) or last_line(proc.stdout)}",
                "process_seconds": wall}
    table = pq.read_table(out, columns=["error"])
    files = table.num_rows
    errors = files - table.column("error").null_count
    reported = reported_rate(proc.stdout)
    return {"images": files, "errors": errors, "process_seconds": wall, "images_per_second": files / wall,
            "reported_images_per_second": reported, "options": options, "reported": command_table(proc.stdout),
            "table": proc.stdout.strip().splitlines()[-12:]}


def _relative(name: str, root: str) -> str:
    """A peer's file name as `classify dir` writes paths: relative to the tree, with forward slashes."""
    return (os.path.relpath(name, root) if os.path.isabs(name) else name).replace(os.sep, "/")


def predicted_labels(path: Path) -> dict[str, str | None]:
    """path -> top-1 label of a `classify dir` output, old column names included; read with pyarrow alone, so that
    the benchmark runs where polars is not installed (a GPU machine without network)."""
    import pyarrow.parquet as pq

    from classify.predict import current_names

    table = current_names(pq.read_table(path))
    return dict(zip(table.column("path").to_pylist(), table.column("predicted").to_pylist()))


def agreement(ours: Path, peer: Path, tree: Path) -> dict:
    """Top-1 agreement (label text) of a `classify dir` output with the peer's CSV, over the files both classified."""
    if not (ours.is_file() and peer.is_file()):
        return {}
    mine = {p: lab for p, lab in predicted_labels(ours).items() if lab is not None}
    root = str(tree.resolve())
    with open(peer, newline="") as fh:
        theirs = {_relative(row["filename"], root): row["label"].split("|")[0] for row in csv.DictReader(fh)}
    common = mine.keys() & theirs.keys()
    same = sum(mine[p] == theirs[p] for p in common)
    return {"compared": len(common), "same": same, "agreement": same / len(common) if common else None,
            "only_ours": len(mine.keys() - theirs.keys()), "only_peer": len(theirs.keys() - mine.keys())}


def agreement_between(a: Path, b: Path) -> dict:
    """Top-1 agreement of two `classify dir` outputs (e.g. before and after a change)."""
    if not (a.is_file() and b.is_file()):
        return {}
    y = predicted_labels(b)
    pairs = [(lab, y[p]) for p, lab in predicted_labels(a).items() if lab is not None and y.get(p) is not None]
    same = sum(u == v for u, v in pairs)
    return {"compared": len(pairs), "same": same, "agreement": same / len(pairs) if pairs else None}


def git_commit(root: Path) -> str | None:
    """The commit of a checkout, with '+dirty' when its tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine(info: dict) -> dict:
    """What the numbers were measured on."""
    cpu = None
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else None
    except OSError:
        pass
    mem = None
    try:
        found = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem = round(int(found.group(1)) / 2**20, 1) if found else None
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "usable_cores": usable,
            "memory_gib": mem, "platform": platform.platform(), **info}


class Bench:
    """The runs of one benchmark, their JSON record, and the table."""

    def __init__(self, args: argparse.Namespace, work: Path, device: str, info: dict):
        self.args, self.work, self.device = args, work, device
        self.outputs = work / "outputs"
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.record: dict = {"machine": machine(info), "device": device, "settings": {}, "trees": {}, "runs": {},
                             "code": {"ours": git_commit(REPO)}, "peer": PEER_NAME}
        if args.baseline:
            self.record["code"]["baseline"] = {"path": str(args.baseline), "commit": git_commit(args.baseline)}

    def save(self) -> None:
        self.args.json.parent.mkdir(parents=True, exist_ok=True)
        self.args.json.write_text(json.dumps(self.record, indent=2, default=str))

    def device_options(self) -> list[str]:
        return [] if self.args.device == "auto" else ["--device", self.args.device]

    def tuned_options(self) -> list[str]:
        return ["--batch-size", str(self.args.batch_size), "--workers", str(self.args.workers),
                *self.args.tuned_extra.split(), *self.device_options()]

    def measure(self, method: str, tree_name: str, tree: Path) -> dict:
        """One run of `method` on `tree` (the model ceiling ignores the tree)."""
        a, out = self.args, self.outputs
        if method == "model":
            return spawn("model", self.work, ["--device", self.device, "--batch-size", str(a.batch_size),
                                              "--model-seconds", str(a.model_seconds)])
        if method == "decode":
            return spawn("decode", self.work, ["--tree", str(tree), "--decode-procs", str(a.decode_procs)])
        if method == "peer":
            return spawn("peer", self.work, ["--tree", str(tree), "--out", str(out / f"peer-{tree_name}.csv"),
                                             "--device", self.device, "--peer-batch-size", str(a.peer_batch_size),
                                             "--workers", str(a.workers)])
        root = a.baseline if method.startswith("baseline") else REPO
        options = self.tuned_options() if method.endswith("tuned") else self.device_options()
        return run_classify(root, tree, out / f"{method}-{tree_name}.parquet", self.work, options)

    def run(self, trees: dict[str, Path], methods: list[str]) -> None:
        for r in range(self.args.repeats):
            order = methods if r % 2 == 0 else methods[::-1]
            for tree_name, tree in trees.items():
                for method in order:
                    if method == "model" and tree_name != next(iter(trees)):
                        continue  # the ceiling of the model does not depend on the files
                    load = os.getloadavg()[0]
                    result = self.measure(method, tree_name, tree)
                    result.update(round=r + 1, load_before=load)
                    self.record["runs"].setdefault(method, {}).setdefault(tree_name, []).append(result)
                    self.save()
                    print(f"round {r + 1} {tree_name:>7} {method:>14}: {_progress(method, result)}, "
                          f"load {load:.1f}", flush=True)

    def legend(self) -> dict[str, str]:
        """What each method's row is, with its settings."""
        a = self.args
        amp = " --amp" if self.device == "cuda" else ""
        tuned = " ".join([f"--batch-size {a.batch_size} --workers {a.workers}", *a.tuned_extra.split()])
        return {
            "model": f"a uint8 batch of {a.batch_size} already on {self.device}, normalised there, "
                     f"{'fp16 autocast' if self.device == 'cuda' else 'fp32'}, channels_last, forward + softmax + "
                     f"top-5",
            "decode": f"curator.core.images.read_image (draft) + Preprocess.pixels in {a.decode_procs} processes",
            "defaults": "python -m classify.cli dir DIR --out OUT",
            "tuned": f"python -m classify.cli dir DIR --out OUT {tuned}",
            "baseline": f"the same as defaults with PYTHONPATH={a.baseline}",
            "baseline-tuned": f"the same as tuned with PYTHONPATH={a.baseline}",
            "peer": f"{PEER_NAME}; -b {a.peer_batch_size} -j {a.workers}{amp} --channels-last --topk 5",
        }

    def summarise(self, trees: dict[str, Path], methods: list[str]) -> None:
        """Medians, ratios and agreement into the record, and the table on stdout."""
        names = list(trees)
        short = {"model": "model only (ceiling)", "decode": "decode only, today's loader (ceiling)",
                 "defaults": "classify dir, defaults", "tuned": "classify dir, tuned",
                 "baseline": "before: classify dir, defaults", "baseline-tuned": "before: classify dir, tuned",
                 "peer": "peer: timm inference.py pipeline"}
        classify = [m for m in ("defaults", "tuned", "baseline", "baseline-tuned") if m in methods]
        summary: dict = {}
        for method in methods:
            for t in names:
                runs = self.record["runs"].get(method, {}).get(names[0] if method == "model" else t, [])
                entry = {"images_per_second": _median([r.get("images_per_second") for r in runs])}
                if method in classify:
                    entry["reported_images_per_second"] = _median(
                        [r.get("reported_images_per_second") for r in runs])
                if method == "peer":  # its own rate is the loop's; the whole process is measured from outside
                    entry = {"images_per_second": _median([r["images"] / r["process_seconds"] for r in runs
                                                           if r.get("images")]),
                             "loop_images_per_second": entry["images_per_second"]}
                summary.setdefault(method, {})[t] = entry
        self.record["summary"] = summary
        self.record["legend"] = {m: self.legend()[m] for m in methods}

        def cells(method: str, key: str = "images_per_second") -> list[str]:
            return [_fmt(summary[method][t].get(key)) for t in names]

        rows: list[tuple[str, list[str]]] = []
        for method in methods:
            whole = method not in ("model", "decode")
            rows.append((short[method] + (", whole process" if whole else ""), cells(method)))
            if method in classify:
                rows.append(("    as the command reports it", cells(method, "reported_images_per_second")))
            if method == "peer":
                rows.append(("    loader creation to results written", cells(method, "loop_images_per_second")))
        rows.append(("", ["" for _ in names]))
        if "peer" in methods:
            for method in classify:
                rows.append((f"{short[method]} / peer, whole process",
                             [_ratio(summary, method, "peer", t) for t in names]))
                rows.append(("    reported / peer's loop",
                             [_ratio(summary, method, "peer", t, "reported_images_per_second",
                                     "loop_images_per_second") for t in names]))
        if "defaults" in methods and "baseline" in methods:
            rows.append(("defaults / before, whole process", [_ratio(summary, "defaults", "baseline", t)
                                                              for t in names]))
        if "defaults" in methods and "model" in methods:
            rows.append(("defaults (reported) / model ceiling",
                         [_ratio(summary, "defaults", "model", t, "reported_images_per_second") for t in names]))
        self.record["agreement"] = {}
        pairs = [(m, "peer") for m in classify if "peer" in methods]
        if "defaults" in methods and "baseline" in methods:
            pairs.append(("defaults", "baseline"))
        for a, b in pairs:
            row = []
            for t, tree in trees.items():
                ours = self.outputs / f"{a}-{t}.parquet"
                ag = (agreement(ours, self.outputs / f"peer-{t}.csv", tree) if b == "peer"
                      else agreement_between(ours, self.outputs / f"{b}-{t}.parquet"))
                self.record["agreement"].setdefault(f"{a} vs {b}", {})[t] = ag
                row.append("-" if ag.get("agreement") is None else f"{ag['agreement']:.4f} of {ag['compared']:,}")
            rows.append((f"top-1 agreement, {short[a]} vs {'peer' if b == 'peer' else 'before'}", row))
        self.save()
        headers = [f"{t}, {self.record['trees'][t]['files']:,} files" for t in names]
        title = f"images/s, median of {self.args.repeats} round{'s' * (self.args.repeats != 1)}"
        width = max(len(title), *(len(label) for label, _ in rows))
        col = max(16, *(len(h) for h in headers))
        print()
        print(f"{title:<{width}}  " + "  ".join(f"{h:>{col}}" for h in headers))
        for label, row in rows:
            print(f"{label:<{width}}  " + "  ".join(f"{c:>{col}}" for c in row))
        print()
        for method in methods:
            print(f"{short[method]}: {self.legend()[method]}")
        m = self.record["machine"]
        print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gib')} GiB, "
              f"{m.get('gpu', 'no GPU')}; torch {m['torch']}, timm {m['timm']}; ours {self.record['code']['ours']}"
              + (f", before {self.record['code']['baseline']['commit']}" if self.args.baseline else ""))
        print(f"record: {self.args.json}")


def _progress(method: str, result: dict) -> str:
    """One run's numbers, for the progress line."""
    if "error" in result:
        return f"FAILED ({result['error']})"
    own = result.get("reported_images_per_second") if method not in ("model", "decode") else None
    if method == "peer":
        own = result["images_per_second"]
    whole = result["images"] / result["process_seconds"]
    text = (f"{result['images_per_second']:,.1f} images/s" if method in ("model", "decode")
            else f"{whole:,.1f} images/s whole process")
    bound = result.get("reported", {}).get("bound by")
    return (text + (f", {own:,.1f} by its own clock" if own else "") + (f", bound by {bound}" if bound else "")
            + f", {result['process_seconds']:.1f} s")


def _median(values: list) -> float | None:
    present = [v for v in values if v]
    return statistics.median(present) if present else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:,.1f}")


def _ratio(summary: dict, a: str, b: str, tree: str, key: str = "images_per_second",
           key_b: str = "images_per_second") -> str:
    """`a` over `b` on `tree` as text ('-' when either is missing)."""
    x = summary.get(a, {}).get(tree, {}).get(key)
    y = summary.get(b, {}).get(tree, {}).get(key_b)
    return "-" if not x or not y else f"{x / y:.2f}x"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="classify dir against its ceilings, an older checkout and timm's inference.py pipeline, on "
                    "224-px paintings and on 1,600-px JPEGs. Defaults depend on the device: on CUDA 18,000 / "
                    "4,500 files and batch 256, on CPU 600 / 150 files and batch 32.",
        epilog="Methods (each run a fresh process, alternating): model (ceiling), decode (ceiling), defaults and "
               "tuned (classify dir), baseline and baseline-tuned (classify dir of --baseline), peer (timm's "
               "inference.py pipeline). See the module docstring for what each measures.")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help=f"folder of paintings to copy (default: {DEFAULT_DATA}); when absent, "
                        f"{SAMPLE.relative_to(REPO)} (150 paintings)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the trees and outputs, kept and reused (default: a temporary folder, removed)")
    p.add_argument("--small", type=int, default=None,
                   help="files in the tree of paintings as stored, 224 px (default: 18,000 CUDA, 600 CPU)")
    p.add_argument("--large", type=int, default=None,
                   help="files in the tree of upscaled JPEGs (default: 4,500 CUDA, 150 CPU)")
    p.add_argument("--side", type=int, default=1600, help="longer side of the upscaled JPEGs, px (default: 1600)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the upscaled JPEGs (default: 90)")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds; every method runs once per tree per round (default: 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when torch sees a GPU; passed to classify dir only when not auto")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch of the model ceiling and of the tuned classify dir (default: 256 CUDA, 32 CPU)")
    p.add_argument("--peer-batch-size", type=int, default=None, help="the peer's -b (default: --batch-size)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode workers of the tuned classify dir and the peer's -j (default: cores - 1)")
    p.add_argument("--tuned-extra", default="",
                   help="more options of the tuned `classify dir` run, e.g. --tuned-extra=--no-gpu-decode")
    p.add_argument("--decode-procs", type=int, default=None, help="processes of the decode ceiling (default: cores)")
    p.add_argument("--model-seconds", type=float, default=None, help="timed seconds of the model ceiling "
                   "(default: 10 CUDA, 5 CPU)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another checkout whose classify dir also runs (PYTHONPATH=BASELINE), e.g. one made by "
                        "`git worktree add /tmp/atelier-head HEAD`")
    p.add_argument("--skip", default="",
                   help=f"comma-separated methods not to run, of: {', '.join(METHODS)} (default: none)")
    p.add_argument("--trees", default="224px,1600px", help="which trees, of 224px and 1600px (default: both)")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "gpu_throughput.json",
                   help="where the record goes, rewritten after every run (default: bench/out/gpu_throughput.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: 48 / 12 files, one round, 2 s of model")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_defaults(args: argparse.Namespace, cuda: bool) -> None:
    """Fill the device-dependent defaults."""
    cores = os.cpu_count() or 2
    if args.quick:
        args.small = args.small or 48
        args.large = args.large or 12
        args.repeats = 1
        args.model_seconds = args.model_seconds or 2.0
    args.small = args.small or (18_000 if cuda else 600)
    args.large = args.large or (4_500 if cuda else 150)
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.peer_batch_size = args.peer_batch_size or args.batch_size
    args.workers = args.workers if args.workers is not None else max(1, cores - 1)
    args.decode_procs = args.decode_procs or cores
    args.model_seconds = args.model_seconds or (10.0 if cuda else 5.0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(METHODS)
    if unknown:
        raise SystemExit(f"--skip: unknown method(s) {', '.join(sorted(unknown))}; expected some of "
                         f"{', '.join(METHODS)}")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "classify" / "cli.py").is_file():
            raise SystemExit(f"--baseline {args.baseline}: no classify/cli.py there (not an atelier checkout)")
    else:
        skip |= {"baseline", "baseline-tuned"}
    methods = [m for m in METHODS if m not in skip]
    data = args.data if args.data.is_dir() and source_images(args.data) else SAMPLE
    if data != args.data:
        print(f"{args.data} not found: using {data} (copied as often as the sizes ask)", flush=True)
    files = source_images(data)
    if not files:
        raise SystemExit(f"no paintings under {data}")
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="atelier-gpu-bench-")) if temporary else args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if work == REPO or REPO in work.parents:
        raise SystemExit(f"--work {work}: inside the repository; copies of the data never go there")
    try:
        info = spawn("info", work, [])
        if "error" in info:
            raise SystemExit(f"cannot import torch/timm: {info['error']}")
        cuda = args.device == "cuda" or (args.device == "auto" and info["cuda"])
        if args.device == "cuda" and not info["cuda"]:
            raise SystemExit("--device cuda: torch sees no GPU here")
        resolve_defaults(args, cuda)
        bench = Bench(args, work, "cuda" if cuda else "cpu", info)
        bench.record["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                    if k not in ("child", "tree", "out")}
        bench.record["data"] = str(data)
        wanted = [t.strip() for t in args.trees.split(",") if t.strip()]
        recipes = {"224px": (args.small, None), "1600px": (args.large, args.side)}
        trees: dict[str, Path] = {}
        for name in wanted:
            if name not in recipes:
                raise SystemExit(f"--trees: unknown tree {name!r}; expected 224px and/or 1600px")
            n, side = recipes[name]
            label = name if side is None or side == 1600 else f"{side}px"
            t = time.perf_counter()
            trees[label] = build_tree(files, work / f"tree-{label}-{n}", n, side, args.quality, args.decode_procs)
            size = warm_cache(trees[label])
            bench.record["trees"][label] = {"files": n, "bytes": size, "side": side or "as stored",
                                            "quality": args.quality if side else None, "path": str(trees[label])}
            print(f"tree {label}: {n:,} files, {size / 2**20:,.0f} MiB, ready in {time.perf_counter() - t:.1f} s",
                  flush=True)
        bench.save()
        bench.run(trees, methods)
        bench.summarise(trees, methods)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
