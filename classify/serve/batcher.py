"""Micro-batching: requests that arrive together share one forward pass.

Each request `submit`s its decoded input to an asyncio queue and awaits a future. One consumer task takes the first
waiting item, then gathers more until it holds `max_batch` of them or `max_wait_ms` has passed since the first,
whichever comes first, and hands the whole list to `run` in a worker thread (the event loop keeps accepting and
decoding uploads meanwhile; items that arrive while a batch runs are waiting, and go together, when it ends). It
waits only for requests already on their way (`arriving`: being received or decoded): when none is, the batch
runs at once, so a lone request never pays `max_wait_ms` (on a busy machine a short sleep costs far more than its
length). With `max_batch` 1 every request is its own forward pass (one at a time), which is what micro-batching is
measured against (bench/serve.py).

Failures stay with their batch: an exception from `run` is set on that batch's futures as `BatchFailed` and the
consumer goes on with the next batch, so a failing batch never stops the worker. Inputs are decoded and checked
before they are submitted, so bad uploads never reach `run` at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from curator.core.errors import UsageError

T = TypeVar("T")
R = TypeVar("R")


class BatchFailed(RuntimeError):
    """The forward pass of the batch an item was in failed (the message says why); the batcher itself goes on."""


@dataclass
class BatchStats:
    """How the batcher has been batching: forward passes, items, and how many passes had each size."""

    batches: int = 0
    items: int = 0
    failed_batches: int = 0
    sizes: dict[int, int] = field(default_factory=dict)

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.sizes[size] = self.sizes.get(size, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        mean = self.items / self.batches if self.batches else 0.0
        return {"batches": self.batches, "items": self.items, "mean_batch": round(mean, 2),
                "failed_batches": self.failed_batches, "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


def check_limits(max_batch: int, max_wait_ms: float) -> None:
    """One-line errors for batching options no server could use."""
    if not isinstance(max_batch, int) or max_batch < 1 or max_batch > 4096:
        raise UsageError(f"--max-batch must be 1 (no batching) to 4096, got {max_batch!r}")
    if not (0.0 <= max_wait_ms <= 10_000.0):  # also refuses NaN
        raise UsageError(f"--max-wait-ms must be 0 to 10000 milliseconds, got {max_wait_ms!r}")


class MicroBatcher(Generic[T, R]):
    """Gathers concurrent `submit(item)` calls into lists for `run(items) -> results` (one result per item, in
    order), run on `executor`. `start` and `stop` are called from the event loop that serves the requests."""

    def __init__(self, run: Callable[[list[T]], list[R]], executor: Executor, max_batch: int,
                 max_wait_ms: float):
        check_limits(max_batch, max_wait_ms)
        self.run = run
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self.incoming = 0  # requests on their way to `submit` (see `arriving`)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Count a request as on its way to `submit` while it is received and decoded, so that a batch being
        gathered waits for it (up to `max_wait_ms`) rather than leave without it."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    def start(self) -> None:
        """Start the consumer task on the running loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._consume())

    async def stop(self) -> None:
        """Stop the consumer; items still queued are answered with `BatchFailed`."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(BatchFailed("the server is shutting down"))

    async def submit(self, item: T) -> R:
        """The result of `run` for `item`, computed in a batch with whatever else is waiting."""
        if self._queue is None or self._task is None or self._task.done():
            raise BatchFailed("the model worker is not running")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _gather(self) -> list[tuple[T, asyncio.Future]]:
        """The first waiting item, then more until `max_batch`, or `max_wait` after the first, or no other request
        is on its way."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            if self.incoming == 0:  # nothing else on its way: waiting would only add latency
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(item, future) for item, future in await self._gather() if not future.done()]
            if not batch:  # every client of this batch went away
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.run, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} inputs")
            except Exception as exc:  # noqa: BLE001 - a failed batch is its requests' answer, not the worker's end
                self.stats.failed_batches += 1
                message = " ".join(str(exc).split()) or type(exc).__name__
                for _, future in batch:
                    if not future.done():
                        future.set_exception(BatchFailed(message))
                continue
            self.stats.record(len(batch))
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
