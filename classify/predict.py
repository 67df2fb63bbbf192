"""`classify dir`: classify every file under a folder into one Parquet file, streaming, resumable, fast.

Files are listed lazily (`curator.images.iter_files`) and decoded in worker processes with the same safe loader as
`curator clean`; the model runs batched in the main process. Rows are flushed every `flush_every` files as numbered
part files (each written atomically) in `OUT.parts/`, so a run killed at any moment, SIGKILL included, keeps every
flushed row readable. `resume` skips the files already in the parts and continues; at the end the parts are joined
into OUT (atomically) and removed. Flushes fall on batch boundaries and a resumed run starts on one, so its batches,
and therefore its numbers, are the same as an uninterrupted run's.

`OUT.parts/` is atelier's own folder (an `.atelier` marker, see `curator.ownership`) and records the run's
fingerprint (folder, model, options that change rows); `resume` refuses parts of another run, and the clean-up
removes only the files atelier wrote there. OUT, its parts and their temporary files are never rows themselves, even
when OUT lies inside the folder. Every file is read through `curator.images.read_source` (regular files only, at most
`max_bytes`, symbolic links leaving the folder not followed), so FIFOs, devices and outside links become rows.

One row per file: path (relative to the folder, escaped when the name is not UTF-8, see `curator.paths`),
path_escaped, label, confidence, topk_labels, topk_scores, error, model, and with `embeddings` the feature vector
(pooled + style statistics). An unreadable file is a row with an `error`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from curator.atomic import atomic_path
from curator.backbones import DEFAULT_BACKBONE, load_backbone
from curator.embed import default_workers, forward_features, pixel_scale, preprocess_for
from curator.errors import UsageError
from curator.images import DEFAULT_MAX_BYTES, ReadPolicy, iter_files, read_image
from curator.ownership import MARKER, claim, marker_kind
from curator.paths import display, relative_text
from curator.runtime import Runtime, configure_allocator, select_runtime

Event = Callable[[str, dict], None]
PARTS_SUFFIX = ".parts"
FINGERPRINT = "fingerprint.json"  # in OUT.parts: what made the parts, so that --resume never mixes two runs


@dataclass(frozen=True)
class PredictSettings:
    model: str | None = None  # a `classify train` run folder; None: the backbone's ImageNet-1k classes
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    top_k: int = 5
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    embeddings: bool = False
    resume: bool = False
    compile: bool = False
    flush_every: int = 2048
    max_bytes: int = DEFAULT_MAX_BYTES
    follow_symlinks: bool = False

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.batch_size < 1:
            raise UsageError(f"--top-k and --batch-size must be at least 1, got {self.top_k} and {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be 0 (decode in this process) or more, got {self.workers}")
        ReadPolicy(max_bytes=self.max_bytes)  # raises the one-line error for --max-bytes below 1
        if self.flush_every % self.batch_size:
            raise UsageError(f"flush_every ({self.flush_every}) must be a multiple of the batch size "
                             f"({self.batch_size})")


@dataclass
class PredictResult:
    out: Path
    files: int
    errors: int
    predicted: int
    resumed_rows: int
    seconds: float
    runtime: Runtime
    model: str

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0


class Predictor:
    """A model with its preprocessing and class names: pixels in, probabilities (and features) out."""

    def __init__(self, settings: PredictSettings):
        from classify import checkpoint

        if settings.model:
            loaded = checkpoint.load(Path(settings.model))
            self.module = loaded.classifier
            self.backbone = loaded.classifier.backbone
            self.classes = [display(str(c)) for c in loaded.classes]  # Parquet takes no lone surrogates
            pre = loaded.meta["preprocessing"]
            self.square_side, self.crop = int(pre["resize_side"]), int(pre["crop"])
            self.tta = bool(pre.get("tta"))
            self.threshold = loaded.meta.get("threshold")
            self.name = (f"{display(Path(settings.model).name)} ({loaded.meta['backbone']['name']}, "
                         f"{len(self.classes)} classes)")
            self.pil_steps = None
        else:
            from timm.data import ImageNetInfo

            self.backbone = load_backbone(settings.backbone, Path(settings.weights) if settings.weights else None)
            self.module = self.backbone.model
            info = ImageNetInfo()
            n = int(getattr(self.module, "num_classes", 0) or 0)
            if n != info.num_classes():
                raise UsageError(f"backbone {settings.backbone!r} has {n} outputs, not ImageNet-1k's 1000: pass "
                                 f"--model RUN for a trained classifier")
            self.classes = [info.index_to_description(i) for i in range(n)]
            self.pil_steps = preprocess_for(self.backbone.data_config).pil_steps
            self.square_side = self.crop = None
            self.tta = False
            self.threshold = None
            self.name = f"{settings.backbone} ImageNet-1k ({self.backbone.weights_origin})"
        cfg = self.backbone.data_config
        self.mean, self.std = pixel_scale(cfg["mean"], cfg["std"])
        # the `embedding` column is pooled + style statistics, as `curator` caches it, whatever else the head reads
        self.embedding_width = max(end for part, (_, end) in self.backbone.feature_layout.items() if part != "gram")
        self.draft = (self.square_side or max(cfg["input_size"][1:]),) * 2

    def to(self, device: torch.device) -> Predictor:
        self.module.to(device)
        self.backbone.model.to(memory_format=torch.channels_last)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def prepare(self, image) -> np.ndarray:
        """PIL image to uint8 CHW, in a worker process: the model's eval transform."""
        if self.pil_steps is not None:
            arr = np.asarray(self.pil_steps(image), dtype=np.uint8)
        else:
            from classify.data import square_from_image

            square = square_from_image(image, self.square_side)
            off = (self.square_side - self.crop) // 2
            arr = square[off:off + self.crop, off:off + self.crop]
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, pixels: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and features for a uint8 batch."""
        device = torch.device(runtime.device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=runtime.torch_dtype,
                                                    enabled=runtime.autocast):
            if self.pil_steps is None:
                feats = self.module.features(pixels)
                probs = torch.softmax(self.module.head(feats).float(), 1)
                if self.tta:
                    probs = (probs + torch.softmax(self.module(pixels.flip(3)).float(), 1)) / 2
            else:
                x = ((pixels.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
                feats = forward_features(self.backbone, x)
                pooled = feats[:, : self.backbone.feature_layout["pooled"][1]]
                probs = torch.softmax(self.module.get_classifier()(pooled.to(x.dtype)).float(), 1)
        return probs, feats[:, :self.embedding_width].float()


def parts_folder(out: Path) -> Path:
    """The folder of `out`'s flushed parts: `OUT.parts` beside it."""
    return out.with_name(out.name + PARTS_SUFFIX)


