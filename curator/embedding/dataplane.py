"""The batched data plane: files in, uint8 batches on the model's device out, for `classify dir` and `curator clean`.

Batches, not images, cross process boundaries. The caller supplies the per-file work (a `Work`: read through
`curator.core.images.read_source`, judge, decode, preprocess with `curator.embedding.preprocess.Preprocess`) and a
function that lists the inputs in batches. Decode workers (DataLoader worker processes over an `IterableDataset`; worker
k of W takes batches k, k+W, ..., which the DataLoader hands back in order) each fill ONE contiguous uint8 array
(n, 3, H, W) per batch, allocated in shared memory, plus a small list of per-row metadata (whatever the work returns:
path, error, file info...). So a batch costs one shared-memory transfer and, on CUDA, one pin, not one per image.

On CUDA a staging thread copies each batch to the GPU on a side stream while the model runs on the previous one
(`Ready.pixels` is on the device; the model's stream waits on an event, never on a copy), and, with device JPEG decoding
on (opt-in: `classify dir --gpu-decode`, which says why), hands JPEG bytes to
`curator.embedding.gpu_decode.decode_batch`: workers read each file and run `jpeg_precheck` (the safe loader's header
checks) on the CPU; what passes travels as bytes (one shared buffer per batch) and nvjpeg decodes it in batches; a file
it rejects goes back to the CPU loader (the work, run again), which gives the reason. Workers decode everything else,
and keep a share of the JPEGs for themselves: the staging thread moves that share until the workers just keep up (the
GPU decodes the rest, and runs the model).

`PlaneStats` says where the time went: `wait_share` is the share of the consumer's wall time spent waiting for the
next batch (near 1: bound by decoding; near 0: bound by the model).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from curator.core.images import Decoded, decode_bytes
from curator.embedding.preprocess import Preprocess

#: Batch sizes by device. CPU: on the 2-core machine, lite0 model-only (fp32, allocator fix) ran 84.6 images/s at
#: batch 64 and 84.7 at 32 when the machine was otherwise idle, and 26.6 against 18.0 while other jobs shared its
#: cores (OpenMP synchronises once per layer, so fewer, larger batches lose less), so 64. CUDA: on an H100, 256 is
#: where lite0 fp16 reaches its ceiling (issue 15: 19,700 images/s, 15,000 at 64).
BATCH_SIZE = {"cpu": 64, "cuda": 256}
#: A folder with at most this many files (after resume) is decoded in the main process: starting worker processes
#: costs more than it saves on one batch.
SMALL_RUN = 64


def default_batch_size(device: str) -> int:
    """The model batch for a device ("cpu", "cuda", or "auto": CUDA when one is available)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return BATCH_SIZE["cuda" if str(device).startswith("cuda") else "cpu"]


