"""`classify dir`: classify every file under a folder into one Parquet file, streaming, resumable, fast.

Files are listed lazily (`curator.core.images.iter_files`) and go through the batched data plane
(`curator.embedding.dataplane`): decode workers read each file through the same safe loader as `curator clean` and fill
one contiguous uint8 batch with the model's preprocessing (`curator.embedding.preprocess.Preprocess`, from the
backbone's data config; for a trained run, the checkpoint's backbone); on CUDA batches are copied to the GPU while the
model runs. With `gpu_decode` JPEGs are decoded on the GPU instead (`curator.embedding.gpu_decode`, nvjpeg). It is off
by default: on one H200 with 16 cores (docs/BENCHMARKS.md) it was no faster than the CPU workers (224-px paintings
1,395-1,891 images/s against 1,835; 1,600-px JPEGs 569-625 against 632) and nvjpeg's decoding moved the top-1 class of
4% of the sample paintings off the CPU loader's (mean 0.84 levels, at most 77, apart). Rows are built as Arrow arrays, a
batch at a time, and flushed every `flush_every` files as numbered part files (each written atomically) in `OUT.parts/`,
so a run killed at any moment, SIGKILL included, keeps every flushed row readable. `resume` skips the files already in
the parts and continues; at the end the parts are joined into OUT (atomically) and removed. Flushes fall on batch
boundaries and a resumed run starts on one, so its batches, and therefore its numbers, are the same as an uninterrupted
run's.

`OUT.parts/` is atelier's own folder (an `.atelier` marker, see `curator.core.ownership`) and records the run's
fingerprint (folder, model, options that change rows); `resume` refuses parts of another run, and the clean-up
removes only the files atelier wrote there. OUT, its parts and their temporary files are never rows themselves, even
when OUT lies inside the folder. Every file is read through `curator.core.images.read_source` (regular files only, at
most `max_bytes`, symbolic links leaving the folder not followed), so FIFOs, devices and outside links become rows.

One row per file: path (relative to the folder, escaped when the name is not UTF-8, see `curator.core.paths`),
path_escaped, predicted, confidence, pred_top_classes, pred_top_scores, error, model, and with `embeddings` the
feature vector (pooled + style statistics). An unreadable file is a row with an `error` (and nulls).

Vocabulary (the same in `classify eval`'s predictions.parquet): `label` is only ever a given or true label, never a
prediction; `predicted` is the class the model gives a file (a one-vs-rest model's follows its threshold),
`confidence` that class's probability, `pred_top_classes`/`pred_top_scores` the `top_k` most probable classes and
their probabilities. Files of the previous release named these `label`, `topk_labels` and `topk_scores`:
`read_predictions` reads both, and `resume` finishes parts written under the old names (`OLD_NAMES`; kept for one
release).

The pieces of a run (`check_paths`, `check_existing`, `fingerprint`, `claim_parts`, `read_parts`, `Inputs`, `Chunks`,
`DirWork`, `launch`, `RowBuilder`, `write_part`, `join_parts`, `remove_parts`) are public: `classify.ray_engine` builds
its engine from the same ones, so both engines write the same rows.

Defaults by device (`curator.embedding.dataplane`): batch 256 and cores - 1 decode workers on CUDA; batch 64 and one
worker per four cores on a CPU (one on two cores); no worker processes at all for a folder of at most `SMALL_RUN` files
(so a small folder starts at once).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from classify.inference import ranked
from curator.core.atomic import atomic_path
from curator.core.errors import SettingsError, UsageError
from curator.core.images import (
    DEFAULT_MAX_BYTES,
    STATUS_CORRUPT,
    Decoded,
    ReadPolicy,
    decode_bytes,
    iter_files,
    read_source,
)
from curator.core.ownership import MARKER, claim, marker_kind
from curator.core.paths import display, relative_text
from curator.core.progress import Event
from curator.core.runtime import Runtime, select_runtime
from curator.embedding.backbones import DEFAULT_BACKBONE, load_backbone
from curator.embedding.dataplane import (
    Context,
    DataPlane,
    Item,
    PlaneStats,
    Ready,
    choose_workers,
    chunked,
    decode_routed,
    default_batch_size,
)
from curator.embedding.embed import forward_features, pixel_scale
from curator.embedding.preprocess import Preprocess

#: The previous release's names of the prediction columns (`label` was the predicted class): read for one release.
OLD_NAMES = {"label": "predicted", "topk_labels": "pred_top_classes", "topk_scores": "pred_top_scores"}
PARTS_SUFFIX = ".parts"
FINGERPRINT = "fingerprint.json"  # in OUT.parts: what made the parts, so that --resume never mixes two runs
FLUSH_FILES = 2048  # rows per part file, rounded down to a multiple of the batch size


@dataclass(frozen=True)
class PredictSettings:
    """`batch_size`, `workers` and `flush_every` left as None are chosen by device (module docstring). `gpu_decode`
    True sends JPEGs to `curator.embedding.gpu_decode` (nvjpeg on CUDA; `decode_batch(device="cpu")` on a CPU, for
    tests); off by default (module docstring says why)."""

    model: str | None = None  # a `classify train` run folder; None: the backbone's ImageNet-1k classes
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    top_k: int = 5
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    embeddings: bool = False
    resume: bool = False
    compile: bool = False
    flush_every: int | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    follow_symlinks: bool = False
    gpu_decode: bool = False

    def __post_init__(self) -> None:
        if self.top_k < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise SettingsError(f"--top-k and --batch-size must be at least 1, got {self.top_k} and {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise SettingsError(f"--workers must be 0 (decode in this process) or more, got {self.workers}")
        ReadPolicy(max_bytes=self.max_bytes)  # raises the one-line error for --max-bytes below 1
        if self.flush_every is not None and (self.flush_every < 1 or self.flush_every % (self.batch_size or 1)):
            raise SettingsError(f"flush_every ({self.flush_every}) must be a positive multiple of the batch size "
                                f"({self.batch_size})")

    def resolved(self, device: str) -> tuple[int, int]:
        """(batch size, flush_every) on `device`: the settings', or the device's defaults."""
        batch = self.batch_size or default_batch_size(device)
        flush = self.flush_every or batch * max(1, FLUSH_FILES // batch)
        if flush % batch:
            raise UsageError(f"flush_every ({flush}) must be a multiple of the batch size ({batch})")
        return batch, flush


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
    batch_size: int = 0
    workers: int = 0
    wait_seconds: float = 0.0  # wall time the model spent waiting for decoded batches
    device_jpegs: int = 0  # JPEGs decoded by `curator.embedding.gpu_decode` (the rest on the CPU)

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0

    @property
    def wait_share(self) -> float:
        """The share of the run's wall time the model waited for data."""
        return min(1.0, self.wait_seconds / self.seconds) if self.seconds > 0 else 0.0

    @property
    def bound(self) -> str:
        """What limited the run: "decoding" when the model waited for data half the time or more, else "model"."""
        return "decoding" if self.wait_share >= 0.5 else "model"


