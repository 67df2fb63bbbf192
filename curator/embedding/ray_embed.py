"""`--engine ray`: the embedding pass of `curator clean` on Ray Data, and the Ray plumbing `classify dir --engine ray`
(`classify.ray_engine`) shares with it.

Ray Data's offline batch-inference pattern, with atelier's own per-file work and model step:
- the file list goes to the cluster in shards, one small Arrow table (key columns and the path) per shard, each put in
  the object store as the listing streams by (`put_shards`), so that `classify dir`'s driver never holds every path
  at once (`curator clean` keeps its list anyway, for the stages after this one);
- decode and preprocess run in CPU tasks (`map_batches` over `DecodeBatch`): the local engine's per-file work
  (`curator.embedding.embed.CleanWork` here, `classify.predict`'s for `classify dir`), so every file is read through
  `curator.core.images.read_source` with the ReadPolicy, judged by the safe loader and preprocessed by
  `curator.embedding.preprocess.Preprocess`, with the same error rows;
- the model runs in an actor pool (`ActorPoolStrategy(size=concurrency)`, `num_gpus` per actor when the cluster has
  GPUs): one model per actor, loaded once by the driver with the local engine's loader and shipped through the object
  store, so the weights need not be on the nodes;
- results stream back to the driver (`iter_batches`), which fills the embedding cache (here) or writes the Parquet
  parts (`classify dir`). The later stages of `curator clean` run on the driver, on the arrays in the cache.
Ray retries a task whose actor died (Ray Data restarts map actors and retries their tasks); rows already received are
kept once, by key.

What scales with what: decode tasks with the cluster's CPUs (one CPU each), model actors with its GPUs (or, without
GPUs, with half its CPUs). Every node must see the files at the same path as the driver (a shared file system) and
run the driver's environment (atelier installed, e.g. one container image, or `ray job submit --runtime-env-json`).

Ray is an optional extra (`pip install 'atelier[ray]'`), imported only in this module and `classify.ray_engine`, and
only when `--engine ray` runs (`require_ray`).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa

from curator.core.errors import AtelierError, SettingsError, UsageError
from curator.core.images import MAX_PIXELS, FileInfo, ReadPolicy
from curator.core.progress import Event, advance
from curator.core.runtime import Runtime, select_runtime

ENGINES = ("local", "ray")
INSTALL_HINT = "--engine ray needs the ray extra: pip install 'atelier[ray]'"
#: Files per shard of the listing (one block of the Ray dataset, one decode task).
SHARD_FILES = 2048
_ADDRESS = re.compile(r"auto|ray://\S+|[A-Za-z0-9_.\-\[\]:]+:\d{1,5}")


def check_engine(engine: str) -> str:
    """`engine` when it is one atelier has (local, ray), else a one-line UsageError."""
    if engine not in ENGINES:
        raise UsageError(f"unknown --engine {engine!r}; expected local or ray")
    return engine


def engine_settings(engine: str, address: str | None = None, num_gpus_per_worker: float | None = None,
                    concurrency: int | None = None) -> RaySettings | None:
    """The CLIs' engine options checked, before anything is read or written: RaySettings for `--engine ray` (Ray
    must be installed), None for the local engine, which refuses the Ray options rather than ignore them."""
    if check_engine(engine) == "ray":
        require_ray()
        return RaySettings(address, num_gpus_per_worker, concurrency)
    given = [name for name, value in (("--address", address), ("--num-gpus-per-worker", num_gpus_per_worker),
                                      ("--concurrency", concurrency)) if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --engine ray; add "
                         f"--engine ray or leave {'it' if len(given) == 1 else 'them'} out")
    return None


def refuse_local_options(workers: int | None = None, gpu_decode: bool | None = None) -> None:
    """The local engine's data-plane options mean nothing on Ray: refused in one line, never silently ignored."""
    if workers is not None:
        raise UsageError("--workers sets the local engine's decode processes; with --engine ray, decoding runs in Ray "
                         "tasks on every free CPU of the cluster: leave --workers out")
    if gpu_decode:
        raise UsageError("--gpu-decode is the local engine's; with --engine ray, JPEGs are decoded in the CPU tasks: "
                         "leave it out")