def _show(path: Path | str) -> str:
    """A path for a message: escaped when a name in it is not UTF-8 (a console cannot print it as it is)."""
    return display(str(path))


@dataclass(frozen=True)
class _Inputs:
    """The files to classify: every entry under `root` but OUT, OUT.parts and their temporary files, so that an OUT
    inside the folder never becomes rows of its own (and nothing else is skipped)."""

    root: Path
    out: Path
    follow_symlinks: bool

    def __iter__(self) -> Iterator[Path]:
        out_dir, name = os.path.realpath(self.out.parent), self.out.name
        for path in iter_files(self.root, [parts_folder(self.out)], self.follow_symlinks):
            ours = path.name == name or path.name.startswith(f".{name}.") and path.name.endswith(".tmp")
            if not (ours and os.path.realpath(path.parent) == out_dir):
                yield path


class _Batches(torch.utils.data.IterableDataset):
    """Batches of ((path text, escaped), error, uint8 CHW or None) over the files not done yet; worker k of W decodes
    batches k, k+W, ..., which the DataLoader hands back in order."""

    def __init__(self, inputs: _Inputs, done: set[tuple[str, bool]], batch_size: int, predictor: Predictor,
                 policy: ReadPolicy):
        self.inputs = inputs
        self.done = done
        self.batch_size = batch_size
        self.predictor = predictor
        self.policy = policy

    def _paths(self) -> Iterator[list[Path]]:
        batch: list[Path] = []
        for path in self.inputs:
            if relative_text(path, self.inputs.root) in self.done:
                continue
            batch.append(path)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i, paths in enumerate(self._paths()):
            if i % workers == worker:
                yield [self._decode(p) for p in paths]

    def _decode(self, path: Path) -> tuple[tuple[str, bool], str | None, np.ndarray | None]:
        """Read through the policy (regular files, size cap, no outside links) and preprocess, or say why not."""
        rel = relative_text(path, self.inputs.root)
        decoded = read_image(path, self.predictor.draft, self.policy)
        if not decoded.info.ok:
            return rel, decoded.info.reason or decoded.info.status, None
        try:
            return rel, None, self.predictor.prepare(decoded.image)
        except (OSError, ValueError) as exc:
            return rel, f"cannot preprocess: {exc}", None


