"""One embedding pass over a folder, cached by file content so that reruns compute only what is new.

Decoding (and the integrity check, hashes and fingerprints that come with it) runs on the batched data plane
(`curator.embedding.dataplane`, the one `classify dir` uses) with the model's own preprocessing
(`curator.embedding.preprocess`); the model runs batched in the main process, channels_last under
`torch.inference_mode`. Each computed batch is appended to the cache at once, so an interrupted run loses at most the
batch in flight.

The feature of an image is the concatenation of named parts (see `Backbone.feature_layout`):
- `pooled`: the backbone's final globally pooled vector (1280 wide for lite0);
- `stats`: mean and standard deviation over space of every feature stage the model exposes ("style statistics",
  1024 wide for lite0), which describe texture and brushwork rather than objects;
- `gram` (only where the backbone was loaded with `gram=True`, as `classify train` does): the centred channel Gram
  matrices of the middle stages, signed-square-rooted, upper triangles (7,448 wide for lite0): which channels fire
  together, the second-order style statistics; +2 to +4 points of artist-disjoint probe accuracy on wikiart-dev.
`EMBEDDING_PARTS` names the parts that downstream stages use as "the embedding", chosen by measurement
(bench/feature_choice.py, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from curator.core.atomic import atomic_path
from curator.core.errors import UsageError
from curator.core.hashing import Fingerprint, fingerprint
from curator.core.images import FileInfo, ReadPolicy, decode_bytes, read_source
from curator.core.progress import Event, advance
from curator.core.runtime import Runtime
from curator.core.store import RecordStore, set_aside, sha_array
from curator.embedding import preprocess as preprocessing
from curator.embedding.backbones import Backbone, gram_indices, stats_indices

if TYPE_CHECKING:
    from curator.embedding.dataplane import Item

EMBEDDING_PARTS = ("pooled", "stats")
#: The CPU batch (`curator.embedding.dataplane.BATCH_SIZE`); `embed_files` picks it by device when given None.
DEFAULT_BATCH_SIZE = 64



def pixel_scale(mean: Sequence[float], std: Sequence[float],
                device=None) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: F821
    """The model's normalisation in uint8 units, as (1, 3, 1, 1) tensors: a batch is `(pixels - mean) / std`."""
    import torch

    def as_tensor(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(list(values), device=device).view(1, 3, 1, 1) * 255.0

    return as_tensor(mean), as_tensor(std)


def parse_layout(raw, dim: int) -> dict[str, tuple[int, int]] | None:
    """A feature layout from JSON ({name: [start, end]}), or None when it is not one that tiles [0, dim) exactly
    (so that a hand-edited or foreign layout cannot make a reader slice the wrong columns). `{}` means unknown."""
    if not isinstance(raw, dict):
        return None
    layout = {}
    for name, span in raw.items():
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            return None
        layout[str(name)] = (int(span[0]), int(span[1]))
    spans = sorted(layout.values())
    if spans and (spans[0][0] != 0 or spans[-1][1] != dim or any(a >= b for a, b in spans)
                  or any(prev[1] != nxt[0] for prev, nxt in zip(spans, spans[1:]))):
        return None
    return layout


def read_cache_meta(meta_path: Path) -> tuple[dict | None, str | None]:
    """An embedding cache's metadata, checked for shape: ({key, dim, layout, record_bytes}, None), or (None, what is
    wrong with it)."""
    try:
        meta = json.loads(Path(meta_path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, "its metadata is not readable JSON"
    if not isinstance(meta, dict):
        return None, "its metadata is not a JSON object"
    dim = meta.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        return None, f"its metadata gives the width as {dim!r}"
    layout = parse_layout(meta.get("layout", {}), dim)
    if layout is None:
        return None, f"its metadata layout does not fit its width {dim}"
    return {"key": meta.get("key"), "dim": dim, "layout": layout, "record_bytes": meta.get("record_bytes")}, None


def meta_mismatch(meta: dict, key: str, dim: int, layout: dict[str, tuple[int, int]] | None,
                  record_bytes: int) -> str | None:
    """What in checked metadata disagrees with the expected key, width, layout and record size, or None."""
    if meta["key"] != key:
        return f"its metadata names backbone key {meta['key']!r}"
    if meta["dim"] != dim:
        return f"its metadata gives width {meta['dim']}, the backbone's features are {dim} wide"
    if layout and meta["layout"] != {k: tuple(v) for k, v in layout.items()}:
        return "its metadata layout is not the backbone's"
    if meta["record_bytes"] is not None and meta["record_bytes"] != record_bytes:
        return f"its metadata gives records of {meta['record_bytes']!r} bytes, expected {record_bytes}"
    return None


class EmbeddingCache:
    """Append-only store of (sha256 of file bytes, float16 feature) records for one backbone key, with a `KEY.json`
    metadata file (key, width, layout, record size). The records live in a `curator.core.store.RecordStore` (`KEY.emb`):
    appending costs O(batch), and `get` reads the rows asked for from a memory map, never the whole matrix. Appends
    are written at once and fsynced every 64 MB and on `flush`/`close`, so an interrupted run loses at most the
    batch in flight (a machine crash: what was appended since the last fsync; see `curator.core.store`).

    Verified, not trusted, on open:
    - metadata that disagrees with the backbone (width, layout, key, record size; unreadable; or a record file with
      no metadata) makes the cache unusable: a writer sets both files aside (`*.unusable-N`, never deleted) and starts
      a fresh cache, with a warning, rather than reading or truncating records of another width;
    - records with a NaN or infinite value are dropped (a writer rewrites the file without them), with a warning:
      they are not in `shas()`, so the next embedding pass computes them again, and `get` never returns them;
    - a torn last record (a run killed mid-write) is cut off by a writer, so appending resumes cleanly.
    Readers (`writable=False`, as `open_cache` makes) never change the files. Warnings collect in `self.warnings`.
    """

    def __init__(self, directory: Path, key: str, dim: int, layout: dict[str, tuple[int, int]] | None = None, *,
                 writable: bool = True):
        self.directory = Path(directory)
        self.key = key
        self.dim = dim
        self.writable = writable
        self.path = self.directory / f"{key}.emb"
        self.meta_path = self.directory / f"{key}.json"
        self.layout = dict(layout or {})
        self.record = np.dtype([("sha", "u1", (32,)), ("vec", "<f2", (dim,))])
        self.warnings: list[str] = []
        if writable:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._verify_meta()
        self._store = RecordStore(self.path, self.record, writable=writable, keep=_finite_records)
        if self._store.dropped:
            action = ("dropped; they will be computed again" if writable
                      else "ignored; run `curator clean` again to recompute them")
            self.warnings.append(f"embedding cache {self.key}: {self._store.dropped} of {self._store.scanned} cached "
                                 f"vectors held NaN or infinite values and were {action}")

    def _verify_meta(self) -> None:
        """Set aside a cache whose metadata is missing, unreadable or disagrees with this backbone; write fresh
        metadata where there is none."""
        if self.meta_path.exists():
            meta, problem = read_cache_meta(self.meta_path)
            if meta is not None:
                problem = meta_mismatch(meta, self.key, self.dim, self.layout, self.record.itemsize)
        else:
            problem = "its records have no metadata file" if self.path.exists() else None
        if problem:
            moved = [set_aside(p).name for p in (self.path, self.meta_path) if p.exists()]
            self.warnings.append(f"embedding cache {self.key} was unusable ({problem}); set aside as "
                                 f"{' and '.join(moved)} in {self.directory} and rebuilt")
        if not self.meta_path.exists():
            meta = {"key": self.key, "dim": self.dim, "layout": self.layout, "record_bytes": self.record.itemsize}
            with atomic_path(self.meta_path) as tmp:
                tmp.write_text(json.dumps(meta, indent=2))

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, sha: str) -> bool:
        return sha in self._store

    def shas(self) -> set[str]:
        """The sha256 of every file with a usable (finite) cached vector."""
        return self._store.shas()

    def append(self, shas: Sequence[str], vectors: np.ndarray) -> None:
        """Persist a batch in O(batch) (written before returning; fsynced every 64 MB and on `flush`). Vectors with
        a NaN or infinite value (after the float16 cast) are not stored, with a warning: their shas stay uncached and
        `get` refuses them."""
        if not self.writable:
            raise PermissionError(f"embedding cache {self.key} was opened read-only")
        records = np.empty(len(shas), dtype=self.record)
        records["sha"] = sha_array(shas)
        records["vec"] = vectors.astype(np.float16)
        finite = _finite_records(records)
        if not finite.all():
            self.warnings.append(f"embedding cache {self.key}: the model gave NaN or infinite features for "
                                 f"{int((~finite).sum())} images; not cached")
            records = records[finite]
        self._store.append(records)

    def flush(self) -> None:
        """Make every appended vector durable (fsync)."""
        self._store.flush()

    def close(self) -> None:
        """fsync and close the file (a later `append` reopens it)."""
        self._store.close()

    def missing(self, shas: Sequence[str]) -> list[str]:
        """Those of `shas` with no usable cached vector, in order."""
        return self._store.missing(shas)

    def rows(self, shas: Sequence[str]) -> np.ndarray:
        """Record numbers of `shas` in `vectors()`; KeyError naming the first one not cached (or dropped)."""
        return self._store.rows(shas, "embedding")

    def vectors(self) -> np.ndarray:
        """Every record's float16 vector, (records, dim), memory-mapped (read-only, not copied): index it with
        `rows`. Records left out of the index (damaged, or superseded by a later append) are in it too."""
        return self._store.records["vec"]

    def get(self, shas: Sequence[str]) -> np.ndarray:
        """float32 features for `shas`, in order (only these rows are read); raises KeyError naming the first one
        not cached (or dropped as damaged)."""
        return self.reader(shas)(0, len(shas))

    def reader(self, shas: Sequence[str]) -> Callable[[int, int], np.ndarray]:
        """A function giving the float32 features of `shas[start:stop]`, in order, so that N rows can be read a chunk
        at a time; raises KeyError (now) naming the first sha not cached. Rows are read with positioned reads
        (`RecordStore.read`), not through the memory map: a map's pages stay resident once touched
        (4.6 GB at 1M x 2,304), and on current kernels touching a few scattered rows maps most of the file."""
        rows = self.rows(shas)

        def read(start: int, stop: int) -> np.ndarray:
            try:
                return self._store.read(rows[start:stop])["vec"].astype(np.float32)
            except EOFError:
                raise KeyError(f"embedding cache {self.key} is shorter than its index (rewritten meanwhile?)") from None

        return read


def _finite_records(records: np.ndarray) -> np.ndarray:
    """Per record, whether its vector is all finite (float16 bits: an exponent of all ones is an inf or a NaN;
    three times faster than `np.isfinite` on float16)."""
    return ((records["vec"].view(np.uint16) & 0x7C00) != 0x7C00).all(axis=1)


def _cache_dir(workspace: Path) -> Path:
    return Path(workspace) / "cache" / "embeddings"


def cache_for(workspace: Path, backbone: Backbone) -> EmbeddingCache:
    """The workspace's embedding cache for this backbone (weights, preprocessing and feature layout included), opened
    for writing: an unusable one is set aside and rebuilt (see `EmbeddingCache`)."""
    return EmbeddingCache(_cache_dir(workspace), backbone.key, backbone.feature_dim, backbone.feature_layout)


def open_cache(workspace: Path, key: str, layout: dict | None = None) -> EmbeddingCache:
    """An existing cache in `workspace` by backbone key, read-only, with its width and layout read from its metadata.

    The metadata is checked (well-formed, the key it names, and `layout` when given, e.g. the manifest's record of
    the backbone's layout); a cache that fails is refused with a `UsageError` saying to run `curator clean`, which
    rebuilds it, rather than read at a width it was not written with."""
    directory = _cache_dir(workspace)
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", key):
        raise UsageError(f"the manifest names backbone key {key!r}, which is not one atelier writes; run `curator "
                         f"clean` again")
    meta_path = directory / f"{key}.json"
    if not meta_path.is_file():
        raise UsageError(f"no embedding cache for {key} in {directory}; run `curator clean` first")
    meta, problem = read_cache_meta(meta_path)
    if meta is not None:
        expected = parse_layout(layout, meta["dim"]) if layout else None
        record_bytes = np.dtype([("sha", "u1", (32,)), ("vec", "<f2", (meta["dim"],))]).itemsize
        problem = (f"its metadata gives width {meta['dim']}, which the manifest's feature layout does not fit"
                   if layout and expected is None else meta_mismatch(meta, key, meta["dim"], expected, record_bytes))
    if problem:
        raise UsageError(f"the embedding cache {meta_path.with_suffix('.emb')} is unusable ({problem}); run "
                         f"`curator clean` again to rebuild it")
    return EmbeddingCache(directory, key, meta["dim"], meta["layout"], writable=False)


def select_parts(features: np.ndarray, layout: dict[str, tuple[int, int]], parts: Sequence[str]) -> np.ndarray:
    """The columns of `features` that make up the named parts, in order (parts a model lacks are skipped)."""
    chunks = [features[:, layout[p][0]:layout[p][1]] for p in parts if p in layout]
    if not chunks:
        raise ValueError(f"none of the parts {list(parts)} exist; layout has {list(layout)}")
    return np.concatenate(chunks, axis=1)


def embedding_matrix(features: np.ndarray, layout: dict[str, tuple[int, int]],
                     parts: Sequence[str] = EMBEDDING_PARTS) -> np.ndarray:
    """The embedding used for similarity: each part L2-normalised on its own (so no part dominates by scale),
    concatenated, and normalised again."""
    chunks = []
    for part in parts:
        if part in layout:
            x = features[:, layout[part][0]:layout[part][1]]
            chunks.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    if not chunks:
        raise ValueError(f"none of the parts {list(parts)} exist; layout has {list(layout)}")
    joined = np.concatenate(chunks, axis=1)
    return (joined / np.maximum(np.linalg.norm(joined, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def forward_features(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:  # noqa: F821
    """The full feature vector (all layout parts, float32) for a normalised batch."""
    import torch

    model = backbone.model
    indices = stats_indices(model)
    if not indices:
        return model.forward_head(model.forward_features(x), pre_logits=True).float()
    final, intermediates = model.forward_intermediates(x, indices=indices)
    parts = [model.forward_head(final, pre_logits=True).float()]
    for feat in intermediates:
        feat = feat.float()
        parts.append(feat.mean(dim=(2, 3)))
        parts.append(feat.std(dim=(2, 3)))
    if "gram" in backbone.feature_layout:
        parts.extend(gram_part(intermediates[i].float()) for i in gram_indices(model))
    return torch.cat(parts, dim=1)


def gram_part(feat: torch.Tensor) -> torch.Tensor:  # noqa: F821
    """(N, C, H, W) to (N, C(C+1)/2): the upper triangle of the centred channel covariance over space, with a
    signed square root so that a few strong co-activations do not drown the rest."""
    import torch

    with torch.autocast(device_type=feat.device.type, enabled=False):  # sums over H*W positions: keep fp32
        flat = feat.float().flatten(2)
        flat = flat - flat.mean(dim=2, keepdim=True)
        gram = flat @ flat.transpose(1, 2) / flat.shape[2]
    rows, cols = torch.triu_indices(gram.shape[1], gram.shape[1], device=gram.device)
    upper = gram[:, rows, cols]
    # the epsilon bounds the gradient at zero when stage 2 fine-tunes through this part
    return torch.sign(upper) * torch.sqrt(upper.abs() + 1e-6)


@dataclass(frozen=True)
class CleanWork:
    """One file to `Item((FileInfo, Fingerprint or None), pixels or None)` for `curator clean`: read through the
    policy, hashed, judged, fingerprinted, and preprocessed only when its embedding is not cached. Both engines run
    it: the data plane's workers (`embed_files`) and Ray's decode tasks (`curator.embedding.ray_embed`).

    `known` (verdict and fingerprint by sha256, from the previous manifest) spares the decoding of files whose
    verdict is known and whose embedding is cached (or which were not images)."""

    preprocess: preprocessing.Preprocess
    cached: frozenset[str]
    known: dict[str, tuple[FileInfo, Fingerprint | None]]
    policy: ReadPolicy

    def __call__(self, path: Path, ctx) -> Item:
        from curator.embedding.dataplane import Item

        data, row = read_source(path, self.policy)
        if row is not None:
            return Item((row.info, None))
        sha = hashlib.sha256(data).hexdigest()
        prior, prior_print = self.known.get(sha, (None, None))
        if prior is not None and (not prior.ok or (sha in self.cached and prior_print is not None)):
            return Item((_with_path(prior, path, len(data)), prior_print))
        decoded = decode_bytes(path, data, self.preprocess.draft_size)
        if not decoded.info.ok:
            return Item((decoded.info, None))
        prints = fingerprint(decoded.image)
        if sha in self.cached:
            return Item((decoded.info, prints))
        return Item((decoded.info, prints), self.preprocess.pixels(decoded.image))


def _with_path(info: FileInfo, path: Path, size: int) -> FileInfo:
    return FileInfo(path, info.sha256, size, info.width, info.height, info.format, info.mode, info.status, info.reason)


@dataclass(frozen=True)
class EmbedReport:
    """What the pass did: every file's info and fingerprint in input order, embeddings computed or reused, timings
    (`wait_seconds`: how long the model waited for decoded batches)."""

    infos: list[FileInfo]
    fingerprints: list[Fingerprint | None]
    computed: int
    reused: int
    seconds: float
    model_seconds: float
    wait_seconds: float = 0.0
    workers: int = 0

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    @property
    def wait_share(self) -> float:
        """The share of the pass's wall time the model waited for data (near 1: bound by decoding)."""
        return min(1.0, self.wait_seconds / self.seconds) if self.seconds > 0 else 0.0


def place_backbone(backbone: Backbone,
                   runtime: Runtime) -> tuple[preprocessing.Preprocess, torch.Tensor, torch.Tensor]:  # noqa: F821
    """Move the backbone's model to the runtime's device (in place, channels_last) and return its preprocessing and
    its normalisation on that device (`pixel_scale`): what `embed_pixels` needs, for either engine."""
    import torch

    preprocess = preprocessing.Preprocess.from_data_config(backbone.data_config)
    device = torch.device(runtime.device)
    backbone.model.to(device).to(memory_format=torch.channels_last)  # in place: modules move themselves
    mean, std = pixel_scale(preprocess.mean, preprocess.std, device)
    return preprocess, mean, std


def embed_pixels(backbone: Backbone, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,  # noqa: F821
                 runtime: Runtime) -> np.ndarray:
    """float32 features (n, feature_dim) of a uint8 batch (n, 3, H, W) on the model's device: normalised, channels_last,
    under inference mode and the runtime's autocast; the one model step of the embedding pass, whichever engine."""
    import torch

    x = pixels.float().sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)
    device_type = torch.device(runtime.device).type
    with torch.inference_mode(), torch.autocast(device_type, dtype=runtime.torch_dtype, enabled=runtime.autocast):
        feats = forward_features(backbone, x)
    return feats.float().cpu().numpy()


def default_workers(device: str | None = None) -> int:
    """Decode workers for a device (see `curator.embedding.dataplane.default_workers`): cores - 1 on CUDA, 1 on a CPU."""
    from curator.embedding.dataplane import default_workers as by_device

    return by_device(device)


def embed_files(paths: Sequence[Path], backbone: Backbone, cache: EmbeddingCache, runtime: Runtime, *,
                batch_size: int | None = None, workers: int | None = None,
                known: dict[str, tuple[FileInfo, Fingerprint | None]] | None = None,
                events: Event | None = None, policy: ReadPolicy = ReadPolicy()) -> EmbedReport:
    """Judge and fingerprint every file, and make sure every ok image's features are in `cache`.

    Decoding runs on the batched data plane (`curator.embedding.dataplane`, the one `classify dir` uses) with the
    backbone's preprocessing (`curator.embedding.preprocess.Preprocess`). `known` maps sha256 to an earlier verdict and
    fingerprint (from a previous manifest): such files are hashed but not decoded again when their embedding is cached
    too. Files are read through `policy` (regular files only, a size cap, links leaving its root not followed).
    `batch_size` and `workers` left as None are chosen by device (and no worker processes for a handful of files).
    """
    import torch

    from curator.embedding.dataplane import DataPlane, choose_workers, chunked, default_batch_size

    batch_size = default_batch_size(runtime.device) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    paths = list(paths)
    workers = choose_workers(workers, runtime.device, len(paths))
    preprocess, mean, std = place_backbone(backbone, runtime)
    device = torch.device(runtime.device)
    work = CleanWork(preprocess, frozenset(cache.shas()), known or {}, policy)
    plane = DataPlane(partial(chunked, range(len(paths)), batch_size), _Indexed(paths, work),
                      (3, preprocess.crop, preprocess.crop), device=device, workers=workers)
    infos: list[FileInfo | None] = [None] * len(paths)
    prints: list[Fingerprint | None] = [None] * len(paths)
    pending_shas: list[str] = []
    pending_pixels: list[torch.Tensor] = []
    computed = 0
    model_seconds = 0.0
    queued: set[str] = set()

    def run_model(shas: list[str], pixels: torch.Tensor) -> None:
        nonlocal computed, model_seconds
        t0 = time.perf_counter()
        cache.append(shas, embed_pixels(backbone, pixels, mean, std, runtime))
        model_seconds += time.perf_counter() - t0
        computed += len(shas)

    start = time.perf_counter()
    for ready in plane:
        for index, info, prints_ in ready.meta:
            infos[index] = info
            prints[index] = prints_
        new = []
        for row, pos in enumerate(ready.positions):
            sha = ready.meta[pos][1].sha256
            if sha not in queued:  # identical files in one run are embedded once
                queued.add(sha)
                new.append(row)
        if new:
            pending_shas.extend(ready.meta[ready.positions[r]][1].sha256 for r in new)
            pending_pixels.append(ready.pixels[new] if len(new) != len(ready.positions) else ready.pixels)
        while len(pending_shas) >= batch_size:
            stacked = torch.cat(pending_pixels)
            run_model(pending_shas[:batch_size], stacked[:batch_size])
            pending_shas = pending_shas[batch_size:]
            pending_pixels = [stacked[batch_size:]] if pending_shas else []
        advance(events, len(ready.meta))
    if pending_shas:
        run_model(pending_shas, torch.cat(pending_pixels))
    elapsed = time.perf_counter() - start
    ok = sum(1 for info in infos if info is not None and info.ok)
    reused = ok - computed
    return EmbedReport(infos, prints, computed, max(reused, 0), elapsed, model_seconds, plane.stats.wait_seconds,
                       workers)


@dataclass(frozen=True)
class _Indexed:
    """The work on `paths[index]`, with the index in front of the metadata (so rows land in input order)."""

    paths: Sequence[Path]
    work: CleanWork

    def __call__(self, index: int, ctx) -> Item:
        item = self.work(self.paths[index], ctx)
        item.meta = (index, *item.meta)
        return item