class Predictor:
    """A model with its preprocessing and class names: pixels in, probabilities (and features) out."""

    def __init__(self, settings: PredictSettings):
        if settings.model:
            from classify import checkpoint

            loaded = checkpoint.load(Path(settings.model))
            self.module = loaded.classifier
            self.backbone = loaded.classifier.backbone
            self.classes = [display(str(c)) for c in loaded.classes]  # Parquet takes no lone surrogates
            self.tta = bool(loaded.meta["preprocessing"].get("tta"))
            self.threshold = loaded.meta.get("threshold")
            self.name = (f"{display(Path(settings.model).name)} ({loaded.meta['backbone']['name']}, "
                         f"{len(self.classes)} classes)")
            self.trained = True
            # the run's own preprocessing (runs from before it was recorded: their bicubic squares)
            preprocess = getattr(loaded, "preprocess", None)
        else:
            from timm.data import ImageNetInfo

            self.backbone = load_backbone(settings.backbone, Path(settings.weights) if settings.weights else None)
            self.module = self.backbone.model
            info = ImageNetInfo()
            n = int(getattr(self.module, "num_classes", 0) or 0)
            if n != info.num_classes():
                raise UsageError(f"backbone {settings.backbone!r} has {n} outputs, not ImageNet-1k's 1000: pass "
                                 f"--run RUN for a trained classifier")
            self.classes = [info.index_to_description(i) for i in range(n)]
            self.tta = False
            self.threshold = None
            self.name = f"{settings.backbone} ImageNet-1k ({self.backbone.weights_origin})"
            self.trained = False
            preprocess = None
        self.preprocess = preprocess or Preprocess.from_data_config(self.backbone.data_config)
        self.mean, self.std = pixel_scale(self.preprocess.mean, self.preprocess.std)
        # the `embedding` column is pooled + style statistics, as `curator` caches it, whatever else the head reads
        self.embedding_width = max(end for part, (_, end) in self.backbone.feature_layout.items() if part != "gram")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The model's input, (3, crop, crop)."""
        return (3, self.preprocess.crop, self.preprocess.crop)

    def to(self, device: torch.device) -> Predictor:
        self.module.to(device)
        self.backbone.model.to(memory_format=torch.channels_last)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __call__(self, pixels: torch.Tensor, runtime: Runtime,
                 features: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probabilities and (with `features`) the embedding for a uint8 batch on the model's device. Without
        `features`, an ImageNet backbone runs its plain forward pass, which skips the style statistics (11% faster
        on the CPU); a trained head reads them, so it always computes them."""
        device = torch.device(runtime.device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=runtime.torch_dtype,
                                                    enabled=runtime.autocast):
            if self.trained:
                feats = self.module.features(pixels)
                probs = torch.softmax(self.module.head(feats).float(), 1)
                if self.tta:
                    probs = (probs + torch.softmax(self.module(pixels.flip(3)).float(), 1)) / 2
            else:
                x = ((pixels.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
                if not features:
                    return torch.softmax(self.module(x).float(), 1), None
                feats = forward_features(self.backbone, x)
                pooled = feats[:, : self.backbone.feature_layout["pooled"][1]]
                probs = torch.softmax(self.module.get_classifier()(pooled.to(x.dtype)).float(), 1)
        return probs, feats[:, :self.embedding_width].float() if features else None


@dataclass(frozen=True)
class DirWork:
    """One file of the folder to `Item(((path text, escaped), error), pixels or JPEG bytes)`: read through the
    policy (regular files, size cap, no outside links), judged and decoded by the safe loader, preprocessed; or the
    reason it cannot be."""

    root: Path
    policy: ReadPolicy
    preprocess: Preprocess

    def __call__(self, path: Path, ctx: Context) -> Item:
        rel = relative_text(path, self.root)
        data, row = read_source(path, self.policy)
        if row is not None:
            return Item((rel, row.info.reason or row.info.status))
        decoded = decode_routed(path, data, self.preprocess, ctx)
        if decoded is None:
            return Item((rel, None), jpeg=data)
        pixels, error = pixels_of(decoded, self.preprocess)
        return Item((rel, error), pixels)


def pixels_of(decoded: Decoded, preprocess: Preprocess) -> tuple[np.ndarray | None, str | None]:
    """The model's uint8 CHW input for a file the safe loader judged, or None and the reason it has none."""
    if not decoded.info.ok:
        return None, decoded.info.reason or decoded.info.status
    try:
        return preprocess.pixels(decoded.image), None
    except (OSError, ValueError) as exc:
        return None, f"cannot preprocess: {exc}"


def image_pixels(name: Path, data: bytes, preprocess: Preprocess) -> tuple[np.ndarray | None, Decoded]:
    """Bytes already in memory (an upload) to the model's input the way `classify dir` makes it on the CPU: the safe
    loader's checks and decode (`decode_bytes`, JPEGs drafted to the preprocessing's size), then `preprocess`.
    Returns the pixels (None when there are none) and the loader's verdict; a preprocessing failure becomes a corrupt
    verdict with the same reason `classify dir` writes."""
    decoded = decode_bytes(Path(name), data, preprocess.draft_size)
    pixels, error = pixels_of(decoded, preprocess)
    if pixels is None and decoded.info.ok:
        decoded = Decoded(replace(decoded.info, status=STATUS_CORRUPT, reason=error), None)
    return pixels, decoded


def parts_folder(out: Path) -> Path:
    """The folder of `out`'s flushed parts: `OUT.parts` beside it."""
    return out.with_name(out.name + PARTS_SUFFIX)


def _show(path: Path | str) -> str:
    """A path for a message: escaped when a name in it is not UTF-8 (a console cannot print it as it is)."""
    return display(str(path))


@dataclass(frozen=True)
class Inputs:
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


class DoneSet:
    """The (path text, escaped) pairs already classified, as one sorted array of 16-byte BLAKE2b digests: 16 bytes a
    path in one buffer, which forked decode workers share untouched, where a Python set of the pairs took about 120
    MB per million paths in every worker that filtered with it. Membership is tested a block of paths at a time."""

    def __init__(self, pairs: Iterable[tuple[str, bool]] = ()):
        self.digests = np.unique(_digests(pairs))

    @classmethod
    def from_digests(cls, digests: Iterable[np.ndarray]) -> DoneSet:
        """The set of the given digest arrays (`_digests`), sorted once."""
        made = cls()
        made.digests = np.unique(np.concatenate([made.digests, *digests]))
        return made

    @classmethod
    def union(cls, sets: Iterable[DoneSet]) -> DoneSet:
        return cls.from_digests(s.digests for s in sets)

    def __len__(self) -> int:
        return len(self.digests)

    def contains(self, pairs: Sequence[tuple[str, bool]]) -> np.ndarray:
        """(len(pairs),) bool: which of `pairs` are done."""
        if not len(self.digests) or not len(pairs):
            return np.zeros(len(pairs), dtype=bool)
        wanted = _digests(pairs)
        at = np.minimum(np.searchsorted(self.digests, wanted), len(self.digests) - 1)
        return self.digests[at] == wanted


def _digests(pairs: Iterable[tuple[str, bool]]) -> np.ndarray:
    """The 16-byte BLAKE2b digest of each (path text, escaped) pair, in order (the escaped flag as its person)."""
    return np.array([hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16,
                                     person=b"e" if escaped else b"p").digest() for text, escaped in pairs],
                    dtype="S16")


