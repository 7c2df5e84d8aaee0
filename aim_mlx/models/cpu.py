"""The float32 CPU path: how a transformer block keeps every core busy on MLX's CPU backend.

MLX's CPU backend runs everything except BLAS calls on one thread, and its `exp` is scalar (about 8x slower
than numpy's SIMD one). So on the CPU in float32, with the fast BLAS of aim_mlx/_blas.py loaded:
- attention (scores, softmax, weighted values) runs here, a group of heads at a time in numpy with batched
  BLAS calls on views of the packed qkv, split over one thread per core while the BLAS runs single-threaded
  (`split`).
- one image, and the LiT text tower's batch of prompts, run the whole trunk in numpy (`run_trunk`): every
  projection is one BLAS call on all the cores that also adds the residual, attention is split as above, and
  the norms and SiLU·up run on the calling thread; aim-mlx's quantized layers are unpacked just before their
  GEMM. Other blocks (MLX's own quantized layers, say) run MLX's loop of blocks instead, with attention and
  SiLU·up (`silu_mul`, split too) from here and the projections in MLX.
- a batch of two or more images runs the trunk in batch shares (`run_blocks`): one worker thread per core,
  each running `run_trunk` (or MLX's loop, as above) on its share with a single-threaded BLAS and its own
  MLX stream, so the shares' elementwise work overlaps too. (Splitting one image's tokens instead, swapping
  keys and values once per block, was slower: an MLX op on one stream that reads another stream's array
  waits on that stream.)
AIM_MLX_CPU_WORKERS=N sets the number of threads or shares (1: all of it on the calling thread).
Measured in benchmarks/RESULTS.md. Apple GPUs and half precision use MLX's fused kernels instead.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import _blas, quantized

_lock = threading.Lock()  # one user of the cores at a time: splitting changes the BLAS thread count
_pools: list[ThreadPoolExecutor] = []  # one single-thread pool per worker, so each share has its own thread
_local = threading.local()  # a worker thread's MLX stream
SCORES_BYTES = 4 << 20  # attention scores a thread holds at once: the heads it takes per group
SILU_ROWS = 64  # rows of silu(gate) * up computed at once, a cache-sized slab


def active(x: mx.array) -> bool:
    """Whether `x`'s computation takes this module's path: float32 on the CPU, with the fast BLAS loaded."""
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu and _blas.loaded()


def cores() -> int:
    """How many threads this module's parallel sections use: AIM_MLX_CPU_WORKERS, else the BLAS's threads."""
    wanted = os.environ.get("AIM_MLX_CPU_WORKERS", "")
    return max(1, int(wanted) if wanted.isdigit() else _blas.threads())


def _pool(n: int) -> list[ThreadPoolExecutor]:
    """Worker threads kept for the process: an MLX stream belongs to the thread that made it, and each one
    made holds a thread of MLX's for good, so workers and their streams are made once."""
    while len(_pools) < n:
        _pools.append(ThreadPoolExecutor(1, thread_name_prefix=f"aim-mlx-{len(_pools)}"))
    return _pools[:n]


@contextmanager
def _cores(blocking: bool):
    """Holds the cores for one parallel section: takes the lock and sets the BLAS to one thread meanwhile.
    Yields False, changing nothing, if `blocking` is False and another section runs (on another thread, or
    around this one: a batch share's kernels run inline)."""
    if not _lock.acquire(blocking=blocking):
        yield False
        return
    before = _blas.threads()
    _blas.set_threads(1)
    try:
        yield True
    finally:
        _blas.set_threads(before)
        _lock.release()


def split(fn, n: int) -> None:
    """fn(lo, hi) over range(n), in one share per BLAS thread run in parallel (the calling thread takes the
    first); inline when there is one core, one item, or a parallel section already running."""
    shares = min(cores(), n)
    if shares < 2:
        return fn(0, n)
    with _cores(blocking=False) as held:
        if not held:
            return fn(0, n)
        edges = [round(i * n / shares) for i in range(shares + 1)]
        jobs = [
            pool.submit(fn, a, b)
            for pool, a, b in zip(_pool(shares - 1), edges[1:-1], edges[2:], strict=True)
        ]
        try:
            fn(edges[0], edges[1])
        finally:
            wait(jobs)  # every share done before the BLAS gets its threads back, even on an error
        for job in jobs:
            job.result()  # re-raises a worker's exception here