def _schema(embeddings: bool) -> pa.Schema:
    fields = [("path", pa.string()), ("path_escaped", pa.bool_()), ("label", pa.string()),
              ("confidence", pa.float32()), ("topk_labels", pa.list_(pa.string())),
              ("topk_scores", pa.list_(pa.float32())), ("error", pa.string()), ("model", pa.string())]
    if embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


def _sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def fingerprint(root: Path, settings: PredictSettings) -> dict:
    """What decides a run's rows: the folder, the model (a run folder and the hashes of its files, or a backbone and
    its weights file) and every option that changes rows. `resume` never mixes parts of another fingerprint."""
    if settings.model:
        from classify.checkpoint import META_NAME, WEIGHTS_NAME

        run = Path(settings.model)
        model = {"run": _show(os.path.realpath(run)), "weights_sha256": _sha256(run / WEIGHTS_NAME),
                 "meta_sha256": _sha256(run / META_NAME)}
    else:
        model = {"backbone": settings.backbone,
                 "weights_sha256": _sha256(Path(settings.weights)) if settings.weights else None}
    return {"root": _show(os.path.realpath(root)), "model": model, "top_k": settings.top_k,
            "embeddings": settings.embeddings, "max_bytes": settings.max_bytes,
            "follow_symlinks": settings.follow_symlinks}


def _check_paths(root: Path, out: Path) -> None:
    """DIR must be a folder; --out must name a file in a folder that exists (or can be made) and is writable."""
    if not root.is_dir():
        what = "it is a file" if root.exists() else "it does not exist"
        raise UsageError(f"{_show(root)} is not a folder ({what}); give the folder of images to classify")
    if out.is_dir():
        raise UsageError(f"--out {_show(out)} is a folder; give a file name, e.g. {_show(out / 'predictions.parquet')}")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"--out {_show(out)} cannot be made: {_show(folder)} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {_show(out)} cannot be written: {_show(folder)} is not writable")


def _atelier_meta(out: Path) -> dict | None:
    """The `atelier` metadata of a predictions file `classify dir` wrote, or None for any other file."""
    try:
        meta = json.loads((pq.read_schema(out).metadata or {})[b"atelier"])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    return meta if isinstance(meta, dict) else None


def _mismatch(stored: object, fp: dict, where: Path) -> UsageError:
    stored = stored if isinstance(stored, dict) else {}
    differ = ", ".join(key for key in fp if stored.get(key) != fp[key]) or "format"
    return UsageError(f"{_show(where)} was made by another run (different {differ}); rerun with the same folder, "
                      f"model and options, or choose another --out")


def _check_fingerprint(parts: Path, fp: dict) -> None:
    """Parts may only be continued by the run that made them."""
    try:
        stored = json.loads((parts / FINGERPRINT).read_text())
    except (OSError, ValueError):
        stored = None
    if stored is None:
        if any(parts.glob("part-*.parquet")):
            raise UsageError(f"{_show(parts)} holds parts with no record of the run that made them; delete it and "
                             f"rerun")
    elif stored != fp:
        raise _mismatch(stored, fp, parts)


def _check_existing(out: Path, parts: Path, fp: dict, resume: bool) -> bool:
    """Refuse, before anything is loaded or written, an OUT or OUT.parts that is not this run's to continue; True
    when OUT is this run's finished result."""
    if out.exists():
        meta = _atelier_meta(out)
        if meta is None:
            raise UsageError(f"{_show(out)} exists and was not written by `classify dir`; choose another --out")
        if not resume:
            raise UsageError(f"{_show(out)} exists; pass --resume to finish or reuse it, or choose another --out")
        if meta.get("fingerprint", fp) != fp:  # an OUT from before fingerprints were kept is taken as it is
            raise _mismatch(meta["fingerprint"], fp, out)
    if not (parts.exists() or parts.is_symlink()):
        return out.exists()
    if not resume and marker_kind(parts) == "predictions":
        raise UsageError(f"{_show(parts)} holds an interrupted run; pass --resume to finish it, or delete it")
    claim(parts, "predictions", "the parts folder of --out")
    _check_fingerprint(parts, fp)
    return False