@dataclass(frozen=True)
class Chunks:
    """The files not done yet, in batches: what each decode worker lists (the same sequence every time)."""

    inputs: Inputs
    done: DoneSet
    batch_size: int

    def __call__(self) -> Iterator[list[Path]]:
        return chunked(self._todo() if len(self.done) else iter(self.inputs), self.batch_size)

    def _todo(self) -> Iterator[Path]:
        root = self.inputs.root
        for block in chunked(self.inputs, 4096):
            done = self.done.contains([relative_text(p, root) for p in block])
            yield from (p for p, skip in zip(block, done) if not skip)


def output_schema(embeddings: bool) -> pa.Schema:
    """The columns of a predictions file (module docstring), with `embedding` when asked."""
    fields = [("path", pa.string()), ("path_escaped", pa.bool_()), ("predicted", pa.string()),
              ("confidence", pa.float32()), ("pred_top_classes", pa.list_(pa.string())),
              ("pred_top_scores", pa.list_(pa.float32())), ("error", pa.string()), ("model", pa.string())]
    if embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


def _sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def fingerprint(root: Path, settings: PredictSettings, engine: str = "local") -> dict:
    """What decides a run's rows: the folder, the model (a run folder and the hashes of its files, or a backbone and
    its weights file) and every option that changes rows. `resume` never mixes parts of another fingerprint. Another
    `engine` than the local one (`classify.ray_engine`) is recorded too: its parts are numbered by shard, not by
    flush, so neither engine may continue the other's."""
    if settings.model:
        from classify.checkpoint import META_NAME, WEIGHTS_NAME

        run = Path(settings.model)
        model = {"run": _show(os.path.realpath(run)), "weights_sha256": _sha256(run / WEIGHTS_NAME),
                 "meta_sha256": _sha256(run / META_NAME)}
    else:
        model = {"backbone": settings.backbone,
                 "weights_sha256": _sha256(Path(settings.weights)) if settings.weights else None}
    fp = {"root": _show(os.path.realpath(root)), "model": model, "top_k": settings.top_k,
          "embeddings": settings.embeddings, "max_bytes": settings.max_bytes,
          "follow_symlinks": settings.follow_symlinks}
    if engine != "local":
        fp["engine"] = engine
    return fp


