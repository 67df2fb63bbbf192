"""`classify dir`: classify every file under a folder into one Parquet file, streaming, resumable, fast.

Files are listed lazily (`curator.images.iter_files`) and decoded in worker processes with the same safe loader as
`curator clean`; the model runs batched in the main process. Rows are flushed every `flush_every` files as numbered
part files (each written atomically) in `OUT.parts/`, so a run killed at any moment, SIGKILL included, keeps every
flushed row readable. `resume` skips the files already in the parts and continues; at the end the parts are joined
into OUT (atomically) and removed. Flushes fall on batch boundaries and a resumed run starts on one, so its batches,
and therefore its numbers, are the same as an uninterrupted run's.

One row per file: path (relative to the folder), label, confidence, topk_labels, topk_scores, error, model, and with
`embeddings` the feature vector (pooled + style statistics). An unreadable file is a row with an `error`.
"""

from __future__ import annotations

import json
import shutil
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
from curator.images import decode_bytes, iter_files
from curator.runtime import Runtime, configure_allocator, select_runtime

Event = Callable[[str, dict], None]
PARTS_SUFFIX = ".parts"


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

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.batch_size < 1:
            raise UsageError("--top-k and --batch-size must be at least 1")
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
            self.classes = loaded.classes
            pre = loaded.meta["preprocessing"]
            self.square_side, self.crop = int(pre["resize_side"]), int(pre["crop"])
            self.tta = bool(pre.get("tta"))
            self.threshold = loaded.meta.get("threshold")
            self.name = f"{Path(settings.model).name} ({loaded.meta['backbone']['name']}, {len(self.classes)} classes)"
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


class _Batches(torch.utils.data.IterableDataset):
    """Batches of (relative path, error, uint8 CHW or None) over the files not done yet; worker k of W decodes
    batches k, k+W, ..., which the DataLoader hands back in order."""

    def __init__(self, root: Path, done: set[str], batch_size: int, predictor: Predictor, exclude: list[Path]):
        self.root = root
        self.done = done
        self.batch_size = batch_size
        self.predictor = predictor
        self.exclude = exclude

    def _paths(self) -> Iterator[list[Path]]:
        batch: list[Path] = []
        for path in iter_files(self.root, self.exclude):
            if path.relative_to(self.root).as_posix() in self.done:
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

    def _decode(self, path: Path) -> tuple[str, str | None, np.ndarray | None]:
        rel = path.relative_to(self.root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as exc:
            return rel, "file is missing" if isinstance(exc, FileNotFoundError) else f"cannot read: {exc}", None
        decoded = decode_bytes(path, data, self.predictor.draft)
        if not decoded.info.ok:
            return rel, decoded.info.reason or decoded.info.status, None
        try:
            return rel, None, self.predictor.prepare(decoded.image)
        except (OSError, ValueError) as exc:
            return rel, f"cannot preprocess: {exc}", None


def _schema(embeddings: bool) -> pa.Schema:
    fields = [("path", pa.string()), ("label", pa.string()), ("confidence", pa.float32()),
              ("topk_labels", pa.list_(pa.string())), ("topk_scores", pa.list_(pa.float32())),
              ("error", pa.string()), ("model", pa.string())]
    if embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


def _write_atomic_table(table: pa.Table, path: Path) -> None:
    with atomic_path(path, fsync=True) as tmp:
        pq.write_table(table, tmp)


def _read_parts(parts: Path, schema: pa.Schema) -> tuple[list[Path], set[str], int]:
    files = sorted(parts.glob("part-*.parquet"))
    done: set[str] = set()
    rows = 0
    for f in files:
        try:
            table = pq.read_table(f, columns=["path"])
        except (OSError, pa.ArrowInvalid) as exc:
            raise UsageError(f"{f} is unreadable ({exc}); delete it and rerun with --resume") from None
        done.update(table.column("path").to_pylist())
        rows += table.num_rows
    if files:
        have = pq.read_schema(files[0])
        if have.names != schema.names:
            raise UsageError(f"{parts} was written with other options (columns {have.names}); rerun with the same "
                             f"--embeddings setting, or delete it")
    return files, done, rows


def _join_parts(files: list[Path], out: Path, schema: pa.Schema, meta: dict) -> None:
    """Stream the parts into one Parquet file (one part in memory at a time), atomically."""
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema.with_metadata({"atelier": json.dumps(meta)})) as writer:
        for f in files:
            writer.write_table(pq.read_table(f).cast(schema))