def _claim_parts(parts: Path, fp: dict) -> None:
    """Make `parts` atelier's folder, recording the run's fingerprint in it first thing."""
    claim(parts, "predictions", "the parts folder of --out")
    if not (parts / FINGERPRINT).exists():
        try:
            with atomic_path(parts / FINGERPRINT, fsync=True) as tmp:
                tmp.write_text(json.dumps(fp, indent=1) + "\n")
        except OSError as exc:
            raise _write_error(parts / FINGERPRINT, exc) from None


def _write_error(path: Path, exc: OSError) -> UsageError:
    hint = "free some space" if exc.errno == errno.ENOSPC else "fix the folder"
    return UsageError(f"cannot write {_show(path)}: {exc.strerror or exc}; the rows flushed so far are kept: "
                      f"{hint} and rerun with --resume")


def _write_atomic_table(table: pa.Table, path: Path) -> None:
    with atomic_path(path, fsync=True) as tmp:
        pq.write_table(table, tmp)


def _read_parts(parts: Path, schema: pa.Schema) -> tuple[list[Path], set[tuple[str, bool]], int]:
    """The flushed part files, the (path, escaped) pairs they hold and their row count."""
    files = sorted(parts.glob("part-*.parquet"))
    done: set[tuple[str, bool]] = set()
    rows = 0
    for f in files:
        try:
            names = pq.read_schema(f).names
            table = pq.read_table(f, columns=["path", "path_escaped"]) if names == schema.names else None
        except (OSError, pa.ArrowInvalid) as exc:
            raise UsageError(f"{_show(f)} is unreadable ({exc}); delete it and rerun with --resume") from None
        if table is None:
            raise UsageError(f"{_show(parts)} was written with other options (columns {names}); rerun with the "
                             f"same --embeddings setting, or delete it")
        done.update(zip(table.column("path").to_pylist(), table.column("path_escaped").to_pylist()))
        rows += table.num_rows
    return files, done, rows


def _join_parts(files: list[Path], out: Path, schema: pa.Schema, meta: dict) -> None:
    """Stream the parts into one Parquet file (one part in memory at a time), atomically."""
    try:
        with atomic_path(out) as tmp, \
                pq.ParquetWriter(tmp, schema.with_metadata({"atelier": json.dumps(meta)})) as writer:
            for f in files:
                writer.write_table(pq.read_table(f).cast(schema))
    except OSError as exc:
        raise _write_error(out, exc) from None


def _own_name(name: str) -> bool:
    """A file atelier writes in OUT.parts: a part, the fingerprint, the marker, or a temporary file of one of them
    (`atomic_path` names those `.NAME.RANDOM.tmp`)."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:-4].rsplit(".", 1)[0]
    return name in (FINGERPRINT, MARKER) or re.fullmatch(r"part-\d{6,}\.parquet", name) is not None


def _remove_parts(parts: Path) -> None:
    """Remove the files atelier wrote in `parts` (the marker last), and the folder if nothing else is left."""
    own = [Path(e.path) for e in os.scandir(parts) if e.is_file(follow_symlinks=False) and _own_name(e.name)]
    for path in sorted(own, key=lambda p: (p.name == FINGERPRINT, p.name == MARKER)):
        path.unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:
        pass  # the user put files of their own there: they stay, and so does the folder


def _predict_rows(batch: list, predictor: Predictor, runtime: Runtime, k: int, embeddings: bool) -> list[dict]:
    """One output row per decoded file of `batch`, the model run once on the good ones."""
    good = [(i, arr) for i, (_, err, arr) in enumerate(batch) if err is None]
    results: dict[int, tuple] = {}
    if good:
        device = torch.device(runtime.device)
        pixels = torch.from_numpy(np.stack([a for _, a in good])).to(device, non_blocking=True)
        probs, feats = predictor(pixels, runtime)
        if predictor.threshold is not None:  # one-vs-rest: the label follows the model's decision threshold
            top1 = (probs[:, 1] >= predictor.threshold).long()
        else:
            top1 = probs.argmax(1)
        scores, idx = probs.topk(k, dim=1)
        probs_np, scores_np, idx_np = probs.cpu().numpy(), scores.cpu().numpy(), idx.cpu().numpy()
        top1_np, feats_np = top1.cpu().numpy(), feats.cpu().numpy()
        for j, (i, _) in enumerate(good):
            results[i] = (int(top1_np[j]), float(probs_np[j, top1_np[j]]), idx_np[j], scores_np[j], feats_np[j])
    rows = []
    for i, ((text, escaped), err, _) in enumerate(batch):
        row = {"path": text, "path_escaped": escaped, "label": None, "confidence": None, "topk_labels": None,
               "topk_scores": None, "error": err, "model": predictor.name}
        if embeddings:
            row["embedding"] = None
        if i in results:
            top, conf, idx, sc, feat = results[i]
            row.update(label=predictor.classes[top], confidence=conf,
                       topk_labels=[predictor.classes[c] for c in idx], topk_scores=sc.tolist())
            if embeddings:
                row["embedding"] = feat.tolist()
        rows.append(row)
    return rows


def _loader(batches: _Batches, settings: PredictSettings, runtime: Runtime) -> torch.utils.data.DataLoader:
    """Decoded batches in order, from `settings.workers` processes (default: cores - 1)."""
    workers = default_workers() if settings.workers is None else settings.workers
    return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                       prefetch_factor=4 if workers else None,
                                       pin_memory=runtime.device.startswith("cuda"))


def _load_predictor(settings: PredictSettings, runtime: Runtime, emit: Event) -> Predictor:
    """The model on the runtime's device, compiled when asked and possible."""
    predictor = Predictor(settings).to(torch.device(runtime.device))
    if settings.compile:
        try:
            predictor.module = torch.compile(predictor.module)
        except Exception as exc:  # noqa: BLE001 - compilation support varies by platform; plain eager still works
            emit("note", {"text": f"--compile unavailable here ({str(exc).splitlines()[0][:120]}); running eager"})
    return predictor


