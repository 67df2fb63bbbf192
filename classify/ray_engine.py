"""`classify dir --engine ray`: the same rows as `classify.predict.classify_dir`, computed on a Ray cluster with Ray
Data (the pipeline is `curator.embedding.ray_embed`'s: a streamed listing in shards, decoding in CPU tasks, the model in
an actor pool, rows back to the driver).

This module is `classify dir`'s second engine and uses `classify.predict`'s own pieces for everything but the
scheduling: the checks of DIR and OUT, the fingerprint and the parts folder, the per-file work (`read_source` with the
ReadPolicy, the safe loader, `curator.embedding.preprocess.Preprocess`), the model loader, the forward pass and ranking,
the row builder and the join; so both engines share one definition of a row (same columns, same error rows).

How work is cut: the files no part holds yet are listed lazily into shards of `flush_every` files (2,048 by default),
numbered after the parts already there. Each shard is written as `OUT.parts/part-SHARD.parquet` (its rows in listing
order, atomically) as soon as all its rows are back, so a run killed at any moment keeps every finished shard and
`--resume` lists only the files no part holds. Rows Ray delivers twice (a task retried after its actor died) are kept
once. At the end the parts are joined into OUT in shard order and removed, as the local engine does. The fingerprint
records the engine: neither engine continues the other's parts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from classify.predict import (
    Chunks,
    DirWork,
    Event,
    Inputs,
    Predictor,
    PredictResult,
    PredictSettings,
    RowBuilder,
    atelier_meta,
    check_existing,
    check_paths,
    claim_parts,
    fingerprint,
    join_parts,
    launch,
    output_meta,
    output_schema,
    parts_folder,
    place_predictor,
    read_parts,
    remove_parts,
    write_part,
)
from curator.core.errors import AtelierError
from curator.core.images import ReadPolicy
from curator.core.runtime import Runtime, select_runtime
from curator.embedding.dataplane import Ready
from curator.embedding.ray_embed import (
    DecodeBatch,
    Plan,
    RaySettings,
    actor_runtime,
    fetch,
    path_bytes,
    plan_pool,
    put_shards,
    ray_errors,
    ray_session,
    refuse_local_options,
    require_ray,
    run_pipeline,
    unpack_meta,
)


@dataclass
class RayPredictResult(PredictResult):
    """`PredictResult` with where the Ray engine ran: the actor pool and how many shards this call computed."""

    plan: Plan | None = None
    shards: int = 0
    shard_size: int = 0


class _ClassifyActor:
    """A model actor: the predictor (loaded once by the driver, shipped through the object store, placed on this
    actor's device), then per batch the local engine's forward pass, ranking and row builder, plus the shard and
    position of each row."""

    def __init__(self, predictor: Predictor, device: str, dtype: str, compile: bool, k: int, embeddings: bool):
        self.runtime = select_runtime(device, dtype)
        self.predictor = place_predictor(fetch(require_ray(), predictor), self.runtime, compile,
                                         lambda kind, info: None)
        self.k, self.embeddings = k, embeddings
        p = self.predictor
        self.rows = RowBuilder(p.classes, p.name, k, embeddings, p.embedding_width)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        has = batch["has_pixels"]
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][has])).to(self.runtime.device)
        ready = Ready(unpack_meta(batch["meta"]), pixels, np.flatnonzero(has))
        table = pa.Table.from_batches([self.rows(launch(self.predictor, ready, self.runtime, self.k,
                                                         self.embeddings))])
        return (table.append_column("shard", pa.array(batch["shard"], pa.int64()))
                .append_column("seq", pa.array(batch["seq"], pa.int64())))


class _ShardWriter:
    """Collects the actors' rows by shard and writes each shard's part once all its rows are in (in listing order;
    a row delivered twice is kept once)."""

    def __init__(self, parts: Path, schema: pa.Schema, sizes: dict[int, int]):
        self.parts, self.schema, self.sizes = parts, schema, sizes
        self.pieces: dict[int, list[pa.Table]] = {}
        self.seen: dict[int, set[int]] = {}
        self.written: list[Path] = []
        self.rows = self.errors = self.predicted = 0

    def add(self, table: pa.Table) -> int:
        """Take one output block; returns how many new rows it held."""
        shards = table.column("shard").to_numpy()
        new = 0
        for shard in np.unique(shards).tolist():
            piece = table.filter(pa.array(shards == shard))
            seen = self.seen.setdefault(shard, set())
            seqs = piece.column("seq").to_pylist()
            fresh = [i for i, seq in enumerate(seqs) if seq not in seen]
            if len(fresh) < len(seqs):
                piece = piece.take(fresh)
            seen.update(seqs)
            self.pieces.setdefault(shard, []).append(piece)
            new += piece.num_rows
            if len(seen) == self.sizes[shard]:
                self._write(shard)
        return new

    def _write(self, shard: int) -> None:
        table = pa.concat_tables(self.pieces.pop(shard)).sort_by("seq").select(self.schema.names).cast(self.schema)
        target = self.parts / f"part-{shard:06d}.parquet"
        write_part(table, target)
        self.written.append(target)
        self.rows += table.num_rows
        self.errors += table.num_rows - table.column("error").null_count
        self.predicted += table.num_rows - table.column("predicted").null_count

    @property
    def missing(self) -> int:
        """Rows of shards that never completed (none after a pipeline that ran to its end)."""
        return sum(size - len(self.seen.get(shard, ())) for shard, size in self.sizes.items() if shard in self.open)

    @property
    def open(self) -> set[int]:
        """The shards not written yet."""
        return set(self.sizes) - {int(p.stem[5:]) for p in self.written}


def _next_shard(part_files: list[Path]) -> int:
    """The first free shard number: after every part already in the folder."""
    return 1 + max((int(p.stem[5:]) for p in part_files), default=-1)


def classify_dir_ray(root: Path, out: Path, settings: PredictSettings | None = None,
                     ray_settings: RaySettings | None = None, events: Event | None = None) -> RayPredictResult:
    """Classify every file under `root` into `out` on Ray (see the module docstring); `classify_dir`'s rows."""
    settings = settings or PredictSettings()
    ray_settings = ray_settings or RaySettings()
    emit = events or (lambda kind, info: None)
    ray = require_ray()
    refuse_local_options(settings.workers, settings.gpu_decode)
    root, out = Path(root), Path(out)
    parts = parts_folder(out)
    check_paths(root, out)
    fp = fingerprint(root, settings, engine="ray")
    if check_existing(out, parts, fp, settings.resume):
        done_rows = pq.read_metadata(out).num_rows
        ran = (atelier_meta(out) or {}).get("runtime") or {}
        runtime = Runtime(ran.get("device", "?"), ran.get("dtype", "?"), "the finished run's")
        return RayPredictResult(out, done_rows, 0, 0, done_rows, 0.0, runtime, "already complete")
    predictor = Predictor(settings)  # the local engine's loader, here on the CPU: checks the model once
    schema = output_schema(settings.embeddings)
    k = min(settings.top_k, len(predictor.classes))
    with ray_session(ray_settings) as cluster, ray_errors(
            "classify dir", f"the finished shards are kept in {parts.name}: rerun with --resume"):
        plan = plan_pool(cluster, ray_settings, settings.device)
        runtime = actor_runtime(plan, settings.dtype)
        batch_size, shard_size = settings.resolved(plan.device)
        claim_parts(parts, fp)  # only once the cluster is there and the plan holds: a refusal leaves nothing
        part_files, done, resumed = read_parts(parts, schema)
        start = time.perf_counter()
        first = _next_shard(part_files)
        chunks = Chunks(Inputs(root, out, settings.follow_symlinks), done, shard_size)()
        listing = ([{"shard": first + i, "seq": j, "path": path_bytes(p)} for j, p in enumerate(chunk)]
                   for i, chunk in enumerate(chunks))
        refs, sizes = put_shards(ray, listing)
        emit("stage", {"name": "classify", "total": resumed + sum(sizes)})
        emit("advance", {"n": resumed})
        writer = _ShardWriter(parts, schema, {first + i: n for i, n in enumerate(sizes)})
        work = DirWork(root, ReadPolicy(root, settings.max_bytes, settings.follow_symlinks), predictor.preprocess)
        model = (_ClassifyActor, (ray.put(predictor), plan.device, settings.dtype, settings.compile, k,
                                  settings.embeddings))
        for table in run_pipeline(ray, refs, DecodeBatch(work, predictor.shape), *model, plan, batch_size,
                                  "pyarrow"):
            emit("advance", {"n": writer.add(table)})
        seconds = time.perf_counter() - start
    if writer.missing:
        raise AtelierError(f"the Ray run returned no row for {writer.missing} files; the finished shards are kept in "
                           f"{parts.name}: rerun with --resume")
    join_parts(sorted([*part_files, *writer.written]), out, schema, output_meta(root, predictor, runtime, k, fp))
    remove_parts(parts)
    return RayPredictResult(out, resumed + writer.rows, writer.errors, writer.predicted, resumed, seconds, runtime,
                            predictor.name, batch_size, plan.concurrency, plan=plan, shards=len(sizes),
                            shard_size=shard_size)