def check_paths(root: Path, out: Path) -> None:
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


def atelier_meta(out: Path) -> dict | None:
    """The `atelier` metadata of a predictions file `classify dir` wrote, or None for any other file."""
    try:
        meta = json.loads((pq.read_schema(out).metadata or {})[b"atelier"])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    return meta if isinstance(meta, dict) else None


def _mismatch(stored: object, fp: dict, where: Path) -> UsageError:
    stored = stored if isinstance(stored, dict) else {}
    keys = [*fp, *(key for key in stored if key not in fp)]  # e.g. "engine": only another engine's runs record it
    differ = ", ".join(key for key in keys if stored.get(key) != fp.get(key)) or "format"
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


def check_existing(out: Path, parts: Path, fp: dict, resume: bool) -> bool:
    """Refuse, before anything is loaded or written, an OUT or OUT.parts that is not this run's to continue; True
    when OUT is this run's finished result."""
    if out.exists():
        meta = atelier_meta(out)
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


def claim_parts(parts: Path, fp: dict) -> None:
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


def read_parts(parts: Path, schema: pa.Schema) -> tuple[list[Path], DoneSet, int]:
    """The flushed part files, the (path, escaped) pairs they hold and their row count."""
    files = sorted(parts.glob("part-*.parquet"))
    done: list[np.ndarray] = []
    rows = 0
    for f in files:
        try:
            names = pq.read_schema(f).names
            same = names in (schema.names, _old_names(schema.names))  # an interrupted run of the previous release
            table = pq.read_table(f, columns=["path", "path_escaped"]) if same else None
        except (OSError, pa.ArrowInvalid) as exc:
            raise UsageError(f"{_show(f)} is unreadable ({exc}); delete it and rerun with --resume") from None
        if table is None:
            raise UsageError(f"{_show(parts)} was written with other options (columns {names}); rerun with the "
                             f"same --embeddings setting, or delete it")
        done.append(_digests(zip(table.column("path").to_pylist(), table.column("path_escaped").to_pylist())))
        rows += table.num_rows
    return files, DoneSet.from_digests(done), rows