def default_workers(device: str | None = None) -> int:
    """Decode worker processes for a device: on CUDA one per core but the main process's (no cap: the GPU takes
    all they decode); on a CPU one per four cores, at least one, since there the model is the bottleneck (on the
    2-core machine one worker beat none by 16% on 1,600-px JPEGs and tied on 224-px paintings, docs/BENCHMARKS.md;
    larger CPUs were not measured). `None`: CUDA when one is available."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cores = _cores()
    if str(device).startswith("cuda"):
        return max(1, cores - 1)
    return max(1, cores // 4)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


def choose_workers(requested: int | None, device: str, files: int | None) -> int:
    """`requested` when given; else none for a small run (`SMALL_RUN` files or fewer), else `default_workers`."""
    if requested is not None:
        return requested
    if files is not None and files <= SMALL_RUN:
        return 0
    return default_workers(device)


@dataclass
class Item:
    """What the per-file work gives for one input: row metadata (any picklable value), and either the model's input
    pixels (uint8 CHW, decoded on the CPU), or the file's JPEG bytes for the device decoder, or neither (an error
    row, or nothing to compute)."""

    meta: Any
    pixels: np.ndarray | None = None
    jpeg: bytes | None = None


class Context:
    """What the plane tells the per-file work: whether JPEGs may go to the device decoder, and which of them.

    `cpu_share` is the fraction of device-eligible JPEGs the worker decodes itself; it is read from a shared value
    the main process adjusts (adaptive) or fixed. Deterministic for a fixed share: every 1/(1-share)-th file."""

    def __init__(self, device_jpegs: bool = False, cpu_share: float | Any = 0.0):
        self.device_jpegs = device_jpegs
        self._share = cpu_share
        self._credit = 0.0

    @property
    def cpu_share(self) -> float:
        share = self._share if isinstance(self._share, float) else float(self._share.value)
        return min(1.0, max(0.0, share))

    def take_jpeg(self) -> bool:
        """True when this device-eligible JPEG goes to the device decoder, False when the worker decodes it."""
        if not self.device_jpegs:
            return False
        self._credit += 1.0 - self.cpu_share
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False


#: The context of the CPU loader: everything decoded on the CPU (also what a file the device decoder refused gets).
CPU_ONLY = Context(False)


class Work(Protocol):
    """The per-file work: an input (e.g. a path) to an `Item`. It must read through `read_source` and never raise
    for a bad file (the error goes into the metadata)."""

    def __call__(self, item: Any, ctx: Context) -> Item: ...


def decode_routed(path: Path, data: bytes, preprocess: Preprocess, ctx: Context) -> Decoded | None:
    """The CPU loader's verdict on `data` (decoded when ok), or None when the bytes go to the device decoder: a
    JPEG the header checks (`curator.embedding.gpu_decode.jpeg_precheck`) pass, when `ctx` routes it there."""
    if ctx.device_jpegs:
        from curator.embedding.gpu_decode import jpeg_precheck

        row = jpeg_precheck(path, data, preprocess)
        if row is None:
            if ctx.take_jpeg():
                return None
        elif not row.info.ok or row.image is not None:
            return row
    return decode_bytes(path, data, preprocess.draft_size)


@dataclass
class Batch:
    """One batch as a worker hands it over: row metadata in input order, the CPU-decoded pixels (one contiguous
    uint8 tensor, rows `positions`), and the bytes of JPEGs left to the device decoder (one uint8 tensor, file i
    at `jpeg_offsets[i]:jpeg_offsets[i+1]`, rows `jpeg_positions`, inputs `jpeg_inputs` for the CPU fallback)."""

    index: int
    meta: list
    pixels: torch.Tensor
    positions: np.ndarray
    jpeg_data: torch.Tensor | None = None
    jpeg_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    jpeg_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    jpeg_inputs: list = field(default_factory=list)
    seconds: float = 0.0

    def pin_memory(self) -> Batch:
        """The DataLoader's pin thread calls this: one pin per batch."""
        self.pixels = self.pixels.pin_memory()
        return self


@dataclass
class Ready:
    """A batch for the model: metadata in input order (rows the CPU fallback judged updated), and uint8 pixels
    (n, 3, H, W) on the model's device, where `pixels[j]` belongs to `meta[positions[j]]`."""

    meta: list
    pixels: torch.Tensor
    positions: np.ndarray
    event: Any = None


@dataclass
class PlaneStats:
    """Counters of one pass: batches, files, JPEGs the device decoded, fallbacks to the CPU loader, and the time
    the consumer spent waiting for batches against its wall time."""

    batches: int = 0
    files: int = 0
    device_jpegs: int = 0
    fallbacks: int = 0
    wait_seconds: float = 0.0
    wall_seconds: float = 0.0
    worker_seconds: float = 0.0
    workers: int = 0
    cpu_jpeg_share: float | None = None

    @property
    def wait_share(self) -> float:
        """The share of wall time the model waited for data: near 1 means bound by decoding, near 0 by the model."""
        return self.wait_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def bound(self) -> str:
        return "decoding" if self.wait_share >= 0.5 else "model"


def _empty(shape: Sequence[int], shared: bool) -> torch.Tensor:
    """A uint8 tensor, in shared memory when it will cross to another process (so sending it copies nothing)."""
    if not shared:
        return torch.empty(tuple(shape), dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(max(1, math.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage)[: math.prod(shape)].view(tuple(shape))


def assemble(index: int, inputs: Sequence, work: Work, ctx: Context, shape: tuple[int, int, int],
             shared: bool = False) -> Batch:
    """Run `work` on each input and pack the results into one `Batch`: pixels written straight into one contiguous
    array as they come, JPEG bytes concatenated into one buffer."""
    start = time.perf_counter()
    pixels = _empty((len(inputs), *shape), shared)
    view = pixels.numpy()
    meta, positions, jpegs, jpeg_positions, jpeg_inputs = [], [], [], [], []
    for i, x in enumerate(inputs):
        item = work(x, ctx)
        meta.append(item.meta)
        if item.pixels is not None:
            if item.pixels.shape != shape:
                raise ValueError(f"the work gave pixels of shape {item.pixels.shape}, expected {shape}")
            view[len(positions)] = item.pixels
            positions.append(i)
        elif item.jpeg is not None:
            jpegs.append(item.jpeg)
            jpeg_positions.append(i)
            jpeg_inputs.append(x)
    batch = Batch(index, meta, pixels[: len(positions)], np.asarray(positions, dtype=np.int64))
    if jpegs:
        offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(j) for j in jpegs])
        data = _empty((int(offsets[-1]),), shared)
        flat = data.numpy()
        for j, blob in enumerate(jpegs):
            flat[offsets[j]:offsets[j + 1]] = np.frombuffer(blob, dtype=np.uint8)
        batch.jpeg_data, batch.jpeg_offsets = data, offsets
        batch.jpeg_positions, batch.jpeg_inputs = np.asarray(jpeg_positions, dtype=np.int64), jpeg_inputs
    batch.seconds = time.perf_counter() - start
    return batch