def classify_dir(root: Path, out: Path, settings: PredictSettings | None = None,
                 events: Event | None = None) -> PredictResult:
    """Classify every file under `root` into `out` (see the module docstring)."""
    settings = settings or PredictSettings()
    emit = events or (lambda kind, info: None)
    root, out = Path(root), Path(out)
    parts = parts_folder(out)
    _check_paths(root, out)
    fp = fingerprint(root, settings)
    if _check_existing(out, parts, fp, settings.resume):
        done_rows = pq.read_metadata(out).num_rows
        return PredictResult(out, done_rows, 0, 0, done_rows, 0.0, select_runtime(settings.device, settings.dtype),
                             "already complete")
    configure_allocator()
    runtime = select_runtime(settings.device, settings.dtype)
    predictor = _load_predictor(settings, runtime, emit)
    _claim_parts(parts, fp)
    schema = _schema(settings.embeddings)
    part_files, done, resumed = _read_parts(parts, schema)
    inputs = _Inputs(root, out, settings.follow_symlinks)
    emit("stage", {"name": "classify", "total": sum(1 for _ in inputs)})
    emit("advance", {"n": resumed})
    loader = _loader(_Batches(inputs, done, settings.batch_size, predictor,
                              ReadPolicy(root, settings.max_bytes, settings.follow_symlinks)), settings, runtime)
    k = min(settings.top_k, len(predictor.classes))
    buffer: list[dict] = []
    files = errors = predicted = 0
    start = time.perf_counter()

    def flush() -> None:
        nonlocal buffer
        if buffer:
            target = parts / f"part-{len(part_files):06d}.parquet"
            try:
                _write_atomic_table(pa.Table.from_pylist(buffer, schema=schema), target)
            except OSError as exc:
                raise _write_error(target, exc) from None
            part_files.append(target)
            buffer = []

    for batch in loader:
        rows = _predict_rows(batch, predictor, runtime, k, settings.embeddings)
        predicted += sum(row["label"] is not None for row in rows)
        errors += sum(row["error"] is not None for row in rows)
        buffer.extend(rows)
        files += len(batch)
        emit("advance", {"n": len(batch)})
        if (resumed + files) % settings.flush_every == 0:
            flush()
    flush()
    seconds = time.perf_counter() - start
    meta = {"root": _show(root.resolve()), "model": predictor.name, "classes": len(predictor.classes),
            "runtime": {"device": runtime.device, "dtype": runtime.dtype}, "top_k": k, "fingerprint": fp}
    _join_parts(part_files, out, schema, meta)
    _remove_parts(parts)
    return PredictResult(out, resumed + files, errors, predicted, resumed, seconds, runtime, predictor.name)


def read_predictions(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path)