def _old_names(names: list[str]) -> list[str]:
    """`names` as the previous release wrote them (`OLD_NAMES` backwards)."""
    old = {new: name for name, new in OLD_NAMES.items()}
    return [old.get(name, name) for name in names]


def current_names(table: pa.Table) -> pa.Table:
    """A predictions table with this release's column names: a file of the previous release (`topk_labels` among
    its columns, `label` its prediction) renamed by `OLD_NAMES`; any other table as it is."""
    if "topk_labels" not in table.column_names:
        return table
    return table.rename_columns([OLD_NAMES.get(name, name) for name in table.column_names])


def write_part(table: pa.Table, target: Path) -> None:
    """Write one part file atomically; a failure (a full disk) is one line saying the rows so far are kept."""
    try:
        _write_atomic_table(table, target)
    except OSError as exc:
        raise _write_error(target, exc) from None


def output_meta(root: Path, predictor: Predictor, runtime: Runtime, k: int, fp: dict) -> dict:
    """The `atelier` metadata of a predictions file: the folder, model, runtime, top-k and the run's fingerprint."""
    return {"root": _show(Path(root).resolve()), "model": predictor.name, "classes": len(predictor.classes),
            "runtime": {"device": runtime.device, "dtype": runtime.dtype}, "top_k": k, "fingerprint": fp}


def join_parts(files: list[Path], out: Path, schema: pa.Schema, meta: dict) -> None:
    """Stream the parts into one Parquet file (one part in memory at a time), atomically."""
    try:
        with atomic_path(out) as tmp, \
                pq.ParquetWriter(tmp, schema.with_metadata({"atelier": json.dumps(meta)})) as writer:
            for f in files:
                writer.write_table(current_names(pq.read_table(f)).cast(schema))
    except OSError as exc:
        raise _write_error(out, exc) from None


