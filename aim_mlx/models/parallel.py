"""Batch-parallel transformer blocks on the CPU: each core runs the trunk on its own share of the images.

MLX's CPU backend runs everything except BLAS calls on one thread, so while a block's elementwise work
(norms, softmax, SiLU, residuals, layout copies) runs, the other cores idle, and about 15 % of an AIMv2-L
forward is such work. Here a batch is split into one share per core, each run by a worker thread on its own
MLX stream with a single-threaded BLAS: the shares need nothing from each other until the end.

On the 2-core Linux machine of benchmarks/RESULTS.md this takes AIMv2-L/224 at batch 8 from ~0.8 to ~0.9
images/s. (Splitting one image's tokens instead, swapping keys and values once per block, gained little
there: an MLX op on one stream that reads another stream's array waits on that stream.) It applies to float32
on the CPU when a multi-threaded fast BLAS is loaded (aim_mlx/_blas.py) and the batch has at least two
images; AIM_MLX_CPU_WORKERS=N sets the number of shares (1: off).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx

from .. import _blas

_lock = threading.Lock()  # one parallel trunk at a time: it changes the BLAS thread count
_pools: list[ThreadPoolExecutor] = []  # one single-thread pool per worker, so each share has its own thread
_local = threading.local()  # a worker thread's MLX stream


def workers(x: mx.array) -> int:
    """How many batch shares to run the blocks of `x` (B, N, D) in: 1 means the plain sequential loop."""
    if x.dtype != mx.float32 or mx.default_device() != mx.cpu:
        return 1
    wanted = os.environ.get("AIM_MLX_CPU_WORKERS", "")
    return max(1, min(int(wanted) if wanted.isdigit() else _blas.threads(), x.shape[0]))


def _pool(n: int) -> ThreadPoolExecutor:
    """Worker threads kept for the process: an MLX stream belongs to the thread that made it, and each one
    made holds a thread of MLX's for good, so workers and their streams are made once."""
    while len(_pools) < n:
        _pools.append(ThreadPoolExecutor(1, thread_name_prefix=f"aim-mlx-{len(_pools)}"))
    return _pools[:n]


def _in_worker_stream(fn, *args):
    if not hasattr(_local, "stream"):
        _local.stream = mx.new_stream(mx.cpu)
    with mx.stream(_local.stream):
        return fn(*args)


def _run_share(blocks, h: mx.array, keep_hidden: bool):
    hidden = [h] if keep_hidden else []
    for block in blocks:
        h = block(h)
        if keep_hidden:
            hidden.append(h)
    mx.eval(h, hidden)
    return h, hidden


def run_blocks(blocks, x: mx.array, n_workers: int, keep_hidden: bool = False):
    """`blocks` applied to `x` (B, N, D) in `n_workers` batch shares: (output, [x, each block's output] when
    `keep_hidden`, else None), the same as the sequential loop up to float rounding."""
    edges = [round(i * x.shape[0] / n_workers) for i in range(n_workers + 1)]
    shares = [x[a:b] for a, b in zip(edges, edges[1:], strict=False)]
    # Evaluated here, weights included (a fresh load is lazy): a worker's stream cannot evaluate work
    # pending on this thread's stream. Already evaluated arrays cost nothing.
    mx.eval(shares, [block.parameters() for block in blocks])
    with _lock:
        before = _blas.threads()
        _blas.set_threads(1)
        try:
            jobs = [
                pool.submit(_in_worker_stream, _run_share, blocks, share, keep_hidden)
                for pool, share in zip(_pool(n_workers), shares, strict=True)
            ]
            results = [job.result() for job in jobs]  # re-raises a worker's exception here
        finally:
            _blas.set_threads(before)
    out = mx.concatenate([h for h, _ in results], axis=0)
    hidden = [mx.concatenate(states, axis=0) for states in zip(*(s for _, s in results), strict=True)]
    return out, hidden if keep_hidden else None
