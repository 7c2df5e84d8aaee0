"""Merging concurrent requests into model batches, with a bounded number of items in the server at once.

A request first reserves room for its items (`admit`; none left: the caller answers 429), then puts each
item as it is decoded (`put`) and awaits its own future, so one request's items keep their order however
they are batched. The loop takes up to `batch_size` items of one kind (and, for images, one pixel shape:
the native checkpoint's sizes differ) in arrival order and runs them on the model thread. While admitted
items are still being decoded, a batch that is not full waits for them, at most `wait` seconds; a lone
request does not wait. An item whose future was cancelled (its client went away) is left out.
"""

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Job:
    kind: str  # "text", "image", or "head" (an image for its head's logits)
    data: np.ndarray  # (L,) token ids or (H, W, 3) pixels
    future: asyncio.Future

    @property
    def group(self) -> tuple:
        return self.kind, self.data.shape if self.kind != "text" else None


class Full(Exception):
    """No room for a request's items now."""


class Batcher:
    """`run(kind, [arrays]) -> (B, D) rows` batches items on `executor` (the model thread)."""

    def __init__(self, run: Callable, executor, batch_size: int, wait: float, capacity: int):
        self.run, self.executor = run, executor
        self.batch_size, self.wait, self.capacity = batch_size, wait, capacity
        self.admitted = 0  # items reserved by requests in the server now: decoding, queued or running
        self.coming = 0  # admitted items not put yet (being decoded)
        self.queue: deque[Job] = deque()
        self.arrived = asyncio.Event()
        self.batches = self.items = 0  # model batches run and items computed, for /health
        self.task: asyncio.Task | None = None

    def admit(self, count: int) -> None:
        if self.admitted + count > self.capacity:
            raise Full
        self.admitted += count
        self.coming += count

    def release(self, count: int) -> None:
        self.admitted -= count

    def lost(self, count: int) -> None:
        """Admitted items that will not be put (their decoding failed, or their request went away)."""
        if count:
            self.coming -= count
            self.arrived.set()

    def put(self, kind: str, data: np.ndarray) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.queue.append(Job(kind, data, future))
        self.coming -= 1
        self.arrived.set()
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.loop())
        return future

    async def loop(self) -> None:
        while True:
            while not self.live():
                self.arrived.clear()
                await self.arrived.wait()
            deadline = asyncio.get_running_loop().time() + self.wait
            while len(self.queue) < self.batch_size and self.coming > 0:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self.take()
            if not batch:
                continue
            try:
                rows = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.run, batch[0].kind, [job.data for job in batch]
                )
            except Exception as exc:  # the model failed: each waiting request answers with the error
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(batch)
            for job, row in zip(batch, rows, strict=True):
                if not job.future.done():
                    job.future.set_result(row)

    def live(self) -> bool:
        """Whether a job waits whose client is still there (cancelled ones at the front are dropped)."""
        while self.queue and self.queue[0].future.done():
            self.queue.popleft()
        return bool(self.queue)

    def take(self) -> list[Job]:
        """Up to batch_size live jobs of the first live job's group, in arrival order; the others stay."""
        if not self.live():
            return []
        group, batch, rest = self.queue[0].group, [], deque()
        while self.queue and len(batch) < self.batch_size:
            job = self.queue.popleft()
            if job.future.done():
                continue
            (batch if job.group == group else rest).append(job)
        self.queue.extendleft(reversed(rest))
        return batch

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