def _own_name(name: str) -> bool:
    """A file atelier writes in OUT.parts: a part, the fingerprint, the marker, or a temporary file of one of them
    (`atomic_path` names those `.NAME.RANDOM.tmp`)."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:-4].rsplit(".", 1)[0]
    return name in (FINGERPRINT, MARKER) or re.fullmatch(r"part-\d{6,}\.parquet", name) is not None


def remove_parts(parts: Path) -> None:
    """Remove the files atelier wrote in `parts` (the marker last), and the folder if nothing else is left."""
    own = [Path(e.path) for e in os.scandir(parts) if e.is_file(follow_symlinks=False) and _own_name(e.name)]
    for path in sorted(own, key=lambda p: (p.name == FINGERPRINT, p.name == MARKER)):
        path.unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:
        pass  # the user put files of their own there: they stay, and so does the folder


@dataclass
class Outputs:
    """One batch's model outputs on their way to the CPU (`event` marks the end of the copies on CUDA)."""

    meta: list
    positions: np.ndarray
    tensors: list[torch.Tensor]  # top-1 index, its probability, top-k indices, top-k scores[, features]
    event: object = None

    def numpy(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return [t.numpy() for t in self.tensors]


@dataclass(frozen=True)
class Prediction:
    """One image's answer, as `classify dir` writes it in a row: the predicted class, its confidence, and the top-k
    (class, score) pairs."""

    predicted: str
    confidence: float
    topk: list[tuple[str, float]]

    @property
    def label(self) -> str:
        """The previous release's name of `predicted` (classify.serve's answers still say `label`)."""
        return self.predicted


def predict_pixels(predictor: Predictor, pixels: torch.Tensor, runtime: Runtime, k: int,
                   features: bool = False) -> tuple[list[Prediction], np.ndarray | None]:
    """Predictions for a uint8 batch (n, 3, crop, crop) on the model's device: the same forward pass and ranking as
    `classify dir`'s, for callers that hold decoded images rather than a folder (`classify serve`). With `features`,
    also the embeddings (n, `embedding_width`) as float32."""
    k = min(k, len(predictor.classes))
    probs, feats = predictor(pixels, runtime, features=features)
    top1, conf, idx, scores = (t.cpu().numpy() for t in ranked(probs, k, predictor.threshold))
    names = predictor.classes
    out = [Prediction(names[int(top1[i])], float(conf[i]),
                      [(names[int(j)], float(s)) for j, s in zip(idx[i], scores[i])]) for i in range(len(top1))]
    return out, feats.cpu().numpy() if features else None


def launch(predictor: Predictor, ready: Ready, runtime: Runtime, k: int, embeddings: bool) -> Outputs:
    """Run the model on a ready batch and start copying what the rows need to the CPU (asynchronously on CUDA, so
    that the next batch is launched before this one's rows are built)."""
    if len(ready.pixels) == 0:
        return Outputs(ready.meta, ready.positions, [])
    probs, feats = predictor(ready.pixels, runtime, features=embeddings)
    tensors = [*ranked(probs, k, predictor.threshold), *([feats] if embeddings else [])]
    if ready.pixels.device.type != "cuda":
        return Outputs(ready.meta, ready.positions, tensors)
    host = [t.to("cpu", non_blocking=True) for t in tensors]
    event = torch.cuda.Event()
    event.record()
    return Outputs(ready.meta, ready.positions, host, event)


class RowBuilder:
    """Arrow record batches from model outputs, a batch at a time: predicted classes are indices into a class-name
    dictionary array, top-k lists and embeddings fixed-size lists over flat numpy arrays (stored as the schema's lists),
    the model name a one-entry dictionary; only the path text and error are Python objects per row."""

    def __init__(self, classes: list[str], model: str, k: int, embeddings: bool, width: int):
        self.classes = pa.array(classes, pa.string())
        self.model = pa.array([model], pa.string())
        self.k = k
        self.embeddings = embeddings
        self.width = width
        self.schema = output_schema(embeddings)

    def _fixed(self, values: pa.Array, size: int, missing: np.ndarray, type_: pa.DataType) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(values, size, mask=pa.array(missing)).cast(type_)

    def __call__(self, out: Outputs) -> pa.RecordBatch:
        n = len(out.meta)
        missing = np.ones(n, dtype=bool)
        missing[out.positions] = False
        top1 = np.zeros(n, dtype=np.int32)
        conf = np.zeros(n, dtype=np.float32)
        idx = np.zeros((n, self.k), dtype=np.int32)
        scores = np.zeros((n, self.k), dtype=np.float32)
        feats = np.zeros((n, self.width), dtype=np.float32) if self.embeddings else None
        if len(out.positions):
            arrays = out.numpy()
            top1[out.positions], conf[out.positions] = arrays[0], arrays[1]
            idx[out.positions], scores[out.positions] = arrays[2], arrays[3]
            if self.embeddings:
                feats[out.positions] = arrays[4]
        columns = [
            pa.array([text for (text, _), _ in out.meta], pa.string()),
            pa.array([escaped for (_, escaped), _ in out.meta], pa.bool_()),
            self.classes.take(pa.array(top1, mask=missing)),
            pa.array(conf, pa.float32(), mask=missing),
            self._fixed(self.classes.take(pa.array(idx.ravel())), self.k, missing, pa.list_(pa.string())),
            self._fixed(pa.array(scores.ravel()), self.k, missing, pa.list_(pa.float32())),
            pa.array([error for _, error in out.meta], pa.string()),
            pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), self.model).cast(pa.string()),
        ]
        if self.embeddings:
            columns.append(self._fixed(pa.array(feats.ravel()), self.width, missing, pa.list_(pa.float32())))
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)