class _Stream(torch.utils.data.IterableDataset):
    """The batches of `chunks()`, assembled; worker k of W assembles batches k, k+W, ..."""

    def __init__(self, chunks: Callable[[], Iterable[Sequence]], work: Work, ctx: Context,
                 shape: tuple[int, int, int]):
        self.chunks = chunks
        self.work = work
        self.ctx = ctx
        self.shape = shape

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i, inputs in enumerate(self.chunks()):
            if i % workers == worker:
                yield assemble(i, inputs, self.work, self.ctx, self.shape, shared=info is not None)


def _identity(batch: Batch) -> Batch:
    return batch


class _End:
    pass


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """`items` in lists of `size` (the last one shorter)."""
    batch: list = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class DataPlane:
    """Iterate `Ready` batches: `chunks()` lists the inputs in batches (called once per worker, so it must give the
    same sequence each time), `work` turns one input into an `Item`, `shape` is the pixels' (3, H, W).

    `device_jpegs`: JPEGs that pass the header checks go to `curator.embedding.gpu_decode.decode_batch` on `device`
    (which may be "cpu": how the CPU tests run that path). `cpu_jpeg_share`: the share of those the workers decode
    themselves; None adapts it when staging (0 otherwise). `staged`: stage batches in a background thread
    (default: on CUDA, where it overlaps copies and device decoding with the model; the tests run it on a CPU).
    Statistics are in `self.stats` as the iteration goes."""

    def __init__(self, chunks: Callable[[], Iterable[Sequence]], work: Work, shape: tuple[int, int, int], *,
                 device: str | torch.device = "cpu", workers: int = 0, preprocess: Preprocess | None = None,
                 device_jpegs: bool = False, cpu_jpeg_share: float | None = None, prefetch: int = 2,
                 staged: bool | None = None):
        if device_jpegs and preprocess is None:
            raise ValueError("device JPEG decoding needs the preprocessing")
        self.chunks = chunks
        self.work = work
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.workers = workers
        self.preprocess = preprocess
        self.device_jpegs = device_jpegs
        self.prefetch = prefetch
        self.cuda = self.device.type == "cuda"
        self.staged = self.cuda if staged is None else staged
        self.adaptive = device_jpegs and cpu_jpeg_share is None and self.staged
        start_share = 0.25 if self.adaptive else float(cpu_jpeg_share or 0.0)
        if self.adaptive and workers > 0:
            import multiprocessing

            self._share: Any = multiprocessing.RawValue("d", start_share)
        else:
            self._share = _Box(start_share)
        self.ctx = Context(device_jpegs, self._share if self.adaptive else start_share)
        self.stats = PlaneStats(workers=workers, cpu_jpeg_share=start_share if device_jpegs else None)

    def _loader(self) -> Iterable[Batch]:
        dataset = _Stream(self.chunks, self.work, self.ctx, self.shape)
        if self.workers == 0 and not self.cuda:
            return iter(dataset)
        return iter(torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.workers, collate_fn=_identity, pin_memory=self.cuda,
            prefetch_factor=self.prefetch if self.workers else None, persistent_workers=False,
            generator=torch.Generator()))  # its own: worker seeds never draw from the caller's global RNG

    def _device_decode(self, batch: Batch, meta: list) -> tuple[list[torch.Tensor], list[np.ndarray]]:
        """Decode the batch's JPEG bytes on the device; files it refuses go through the CPU loader (the work with
        `CPU_ONLY`), whose row replaces theirs."""
        from curator.embedding.gpu_decode import decode_batch

        offsets, flat = batch.jpeg_offsets, batch.jpeg_data.numpy()
        datas = [flat[offsets[j]:offsets[j + 1]].tobytes() for j in range(len(offsets) - 1)]
        pixels, ok, failed = decode_batch(datas, self.preprocess, self.device, prechecked=True)  # by the workers
        parts, positions = [], []
        if len(ok):
            parts.append(pixels)
            positions.append(batch.jpeg_positions[np.asarray(ok, dtype=np.int64)])
        rescued, rescued_at = [], []
        for j in failed:
            item = self.work(batch.jpeg_inputs[j], CPU_ONLY)
            at = int(batch.jpeg_positions[j])
            meta[at] = item.meta
            if item.pixels is not None:
                rescued.append(item.pixels)
                rescued_at.append(at)
        if rescued:
            parts.append(torch.from_numpy(np.stack(rescued)).to(self.device))
            positions.append(np.asarray(rescued_at, dtype=np.int64))
        self.stats.device_jpegs += len(ok)
        self.stats.fallbacks += len(failed)
        return parts, positions

    def _stage(self, batch: Batch) -> Ready:
        """A worker's batch to a `Ready` one: pixels to the device (asynchronously from pinned memory on CUDA),
        JPEG bytes decoded there."""
        meta = list(batch.meta)
        parts = [batch.pixels.to(self.device, non_blocking=True)] if len(batch.pixels) else []
        positions = [batch.positions] if len(batch.pixels) else []
        if batch.jpeg_data is not None and len(batch.jpeg_positions):
            more, at = self._device_decode(batch, meta)
            parts += more
            positions += at
        if not parts:
            pixels = torch.empty((0, *self.shape), dtype=torch.uint8, device=self.device)
        else:
            pixels = parts[0] if len(parts) == 1 else torch.cat(parts)
        order = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
        self.stats.batches += 1
        self.stats.files += len(meta)
        self.stats.worker_seconds += batch.seconds
        return Ready(meta, pixels, order)

    def _on_side_stream(self, stream):
        """The staging thread's CUDA context: the plane's device and its side stream (nothing on a CPU)."""
        if stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(stream))
        return stack

    def _staged_in_thread(self, batches: Iterator[Batch]) -> Iterator[Ready]:
        """Stage batches in a thread, up to `prefetch` ahead, on a side stream on CUDA, so that copies and device
        decoding overlap the model; each `Ready` carries the event the model's stream waits on."""
        stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        ready: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def put(obj) -> bool:
            while not stop.is_set():
                try:
                    ready.put(obj, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                with self._on_side_stream(stream):
                    last = time.perf_counter()
                    for batch in batches:
                        got = time.perf_counter()
                        staged = self._stage(batch)
                        if stream is not None:
                            staged.event = torch.cuda.Event()
                            staged.event.record(stream)
                        if not put(staged):
                            return
                        now = time.perf_counter()
                        self._adapt(got - last, now - last)
                        last = now
                put(_End())
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                put(_Failed(exc))

        thread = threading.Thread(target=produce, name="dataplane-stage", daemon=True)
        thread.start()
        try:
            while True:
                got = ready.get()
                if isinstance(got, _End):
                    return
                if isinstance(got, _Failed):
                    raise got.exc
                if got.event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(got.event)
                    got.pixels.record_stream(current)  # the allocator must not reuse it before the model is done
                yield got
        finally:
            stop.set()
            thread.join(timeout=5)

    def _adapt(self, waited: float, period: float) -> None:
        """Move the workers' share of JPEGs after each staged batch: down (more to the device) when staging waited
        for the workers, up (the device decodes less, so the model has more of it) when it did not. It settles where
        the workers just keep up."""
        if not self.adaptive or period <= 0:
            return
        share = self._share.value + (-0.02 if waited > 0.1 * period else 0.02)
        self._share.value = min(1.0, max(0.0, share))
        self.stats.cpu_jpeg_share = self._share.value

    def __iter__(self) -> Iterator[Ready]:
        start = time.perf_counter()
        source = self._loader()
        staged = self._staged_in_thread(source) if self.staged else (self._stage(b) for b in source)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(staged)
                except StopIteration:
                    return
                self.stats.wait_seconds += time.perf_counter() - t0
                yield batch
        finally:
            if hasattr(staged, "close"):
                staged.close()
            self.stats.wall_seconds = time.perf_counter() - start


class _Box:
    """A plain holder with `.value`, like a shared value, for a share that never leaves this process."""

    def __init__(self, value: float):
        self.value = value