def require_ray() -> ModuleType:
    """The `ray` module with Ray Data, or a one-line UsageError saying how to install the extra."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra is ray[data]; core Ray alone cannot run the pipeline
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide the Ray engine runs. `address` None starts a local Ray on this machine (or uses the one
    this process is already connected to, or RAY_ADDRESS, as under `ray job submit`); `auto`, `ray://HOST:PORT` or
    `HOST:PORT` connect to a running cluster. `num_gpus_per_worker` None: 1 when the cluster has GPUs, else 0;
    `concurrency` None: one model actor per `num_gpus_per_worker` GPUs, or half the CPUs on a cluster without."""

    address: str | None = None
    num_gpus_per_worker: float | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.address is not None and not _ADDRESS.fullmatch(self.address):
            raise SettingsError(f"--address must be auto, ray://HOST:PORT or HOST:PORT, got {self.address!r}")
        gpus = self.num_gpus_per_worker
        if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
            raise SettingsError(f"--num-gpus-per-worker must be 0 or more, got {gpus}")
        if self.concurrency is not None and self.concurrency < 1:
            raise SettingsError(f"--concurrency must be at least 1 model actor, got {self.concurrency}")


@dataclass(frozen=True)
class Cluster:
    """What the connected cluster offers, in total."""

    cpus: int
    gpus: float


@dataclass(frozen=True)
class Plan:
    """The model actor pool: how many actors, the GPUs each holds, and the device they run on."""

    concurrency: int
    num_gpus: float
    device: str  # "cuda" or "cpu"