def _device_jpegs(setting: bool) -> bool:
    """Whether JPEGs go to `curator.embedding.gpu_decode`: only when asked (`--gpu-decode`), and it can be imported."""
    if not setting:
        return False
    try:
        import curator.embedding.gpu_decode  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--gpu-decode is unavailable here ({exc}); run without it") from None
    return True


def _load_predictor(settings: PredictSettings, runtime: Runtime, emit: Event) -> Predictor:
    """The model on the runtime's device, compiled when asked and possible."""
    return place_predictor(Predictor(settings), runtime, settings.compile, emit)


def place_predictor(predictor: Predictor, runtime: Runtime, compile: bool, emit: Event) -> Predictor:
    """A loaded model moved to the runtime's device and compiled when asked and possible (here, or in a Ray model
    actor that received it)."""
    predictor = predictor.to(torch.device(runtime.device))
    if compile:
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
    check_paths(root, out)
    fp = fingerprint(root, settings)
    if check_existing(out, parts, fp, settings.resume):
        done_rows = pq.read_metadata(out).num_rows
        return PredictResult(out, done_rows, 0, 0, done_rows, 0.0, select_runtime(settings.device, settings.dtype),
                             "already complete")
    runtime = select_runtime(settings.device, settings.dtype)
    batch_size, flush_every = settings.resolved(runtime.device)
    device_jpegs = _device_jpegs(settings.gpu_decode)
    predictor = _load_predictor(settings, runtime, emit)
    claim_parts(parts, fp)
    schema = output_schema(settings.embeddings)
    part_files, done, resumed = read_parts(parts, schema)
    inputs = Inputs(root, out, settings.follow_symlinks)
    total = sum(1 for _ in inputs)
    emit("stage", {"name": "classify", "total": total})
    emit("advance", {"n": resumed})
    workers = choose_workers(settings.workers, runtime.device, total - resumed)
    policy = ReadPolicy(root, settings.max_bytes, settings.follow_symlinks)
    plane = DataPlane(Chunks(inputs, done, batch_size), DirWork(root, policy, predictor.preprocess),
                      predictor.shape, device=runtime.device, workers=workers, preprocess=predictor.preprocess,
                      device_jpegs=device_jpegs, cpu_jpeg_share=None if runtime.device == "cuda" else 0.0)
    k = min(settings.top_k, len(predictor.classes))
    rows = RowBuilder(predictor.classes, predictor.name, k, settings.embeddings, predictor.embedding_width)
    buffer: list[pa.RecordBatch] = []
    files = errors = predicted = 0
    start = time.perf_counter()

    def flush() -> None:
        nonlocal buffer
        if buffer:
            target = parts / f"part-{len(part_files):06d}.parquet"
            write_part(pa.Table.from_batches(buffer, schema=schema), target)
            part_files.append(target)
            buffer = []

    def finish(outputs: Outputs) -> None:
        nonlocal files, errors, predicted
        batch = rows(outputs)
        predicted += len(outputs.positions)
        errors += batch.num_rows - batch.column("error").null_count
        files += batch.num_rows
        buffer.append(batch)
        emit("advance", {"n": batch.num_rows})
        if (resumed + files) % flush_every == 0:
            flush()

    pending: Outputs | None = None
    for ready in plane:
        launched = launch(predictor, ready, runtime, k, settings.embeddings)
        if pending is not None:
            finish(pending)
        pending = launched
    if pending is not None:
        finish(pending)
    flush()
    seconds = time.perf_counter() - start
    join_parts(part_files, out, schema, output_meta(root, predictor, runtime, k, fp))
    remove_parts(parts)
    stats: PlaneStats = plane.stats
    return PredictResult(out, resumed + files, errors, predicted, resumed, seconds, runtime, predictor.name,
                         batch_size, workers, stats.wait_seconds, stats.device_jpegs)


def read_predictions(path: Path):
    """A predictions file as a polars DataFrame in this release's vocabulary (module docstring): `classify dir`'s
    output or `classify eval`'s predictions.parquet, of this release or the previous one (old names renamed)."""
    import polars as pl

    return pl.from_arrow(current_names(pq.read_table(path)))