def attention(qkv: mx.array, num_heads: int, scale: float, causal: bool = False) -> mx.array:
    """Multi-head attention from the packed projections `qkv` (B, N, 3D) -> (B, N, D), heads concatenated.
    `causal`: query i sees keys 0..i only."""
    b, n, three_d = qkv.shape
    out = np.empty((b, n, three_d // 3), np.float32)
    _attention(np.asarray(qkv), num_heads, scale, causal, out)  # np.asarray evaluates; a view of MLX's buffer
    return mx.array(out)


def _attention(packed: np.ndarray, num_heads: int, scale: float, causal: bool, out: np.ndarray) -> None:
    """`attention` in numpy, (B, N, 3D) -> `out` (B, N, D). A thread takes its heads a group at a time
    (SCORES_BYTES of scores): one batched BLAS call per product and one numpy call per softmax step, so the
    GIL changes hands rarely (measured: 2.7 against 3.7 ms a head at a time, AIMv2-L at batch 1)."""
    b, n, three_d = packed.shape
    d, hd = three_d // 3, three_d // 3 // num_heads
    hide = np.triu(np.ones((n, n), bool), 1) if causal else None  # keys after the query
    group = max(1, SCORES_BYTES // (4 * n * n))

    def stack(x: np.ndarray, image: int, first: int, last: int) -> np.ndarray:
        """Heads first..last-1 of one image's (N, D) columns, as a (heads, N, hd) view."""
        return x[image, :, first * hd : last * hd].reshape(n, last - first, hd).transpose(1, 0, 2)

    def heads(lo: int, hi: int) -> None:
        scores = np.empty((min(group, hi - lo), n, n), np.float32)
        i = lo
        while i < hi:
            image, first = divmod(i, num_heads)
            last = min(first + group, num_heads, first + hi - i)  # within the share and the image
            i += last - first
            q, k, v = (stack(packed[..., j * d : (j + 1) * d], image, first, last) for j in range(3))
            o, s = stack(out, image, first, last), scores[: last - first]
            _blas.gemm(q, k.transpose(0, 2, 1), s, alpha=scale)  # (heads, N, N)
            if hide is not None:
                s[:, hide] = -np.inf
            s -= s.max(axis=2, keepdims=True)
            np.exp(s, out=s)
            total = s.sum(axis=2, keepdims=True)
            _blas.gemm(s, v, o)  # (heads, N, hd)
            o /= total  # normalise the (N, hd) outputs, not the (N, N) weights

    split(heads, b * num_heads)


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up in numpy, split over the cores."""
    width = gate.shape[-1]
    g, u = np.asarray(gate).reshape(-1, width), np.asarray(up).reshape(-1, width)  # views of MLX's buffers
    out = np.empty_like(g)
    split(lambda lo, hi: _silu_mul(g, u, out, lo, hi), -(-len(g) // SILU_ROWS))
    return mx.array(out).reshape(gate.shape)


def _silu_mul(g: np.ndarray, u: np.ndarray, out: np.ndarray, lo: int = 0, hi: int | None = None) -> None:
    """out = silu(g) * u for (rows, width) arrays, slabs lo..hi-1 of SILU_ROWS rows, a cache-sized slab at
    a time. `out` must not overlap `g` or `u`."""
    stop = len(g) if hi is None else min(hi * SILU_ROWS, len(g))
    for i in range(lo * SILU_ROWS, stop, SILU_ROWS):
        o, gi = out[i : i + SILU_ROWS], g[i : i + SILU_ROWS]
        np.negative(gi, out=o)
        np.exp(o, out=o)
        o += 1
        np.divide(gi, o, out=o)  # g * sigmoid(g)
        o *= u[i : i + SILU_ROWS]


def trunk_ready(x: mx.array, blocks) -> bool:
    """Whether `run_trunk` takes `blocks` on `x`: this module's path, and every projection a float32
    nn.Linear or one of aim-mlx's quantized layers (unpacked before its GEMM, as on the MLX path)."""
    layers = [m for b in blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2, b.mlp.fc3)]
    return active(x) and all(
        isinstance(m, quantized.QuantizedLinear) or (type(m) is nn.Linear and m.weight.dtype == mx.float32)
        for m in layers
    )


def run_trunk(blocks, x: mx.array, keep_hidden: bool = False):
    """`blocks` applied to `x` (B, N, D) in numpy on the calling thread, every projection one BLAS call on all
    the cores and attention split over them (in a batch share: on its own core): (output, [x, each block's
    output] when `keep_hidden`, else None), the same as the MLX loop up to float rounding.

    The residual stream is one buffer that the output projections add into (the GEMM's beta = 1), the other
    activations are buffers reused by every block, and the norms and SiLU·up run on this thread: at batch 1
    the hand-offs between MLX's stream, numpy and the worker threads cost more than spreading a 0.1-0.5 ms
    step over the cores saves (measured in benchmarks/RESULTS.md)."""
    b, n, d = x.shape
    mx.eval(x, [block.parameters() for block in blocks])  # a fresh load is lazy; numpy reads the buffers
    h = np.array(x, np.float32).reshape(b * n, d)  # the residual stream, updated in place
    hidden = [x] if keep_hidden else None
    buffers: dict[str, np.ndarray] = {}

    def buffer(name: str, width: int) -> np.ndarray:
        if name not in buffers:
            buffers[name] = np.empty((b * n, width), np.float32)
        return buffers[name]

    for block in blocks:
        attn, mlp = block.attn, block.mlp
        qkv = _linear(_rms_norm(h, block.norm_1, buffer("normed", d)), attn.qkv, buffer("qkv", 3 * d))
        heads = buffer("heads", d)
        _attention(qkv.reshape(b, n, 3 * d), attn.num_heads, attn.scale, attn.causal, heads.reshape(b, n, d))
        _linear(heads, attn.proj, h, accumulate=True)
        normed = _rms_norm(h, block.norm_2, buffer("normed", d))
        gate = _linear(normed, mlp.fc1, buffer("gate", mlp.fc1.weight.shape[0]))
        up = _linear(normed, mlp.fc3, buffer("up", mlp.fc3.weight.shape[0]))
        _silu_mul(gate, up, act := buffer("act", gate.shape[1]))
        _linear(act, mlp.fc2, h, accumulate=True)
        if hidden is not None:
            hidden.append(mx.array(h.reshape(b, n, d)))  # a copy
    return mx.array(h.reshape(b, n, d)), hidden


def _linear(x: np.ndarray, layer: nn.Module, out: np.ndarray, accumulate: bool = False) -> np.ndarray:
    """out = x @ W^T + bias, or out += that with `accumulate`: one BLAS call on (rows, features) arrays.
    `layer`: an nn.Linear, or a quantized.QuantizedLinear, whose weight is unpacked here."""
    if "bias" in layer:
        if accumulate:
            out += np.asarray(layer.bias)
        else:
            out[...] = np.asarray(layer.bias)
        accumulate = True
    weight = (
        layer.float_weight().astype(mx.float32)
        if isinstance(layer, quantized.QuantizedLinear)
        else layer.weight
    )
    _blas.gemm(x, np.asarray(weight).T, out, beta=1.0 if accumulate else 0.0)  # np.asarray evaluates
    return out


def _rms_norm(x: np.ndarray, norm: nn.RMSNorm, out: np.ndarray) -> np.ndarray:
    """RMSNorm of the rows of `x` into `out`."""
    rms = np.einsum("ij,ij->i", x, x)  # sums of squares, one pass
    rms /= x.shape[1]
    rms += norm.eps
    np.sqrt(rms, out=rms)
    np.divide(x, rms[:, None], out=out)
    out *= np.asarray(norm.weight)
    return out


def workers(x: mx.array) -> int:
    """How many batch shares to run the blocks of `x` (B, N, D) in: 1 means one sequential trunk."""
    return min(cores(), x.shape[0]) if active(x) else 1


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
    `keep_hidden`, else None), the same as the sequential loop up to float rounding. A share runs
    `run_trunk`, or MLX's loop of blocks where `run_trunk` does not take them, on the worker's own stream."""
    edges = [round(i * x.shape[0] / n_workers) for i in range(n_workers + 1)]
    shares = [x[a:b] for a, b in zip(edges, edges[1:], strict=False)]
    # Evaluated here, weights included (a fresh load is lazy): a worker's stream cannot evaluate work
    # pending on this thread's stream. Already evaluated arrays cost nothing.
    mx.eval(shares, [block.parameters() for block in blocks])
    run_share = partial(_in_worker_stream, run_trunk if trunk_ready(x, blocks) else _run_share)
    with _cores(blocking=True):
        jobs = [
            pool.submit(run_share, blocks, share, keep_hidden)
            for pool, share in zip(_pool(n_workers), shares, strict=True)
        ]
        wait(jobs)  # every share done before the BLAS gets its threads back, even on an error
    results = [job.result() for job in jobs]  # re-raises a worker's exception here
    out = mx.concatenate([h for h, _ in results], axis=0)
    if not keep_hidden:
        return out, None
    return out, [mx.concatenate(states, axis=0) for states in zip(*(s for _, s in results), strict=True)]