def plan_pool(cluster: Cluster, settings: RaySettings, device: str) -> Plan:
    """The actor pool for `device` (auto, cpu, cuda) on `cluster`, or a one-line UsageError for one that could never
    be scheduled (Ray would wait for it forever)."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; expected auto, cpu or cuda")
    asked = settings.num_gpus_per_worker
    if device == "cpu":
        if asked:
            raise UsageError(f"--device cpu and --num-gpus-per-worker {asked:g} contradict each other; choose one")
        gpus = 0.0
    elif asked is not None:
        gpus = asked
    else:
        gpus = 1.0 if cluster.gpus > 0 else 0.0
    if device == "cuda" and gpus == 0:
        raise UsageError("--device cuda with --num-gpus-per-worker 0: the model actors would have no GPU; "
                         "leave --num-gpus-per-worker out or use --device cpu")
    if gpus > 0 and cluster.gpus < gpus:
        raise UsageError(f"the model actors need {gpus:g} GPU each, but the Ray cluster has {cluster.gpus:g} GPUs "
                         f"({cluster.cpus} CPUs); pass --num-gpus-per-worker 0 to run the model on CPUs")
    concurrency = settings.concurrency or (max(1, int(cluster.gpus // gpus)) if gpus else max(1, cluster.cpus // 2))
    if gpus and concurrency * gpus > cluster.gpus + 1e-9:
        raise UsageError(f"--concurrency {concurrency} x --num-gpus-per-worker {gpus:g} needs "
                         f"{concurrency * gpus:g} GPUs; the Ray cluster has {cluster.gpus:g}")
    if concurrency >= cluster.cpus:
        raise UsageError(f"--concurrency {concurrency} model actors (one CPU each) leave none of the cluster's "
                         f"{cluster.cpus} CPUs for decoding; use at most {max(1, cluster.cpus - 1)}")
    return Plan(concurrency, gpus, "cuda" if gpus else "cpu")


def actor_runtime(plan: Plan, dtype: str) -> Runtime:
    """The runtime the model actors will resolve (checked here first, so that a bad --dtype is said at once)."""
    return select_runtime(plan.device, dtype, cuda_available=plan.device == "cuda")


@contextmanager
def _quiet(ray: ModuleType) -> Iterator[None]:
    """No progress bars or INFO logs from Ray Data while it runs (the CLIs draw their own progress); restored after."""
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.enable_operator_progress_bars
    loggers = {name: logging.getLogger(name).level for name in ("ray", "ray.data")}
    context.enable_progress_bars = context.enable_operator_progress_bars = False
    for name in loggers:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # failures are said in one line by `ray_errors`
    try:
        yield
    finally:
        context.enable_progress_bars, context.enable_operator_progress_bars = saved
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)


@contextmanager
def ray_session(settings: RaySettings) -> Iterator[Cluster]:
    """Connected to Ray for the block: this process's existing connection, else `settings.address` (None: a local
    Ray, or RAY_ADDRESS). A Ray this call started is shut down after it; a connection it found is left as it was.
    A cluster that cannot be reached is a one-line UsageError."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        target = settings.address or os.environ.get("RAY_ADDRESS")
        problem = _unreachable(target) if target and target != "auto" else None
        if problem:  # Ray itself would retry for minutes
            raise UsageError(f"cannot reach a Ray cluster at {target}: {problem}")
        loggers = {name: logging.getLogger(name).level for name in ("ray", "ray.data")}
        try:
            ray.init(address=settings.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            where = settings.address or os.environ.get("RAY_ADDRESS") or "this machine"
            raise UsageError(f"cannot start or reach a Ray cluster at {where}: {_first_line(exc)}") from None
        finally:
            for name, level in loggers.items():
                logging.getLogger(name).setLevel(level)
    try:
        resources = ray.cluster_resources()
        with _quiet(ray):
            yield Cluster(int(resources.get("CPU", 0)), float(resources.get("GPU", 0)))
    finally:
        if started:
            ray.shutdown()


def _unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why HOST:PORT (or ray://HOST:PORT) takes no TCP connection within `timeout` seconds; None when it does (or
    when the address has another form, left to Ray)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: The line a traceback ends with, "package.module.SomeError: message": Ray passes a task's exception to the driver
#: as text (Ray Data's wrapper drops the exception object), so that is where the original error is found.
_RAISED = re.compile(r"^(?P<name>[A-Za-z_][\w.]*(?:Error|Exception)): (?P<message>.*)$", re.MULTILINE)


def _raised_remotely(exc: BaseException) -> tuple[str, str] | None:
    """(qualified class name, message) of the first exception a Ray error's traceback text names: the one the task's
    own code raised; None when it names none (an actor that died, a lost node)."""
    found = _RAISED.search(_ANSI.sub("", str(exc)))
    return (found["name"], found["message"]) if found else None


@contextmanager
def ray_errors(what: str, hint: str) -> Iterator[None]:
    """A failure inside the pipeline as one line: an atelier error raised in a task or actor (a bad --dtype on a
    node) is raised here as itself; anything else Ray reports becomes an AtelierError naming `what`, the error, and
    `hint` (what was kept, how to go on)."""
    import curator.core.errors

    ray = require_ray()
    try:
        yield
    except ray.exceptions.RayError as exc:
        raised = _raised_remotely(exc)
        if raised and raised[0].startswith("curator.core.errors."):
            kind = getattr(curator.core.errors, raised[0].rsplit(".", 1)[1], AtelierError)
            raise (kind if isinstance(kind, type) and issubclass(kind, AtelierError) else AtelierError)(
                raised[1]) from None
        said = f"{raised[0].rsplit('.', 1)[-1]}: {raised[1]}" if raised else _first_line(exc)
        raise AtelierError(f"{what} failed on the Ray cluster: {said}; {hint}") from None


def path_bytes(path: Path) -> bytes:
    """A path as the OS's bytes: lossless for any name (also one that is not UTF-8), as it crosses to the nodes."""
    return os.fsencode(path)


def put_shards(ray: ModuleType, shards: Iterable[list[dict]]) -> tuple[list, list[int]]:
    """Put each shard (a list of row dicts with the same keys, e.g. {"key": i, "path": bytes}) in the object store as
    an Arrow table, as the listing streams by: their references and sizes, which are all the driver keeps."""
    refs, sizes = [], []
    for rows in shards:
        refs.append(ray.put(pa.Table.from_pylist(rows)))
        sizes.append(len(rows))
    return refs, sizes


def shard_files(batch_size: int) -> int:
    """Files per listing shard: `SHARD_FILES` rounded down to a multiple of the model batch (at least one batch)."""
    return max(batch_size, SHARD_FILES // batch_size * batch_size)


@dataclass(frozen=True)
class DecodeBatch:
    """Ray Data UDF of the decode tasks: listing rows (a `path` column of OS bytes, any key columns) to rows for the
    model actors: the key columns, `meta` (the work's row metadata, pickled: our own objects, never a user's file),
    `has_pixels`, and `pixels` (n, 3, H, W) uint8, zeros where a file has none (an error row, a cached image). The
    work is the local engine's, on the CPU (`curator.embedding.dataplane.assemble` with its CPU context)."""

    work: Callable
    shape: tuple[int, int, int]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from curator.embedding.dataplane import CPU_ONLY, assemble

        paths = [Path(os.fsdecode(p)) for p in batch["path"]]
        packed = assemble(0, paths, self.work, CPU_ONLY, self.shape)
        pixels = np.zeros((len(paths), *self.shape), dtype=np.uint8)
        pixels[packed.positions] = packed.pixels.numpy()
        has = np.zeros(len(paths), dtype=bool)
        has[packed.positions] = True
        meta = np.empty(len(paths), dtype=object)
        meta[:] = [pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL) for m in packed.meta]
        keys = {k: v for k, v in batch.items() if k != "path"}
        return {**keys, "meta": meta, "has_pixels": has, "pixels": pixels}


def unpack_meta(column: Iterable[bytes]) -> list:
    """The row metadata `DecodeBatch` pickled (our own objects, made by our decode tasks)."""
    return [pickle.loads(m) for m in column]  # noqa: S301 - written by DecodeBatch in this pipeline


def fetch(ray: ModuleType, value: Any) -> Any:
    """An object shipped to an actor: fetched from the object store when it came as a reference."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def run_pipeline(ray: ModuleType, refs: list, decode: DecodeBatch, model: type, model_args: tuple, plan: Plan,
                 batch_size: int, batch_format: str) -> Iterator:
    """The Ray Data pipeline over the listing shards `refs`: decode in CPU tasks, `model(*model_args)` in an actor
    pool of `plan`'s size and GPUs, each actor called with batches of `batch_size` rows; yields the actors' output
    blocks in `batch_format` as they arrive, in no particular order."""
    if not refs:
        return
    ds = ray.data.from_arrow_refs(refs)
    # a decode task's memory: its batch twice (decoded, then packed) and the largest image the safe loader decodes;
    # stating it also keeps Ray Data from fusing the decoding into the model actors (whose resources differ), so
    # that decoding stays in CPU tasks on every free core
    memory = 2 * batch_size * math.prod(decode.shape) + 3 * MAX_PIXELS
    ds = ds.map_batches(decode, batch_size=batch_size, batch_format="numpy", num_cpus=1, memory=memory)
    ds = ds.map_batches(model, fn_constructor_args=model_args, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=plan.concurrency), num_gpus=plan.num_gpus or None,
                        num_cpus=1)
    yield from ds.iter_batches(batch_size=None, batch_format=batch_format)


class _EmbedActor:
    """A model actor of the embedding pass: the backbone (shipped once, placed on this actor's device), then, per
    batch, the features of the rows that have pixels (`curator.embedding.embed.embed_pixels`, the local engine's model
    step)."""

    def __init__(self, backbone: Any, device: str, dtype: str):
        from curator.embedding.embed import place_backbone

        self.backbone = fetch(require_ray(), backbone)
        self.runtime = select_runtime(device, dtype)
        _, self.mean, self.std = place_backbone(self.backbone, self.runtime)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from curator.embedding.embed import embed_pixels

        has = batch["has_pixels"]
        features = np.zeros((len(has), self.backbone.feature_dim), dtype=np.float32)
        start = time.perf_counter()
        if has.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][has])).to(self.runtime.device)
            features[has] = embed_pixels(self.backbone, pixels, self.mean, self.std, self.runtime)
        seconds = np.full(len(has), (time.perf_counter() - start) / max(1, len(has)))
        return {"key": batch["key"], "meta": batch["meta"], "has_pixels": has, "features": features,
                "model_seconds": seconds}


@dataclass
class RayEmbedder:
    """The embedding pass of `curator clean` on Ray (`curator.stages.clean.Embedder`): `embed_files`'s arguments and
    `EmbedReport`. `device` and `dtype` are the model actors'; `batch_by_device` takes their device's default batch
    (256 on CUDA, 64 on a CPU) rather than the one passed (the CLI sets it when --batch-size is not given, since only
    the cluster knows its devices); `plan` and `runtime` say, after a call, where the model ran. The `runtime`
    passed (the driver's) is not used: the actors resolve theirs. `workers` must be None (decode tasks scale with
    the cluster's CPUs)."""

    settings: RaySettings = RaySettings()
    device: str = "auto"
    dtype: str = "auto"
    batch_by_device: bool = False
    plan: Plan | None = None
    runtime: Runtime | None = None

    def __call__(self, paths: Sequence[Path], backbone, cache, runtime: Runtime, *, batch_size: int | None = None,
                 workers: int | None = None, known: dict | None = None,
                 events: Event | None = None, policy: ReadPolicy = ReadPolicy()):
        from curator.embedding.dataplane import chunked, default_batch_size
        from curator.embedding.embed import CleanWork, EmbedReport

        refuse_local_options(workers)
        ray = require_ray()
        paths = list(paths)
        preprocess = backbone.preprocess
        shape = (3, preprocess.crop, preprocess.crop)
        infos: list[FileInfo | None] = [None] * len(paths)
        prints: list = [None] * len(paths)
        queued: set[str] = set()
        computed, model_seconds = 0, 0.0
        with ray_session(self.settings) as cluster, ray_errors(
                "the embedding pass", "the embeddings computed so far are cached: rerun to compute the rest"):
            self.plan = plan_pool(cluster, self.settings, self.device)
            self.runtime = actor_runtime(self.plan, self.dtype)
            batch = default_batch_size(self.plan.device) if self.batch_by_device or not batch_size else batch_size
            start = time.perf_counter()
            listing = ({"key": i, "path": path_bytes(p)} for i, p in enumerate(paths))
            refs, _ = put_shards(ray, chunked(listing, shard_files(batch)))
            decode = DecodeBatch(CleanWork(preprocess, frozenset(cache.shas()), known or {}, policy), shape)
            model = (_EmbedActor, (ray.put(backbone), self.plan.device, self.dtype))
            for block in run_pipeline(ray, refs, decode, *model, self.plan, batch, "numpy"):
                fresh_rows, fresh_shas, new = [], [], 0
                for row, (info, prints_) in enumerate(unpack_meta(block["meta"])):
                    index = int(block["key"][row])
                    if infos[index] is not None:
                        continue  # a retried task's row, already received
                    infos[index], prints[index] = info, prints_
                    new += 1
                    if block["has_pixels"][row] and info.sha256 not in queued:  # identical files are cached once
                        queued.add(info.sha256)
                        fresh_rows.append(row)
                        fresh_shas.append(info.sha256)
                if fresh_rows:
                    cache.append(fresh_shas, block["features"][fresh_rows])
                    computed += len(fresh_rows)
                model_seconds += float(block["model_seconds"].sum())
                advance(events, new)
            elapsed = time.perf_counter() - start
        lost = sum(1 for info in infos if info is None)
        if lost:
            raise AtelierError(f"the Ray embedding pass returned no row for {lost} of {len(paths)} files; rerun "
                               f"(the embeddings computed so far are cached)")
        cache.flush()
        ok = sum(1 for info in infos if info.ok)
        return EmbedReport(infos, prints, computed, max(ok - computed, 0), elapsed, model_seconds, 0.0,
                           self.plan.concurrency)
