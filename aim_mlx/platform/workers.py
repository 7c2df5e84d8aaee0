"""The numpy backend's threads: worker threads kept for the process, work split over the cores, and
interrupts that hand the cores back.

One call of the backend uses all the cores at a time (`lock`, process-wide), so a server running requests
on several threads gets them one after the other, each with every core; the BLAS's thread count, which is
process-wide too, is changed only while the lock is held. An interrupt (Ctrl-C) in the calling thread tells
the workers to stop at their next step and waits for them, so the cores and the BLAS threads are handed back
before the interrupt goes on.
"""

import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, wait
from contextlib import contextmanager

import mlx.core as mx

from ..errors import ConfigError
from . import blas

lock = threading.Lock()  # one call on the cores at a time
_pools: list["Worker"] = []  # one thread per worker, so each share has its own thread
_local = threading.local()  # a worker thread's MLX stream


def cores() -> int:
    """How many threads or batch shares the backend uses: AIM_MLX_CPU_WORKERS, else the BLAS's threads."""
    wanted = os.environ.get("AIM_MLX_CPU_WORKERS", "").strip()
    if not wanted:
        return max(1, blas.threads())
    if not wanted.isdigit() or int(wanted) < 1:
        raise ConfigError(f"AIM_MLX_CPU_WORKERS={wanted!r}: give a whole number of threads, 1 or more")
    return int(wanted)


class Worker:
    """One daemon thread running the jobs submitted to it, in order. Not a ThreadPoolExecutor: the interpreter
    joins those threads at exit, and one started while Ctrl-C unwinds the first batch could hold the exit."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn, *args) -> Future:
        future = Future()
        self._jobs.put((future, fn, args))
        return future

    def pending(self) -> int:
        return self._jobs.qsize()

    def _run(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, which re-raises it
                future.set_exception(exc)


def pool(n: int) -> list[Worker]:
    """`n` worker threads, kept for the process: an MLX stream belongs to the thread that made it, and each
    one made holds a thread of MLX's for good, so workers and their streams are made once."""
    while len(_pools) < n:
        _pools.append(Worker(f"aim-mlx-{len(_pools)}"))
    return _pools[:n]


def pending() -> int:
    """Jobs queued on the workers and not yet started."""
    return sum(worker.pending() for worker in _pools)


class Stopped(Exception):
    """A job's answer to `cancel`: the caller was interrupted, so its share is not finished."""


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """The BLAS on one thread while threads of ours share the cores; its thread count back afterwards."""
    before = blas.threads()
    blas.set_threads(1)
    try:
        yield
    finally:
        blas.set_threads(before)


def join(jobs, cancel: threading.Event) -> None:
    """Wait for every job and re-raise the first worker error. If this thread is interrupted meanwhile, the
    jobs are told to stop at their next step and still waited for: the caller hands the cores and the BLAS
    threads back only once no job runs, so that nothing outlives the call (a job that took the cores after
    the caller let go used to deadlock on its own pool)."""
    try:
        wait(jobs)
    except BaseException:
        cancel.set()
        while not all(job.done() for job in jobs):
            try:
                wait(jobs)
            except BaseException:  # a second Ctrl-C: the jobs end at their next step all the same
                continue
        raise
    for job in jobs:
        job.result()


def split(fn, n: int, cancel: threading.Event) -> None:
    """fn(lo, hi) over range(n), in one share per core run in parallel (the calling thread takes the first)
    with the BLAS single-threaded meanwhile; inline when there is one core or one item."""
    shares = min(cores(), n)
    if shares < 2:
        return fn(0, n)
    edges = [round(i * n / shares) for i in range(shares + 1)]
    with single_threaded_blas():
        jobs = [w.submit(fn, a, b) for w, a, b in zip(pool(shares - 1), edges[1:-1], edges[2:], strict=True)]
        try:
            fn(edges[0], edges[1])
        finally:
            join(jobs, cancel)  # every share done before the BLAS gets its threads back, even on an error


def inline(fn, n: int, cancel: threading.Event) -> None:
    """`split`'s signature, all of it on the calling thread."""
    fn(0, n)


def in_worker_stream(fn, *args):
    """fn(*args) on this worker thread's own MLX stream (an MLX op waits on the stream of its inputs)."""
    if not hasattr(_local, "stream"):
        _local.stream = mx.new_stream(mx.cpu)
    with mx.stream(_local.stream):
        return fn(*args)