def classify_dir(root: Path, out: Path, settings: PredictSettings | None = None,
                 events: Event | None = None) -> PredictResult:
    """Classify every file under `root` into `out` (see the module docstring)."""
    settings = settings or PredictSettings()
    emit = events or (lambda kind, info: None)
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder")
    parts = out.with_name(out.name + PARTS_SUFFIX)
    if out.exists() and not settings.resume:
        raise UsageError(f"{out} exists; pass --resume to finish or reuse it, or choose another --out")
    if parts.exists() and not settings.resume:
        raise UsageError(f"{parts} holds an interrupted run; pass --resume to finish it, or delete it")
    schema = _schema(settings.embeddings)
    if out.exists() and not parts.exists():
        done_rows = pq.read_metadata(out).num_rows
        return PredictResult(out, done_rows, 0, 0, done_rows, 0.0, select_runtime(settings.device, settings.dtype),
                             "already complete")
    configure_allocator()
    runtime = select_runtime(settings.device, settings.dtype)
    device = torch.device(runtime.device)
    predictor = Predictor(settings).to(device)
    if settings.compile:
        try:
            predictor.module = torch.compile(predictor.module)
        except Exception as exc:  # noqa: BLE001 - compilation support varies by platform; plain eager still works
            emit("note", {"text": f"--compile unavailable here ({str(exc).splitlines()[0][:120]}); running eager"})
    out.parent.mkdir(parents=True, exist_ok=True)
    parts.mkdir(exist_ok=True)
    part_files, done, resumed = _read_parts(parts, schema)
    exclude = [out.parent] if out.parent.resolve().is_relative_to(root.resolve()) else []
    total = sum(1 for _ in iter_files(root, exclude))
    emit("stage", {"name": "classify", "total": total})
    emit("advance", {"n": resumed})
    workers = default_workers() if settings.workers is None else settings.workers
    loader = torch.utils.data.DataLoader(
        _Batches(root, done, settings.batch_size, predictor, exclude), batch_size=None, num_workers=workers,
        prefetch_factor=4 if workers else None, pin_memory=device.type == "cuda")
    k = min(settings.top_k, len(predictor.classes))
    buffer: list[dict] = []
    files = errors = predicted = 0
    start = time.perf_counter()

    def flush() -> None:
        nonlocal buffer
        if not buffer:
            return
        index = len(part_files)
        target = parts / f"part-{index:06d}.parquet"
        _write_atomic_table(pa.Table.from_pylist(buffer, schema=schema), target)
        part_files.append(target)
        buffer = []

    for batch in loader:
        good = [(i, arr) for i, (_, err, arr) in enumerate(batch) if err is None]
        results: dict[int, tuple] = {}
        if good:
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
                results[i] = (int(top1_np[j]), float(probs_np[j, top1_np[j]]), idx_np[j], scores_np[j],
                              feats_np[j])
        for i, (rel, err, _) in enumerate(batch):
            row = {"path": rel, "label": None, "confidence": None, "topk_labels": None, "topk_scores": None,
                   "error": err, "model": predictor.name}
            if i in results:
                top, conf, idx, sc, feat = results[i]
                row.update(label=predictor.classes[top], confidence=conf,
                           topk_labels=[predictor.classes[c] for c in idx], topk_scores=sc.tolist())
                if settings.embeddings:
                    row["embedding"] = feat.tolist()
                predicted += 1
            elif settings.embeddings:
                row["embedding"] = None
            errors += err is not None
            buffer.append(row)
        files += len(batch)
        emit("advance", {"n": len(batch)})
        if (resumed + files) % settings.flush_every == 0:
            flush()
    flush()
    seconds = time.perf_counter() - start
    meta = {"root": str(root.resolve()), "model": predictor.name, "classes": len(predictor.classes),
            "runtime": {"device": runtime.device, "dtype": runtime.dtype}, "top_k": k}
    _join_parts(part_files, out, schema, meta)
    shutil.rmtree(parts)
    return PredictResult(out, resumed + files, errors, predicted, resumed, seconds, runtime, predictor.name)


def read_predictions(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path)
