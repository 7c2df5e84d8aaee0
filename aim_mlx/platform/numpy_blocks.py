"""The numpy backend: AIMv2's and AIMv1's blocks in numpy with direct BLAS calls, for float32 on a CPU.

Why: MLX's CPU backend runs everything but its BLAS calls on one thread, and its `exp` is scalar (about 8x
slower than numpy's SIMD one). With the fast BLAS of blas.py loaded, this backend runs a stack of
aimv2.Block with the same results as the MLX blocks up to float rounding, 2-3x faster on 2 cores for AIMv2
(benchmarks/RESULTS.md):
- one image, and the LiT text tower's batch of prompts, run as one trunk: the residual stream is one buffer,
  every projection one BLAS call on all the cores that also adds the residual (the GEMM's beta = 1), the
  other activations buffers reused by every block, the norms and the MLP's activation on the calling
  thread, and attention (scores, softmax, weighted values, a group of heads at a time with batched BLAS
  calls on views of the packed qkv) split over one thread per core while the BLAS runs single-threaded.
- a batch of two or more images runs in batch shares, one worker thread per core, each running that trunk on
  its share with a single-threaded BLAS and its own MLX stream (aim-mlx's quantized layers are unpacked by
  an MLX op just before their GEMM, as their MLX path does). Splitting one image's tokens instead was
  slower: an MLX op on one stream that reads another stream's array waits on that stream.
AIM_MLX_CPU_WORKERS=N sets the number of threads or shares (1: all of it on the calling thread).

As in the MLX models, the block is one runner and the families' differences are its parameters: the norm
(AIMv2's RMSNorm, or AIMv1's LayerNorm with bias) and the MLP (AIMv2's SwiGLU, or AIMv1's fc2(gelu(fc1 x))
with the exact, erf GELU). numpy has no erf, so the GELU uses Abramowitz and Stegun 7.1.26 (|error| <=
1.5e-7, float32's rounding near 1; tests/test_aimv1_numpy.py holds it to torch's exact GELU): 8-12 ms on a
(256, 6144) array, where MLX's GELU (mx.erf) after a copy took 52 ms.

The weights are read once, when load() installs the backend (`NumpyBlocks(blocks)`): numpy views of MLX's
buffers, no copies. If the blocks' arrays are replaced later (set_dtype, a new weight load), the views are
read again, or the MLX blocks run where this backend does not support them any more.

Threads: one call of this backend uses the cores at a time (a process-wide lock), so a server that runs
requests on several threads gets them one after the other, each with every core; the BLAS's thread count,
which is process-wide, is changed only while the lock is held. An interrupt (Ctrl-C) in the calling thread
tells the workers to stop at their next block and waits for them, so the cores and the BLAS threads are
handed back before the interrupt goes on.
"""

import os
import queue
import threading
from concurrent.futures import Future, wait
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError
from ..models.aimv2 import MLP, Attention, Block, SwiGLU
from ..models.quantized import QuantizedLinear
from . import blas

_lock = threading.Lock()  # one call on the cores at a time
_pools: list["_Worker"] = []  # one thread per worker, so each share has its own thread
_local = threading.local()  # a worker thread's MLX stream
SCORES_BYTES = 4 << 20  # attention scores a thread holds at once: the heads it takes per group
ACT_ROWS = 64  # rows of the MLP's activation computed at once, a cache-sized slab


def cores() -> int:
    """How many threads or batch shares this backend uses: AIM_MLX_CPU_WORKERS, else the BLAS's threads."""
    wanted = os.environ.get("AIM_MLX_CPU_WORKERS", "").strip()
    if not wanted:
        return max(1, blas.threads())
    if not wanted.isdigit() or int(wanted) < 1:
        raise ConfigError(f"AIM_MLX_CPU_WORKERS={wanted!r}: give a whole number of threads, 1 or more")
    return int(wanted)


class _Worker:
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


def _pool(n: int) -> list[_Worker]:
    """Worker threads kept for the process: an MLX stream belongs to the thread that made it, and each one
    made holds a thread of MLX's for good, so workers and their streams are made once."""
    while len(_pools) < n:
        _pools.append(_Worker(f"aim-mlx-{len(_pools)}"))
    return _pools[:n]


class _Stopped(Exception):
    """A worker's answer to `cancel`: the caller was interrupted, so its share is not finished."""


def _join(jobs, cancel: threading.Event) -> None:
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
            except BaseException:  # a second Ctrl-C: the jobs end at their next block all the same
                continue
        raise
    for job in jobs:
        job.result()


def _split(fn, n: int, cancel: threading.Event) -> None:
    """fn(lo, hi) over range(n), in one share per core run in parallel (the calling thread takes the first)
    with the BLAS single-threaded meanwhile; inline when there is one core or one item."""
    shares = min(cores(), n)
    if shares < 2:
        return fn(0, n)
    edges = [round(i * n / shares) for i in range(shares + 1)]
    before = blas.threads()
    blas.set_threads(1)
    try:
        jobs = [
            pool.submit(fn, a, b)
            for pool, a, b in zip(_pool(shares - 1), edges[1:-1], edges[2:], strict=True)
        ]
        try:
            fn(edges[0], edges[1])
        finally:
            _join(jobs, cancel)  # every share done before the BLAS gets its threads back, even on an error
    finally:
        blas.set_threads(before)


def _inline(fn, n: int, cancel: threading.Event) -> None:
    fn(0, n)


def _attention(packed: np.ndarray, num_heads: int, scale: float, causal: bool, out: np.ndarray, run) -> None:
    """Multi-head attention from the packed projections (B, N, 3D) -> `out` (B, N, D), heads concatenated;
    `causal`: query i sees keys 0..i only. `run(fn, n)` runs fn(lo, hi) over the B * heads (image, head)
    pairs, split over the cores or not. A thread takes its heads a group at a time
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
            blas.gemm(q, k.transpose(0, 2, 1), s, alpha=scale)  # (heads, N, N)
            if hide is not None:
                s[:, hide] = -np.inf
            s -= s.max(axis=2, keepdims=True)
            np.exp(s, out=s)
            total = s.sum(axis=2, keepdims=True)
            blas.gemm(s, v, o)  # (heads, N, hd)
            o /= total  # normalise the (N, hd) outputs, not the (N, N) weights

    run(heads, b * num_heads)


def _silu_mul(g: np.ndarray, u: np.ndarray, out: np.ndarray, lo: int = 0, hi: int | None = None) -> None:
    """out = silu(g) * u for (rows, width) arrays, slabs lo..hi-1 of ACT_ROWS rows, a cache-sized slab at
    a time. `out` must not overlap `g` or `u`."""
    stop = len(g) if hi is None else min(hi * ACT_ROWS, len(g))
    for i in range(lo * ACT_ROWS, stop, ACT_ROWS):
        o, gi = out[i : i + ACT_ROWS], g[i : i + ACT_ROWS]
        np.negative(gi, out=o)
        np.exp(o, out=o)
        o += 1
        np.divide(gi, o, out=o)  # g * sigmoid(g)
        o *= u[i : i + ACT_ROWS]


# Abramowitz and Stegun 7.1.26: erfc(z) = t (a1 + a2 t + ... + a5 t^4) exp(-z^2), t = 1 / (1 + p z), z >= 0.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_T_SCALE = np.float32(_AS_P / np.sqrt(2))  # for z = |x| / sqrt(2)
_HALF_A = tuple(np.float32(-0.5 * a) for a in _AS_A)  # the -1/2 of gelu's erfc term, folded in


def _gelu(x: np.ndarray, out: np.ndarray, lo: int = 0, hi: int | None = None) -> None:
    """out = gelu(x) = x (1 + erf(x / sqrt 2)) / 2 for (rows, width) arrays, exact GELU to float32 rounding,
    slabs lo..hi-1 of ACT_ROWS rows. Written as max(x, 0) - |x| erfc(|x| / sqrt 2) / 2 (the same for either
    sign), so erfc is needed at z >= 0 only, where A-S's form is. `out` must not overlap `x`."""
    stop = len(x) if hi is None else min(hi * ACT_ROWS, len(x))
    scratch = np.empty((min(ACT_ROWS, len(x)), x.shape[1]), np.float32)
    for i in range(lo * ACT_ROWS, stop, ACT_ROWS):
        xi, o = x[i : i + ACT_ROWS], out[i : i + ACT_ROWS]
        t = scratch[: len(xi)]
        np.abs(xi, out=t)
        t *= _T_SCALE
        t += 1
        np.reciprocal(t, out=t)  # A-S's t
        np.multiply(t, _HALF_A[4], out=o)
        for a in _HALF_A[3::-1]:  # Horner
            o += a
            o *= t
        np.multiply(xi, xi, out=t)
        t *= np.float32(-0.5)
        np.exp(t, out=t)
        o *= t  # -erfc(|x| / sqrt 2) / 2
        np.abs(xi, out=t)
        o *= t
        np.maximum(xi, 0, out=t)
        o += t


@dataclass
class _Norm:
    """One norm of a block, read once: RMSNorm (AIMv2: weight), or LayerNorm (AIMv1: the mean taken out
    first, then weight and bias)."""

    weight: np.ndarray
    bias: np.ndarray | None
    eps: float
    centred: bool  # LayerNorm

    @classmethod
    def read(cls, norm: nn.Module) -> "_Norm":
        bias = np.asarray(norm.bias) if "bias" in norm else None
        return cls(np.asarray(norm.weight), bias, norm.eps, type(norm) is nn.LayerNorm)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The norm of the rows of `x` into `out`."""
        if self.centred:
            x = np.subtract(x, x.mean(axis=1, keepdims=True), out=out)
        ms = np.einsum("ij,ij->i", x, x)  # sums of squares, one pass
        ms /= x.shape[1]
        ms += self.eps
        np.sqrt(ms, out=ms)
        np.divide(x, ms[:, None], out=out)
        out *= self.weight
        if self.bias is not None:
            out += self.bias
        return out


@dataclass
class _Projection:
    """One projection of a block, read once: out = x @ weight + bias."""

    weight: np.ndarray | None  # (in, out): a transposed view of MLX's float32 (out, in) buffer
    packed: QuantizedLinear | None  # aim-mlx's quantized layer instead: unpacked just before its GEMM
    bias: np.ndarray | None

    @classmethod
    def read(cls, layer: nn.Module) -> "_Projection":
        bias = np.asarray(layer.bias) if "bias" in layer else None  # np.asarray evaluates; a view
        if isinstance(layer, QuantizedLinear):
            return cls(None, layer, bias)
        return cls(np.asarray(layer.weight).T, None, bias)

    def __call__(self, x: np.ndarray, out: np.ndarray, accumulate: bool = False) -> np.ndarray:
        """out = x @ W^T + bias, or out += that with `accumulate`: one BLAS call on (rows, features)."""
        if self.bias is not None:
            if accumulate:
                out += self.bias
            else:
                out[...] = self.bias
            accumulate = True
        weight = self.weight
        if weight is None:  # an MLX op: in a batch share it runs on the worker's own stream
            weight = np.asarray(self.packed.float_weight().astype(mx.float32)).T
        blas.gemm(x, weight, out, beta=1.0 if accumulate else 0.0)
        return out


@dataclass
class _SwiGLUWeights:
    """AIMv2's MLP: fc2(silu(fc1 x) * fc3 x)."""

    fc1: _Projection  # gate
    fc2: _Projection  # down
    fc3: _Projection  # up
    width: int

    def hidden(self, x: np.ndarray, buffer) -> np.ndarray:
        """The activations fc2 takes, (rows, width), in the runner's buffers."""
        gate = self.fc1(x, buffer("gate", self.width))
        up = self.fc3(x, buffer("up", self.width))
        _silu_mul(gate, up, act := buffer("act", self.width))
        return act


@dataclass
class _GELUWeights:
    """AIMv1's MLP: fc2(gelu(fc1 x)), GELU exact."""

    fc1: _Projection
    fc2: _Projection
    width: int

    def hidden(self, x: np.ndarray, buffer) -> np.ndarray:
        """The activations fc2 takes, (rows, width), in the runner's buffers."""
        _gelu(self.fc1(x, buffer("up", self.width)), act := buffer("act", self.width))
        return act


_MLPS = {SwiGLU: _SwiGLUWeights, MLP: _GELUWeights}  # the MLX MLP -> how this backend runs it
_NORMS = (nn.RMSNorm, nn.LayerNorm)


@dataclass
class _BlockWeights:
    norm_1: _Norm
    norm_2: _Norm
    qkv: _Projection
    proj: _Projection
    mlp: _SwiGLUWeights | _GELUWeights
    num_heads: int
    scale: float
    causal: bool

    @classmethod
    def read(cls, block: Block) -> "_BlockWeights":
        attn, mlp = block.attn, block.mlp
        projections = {name: _Projection.read(layer) for name, layer in _projections(block).items()}
        return cls(
            norm_1=_Norm.read(block.norm_1),
            norm_2=_Norm.read(block.norm_2),
            qkv=projections.pop("qkv"),
            proj=projections.pop("proj"),
            mlp=_MLPS[type(mlp)](**projections, width=mlp.fc1.weight.shape[0]),
            num_heads=attn.num_heads,
            scale=attn.scale,
            causal=attn.causal,
        )


def _projections(block: Block) -> dict[str, nn.Module]:
    """The block's Linear layers by name: attention's qkv and proj, the MLP's fc1, fc2 (and SwiGLU's fc3)."""
    attn, mlp = block.attn, block.mlp
    return {"qkv": attn.qkv, "proj": attn.proj, **{k: mlp[k] for k in ("fc1", "fc2", "fc3") if k in mlp}}


def _arrays(blocks) -> list[mx.array]:
    """Every array the backend reads, in a fixed order: how it sees that the blocks' weights were replaced."""
    out = []
    for block in blocks:
        for layer in (block.norm_1, block.norm_2, *_projections(block).values()):
            out += [v for _, v in sorted(layer.items()) if isinstance(v, mx.array)]
    return out


def unsupported(blocks) -> str | None:
    """Why this backend cannot run `blocks`, or None when it can."""
    if not blas.loaded():
        return "the fast BLAS is not loaded (Linux only; see AIM_MLX_BLAS)"
    if mx.default_device() != mx.cpu:
        return "it runs on the CPU only"
    for i, block in enumerate(blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            return f"block {i} is a {type(block).__name__}, not an AIMv2 block (AIMv1's are AIMv2 blocks too)"
        if type(block.mlp) not in _MLPS:
            return f"block {i}'s MLP is a {type(block.mlp).__name__}, not AIMv2's SwiGLU or AIMv1's GELU MLP"
        norms = (block.norm_1, block.norm_2)
        if any(
            type(n) not in _NORMS
            or "weight" not in n
            or any(isinstance(v, mx.array) and v.dtype != mx.float32 for v in n.values())
            for n in norms
        ):
            return f"block {i}'s norms are not float32 RMSNorms or LayerNorms with a weight"
        for name, layer in _projections(block).items():
            if not (
                isinstance(layer, QuantizedLinear)
                or (type(layer) is nn.Linear and layer.weight.dtype == mx.float32)
            ):
                return f"block {i}'s {name} is not a float32 Linear or an aim-mlx quantized layer"
    return None


class NumpyBlocks:
    """A BlockStack's backend (see models/aimv2.py): runs its blocks as this module's doc says."""

    name = "numpy"

    def __init__(self, blocks):
        self.blocks = blocks
        self._read()

    def _read(self) -> None:
        mx.eval(_arrays(self.blocks))  # a fresh load is lazy; numpy reads the buffers
        self._sources = _arrays(self.blocks)
        self._weights = [_BlockWeights.read(block) for block in self.blocks]

    def takes(self, x: mx.array) -> bool:
        """Whether this call runs here: float32 on the CPU, and the blocks still ones this backend runs
        (their weights are read again if they were replaced)."""
        if x.dtype != mx.float32 or mx.default_device() != mx.cpu:
            return False
        current = _arrays(self.blocks)
        if len(current) != len(self._sources) or any(
            a is not b for a, b in zip(current, self._sources, strict=False)
        ):
            if unsupported(self.blocks) is not None:
                return False
            self._read()
        return True

    def __call__(self, x: mx.array, depth: int, keep=()) -> tuple[mx.array, dict]:
        """The first `depth` blocks on `x` (B, N, D): (output, {i: block i's output for i in keep})."""
        shares = min(cores(), x.shape[0])
        with _lock:
            if shares < 2:
                return self._trunk(x, depth, keep, _split, threading.Event())
            return self._shares(x, depth, keep, shares)

    def _shares(self, x: mx.array, depth: int, keep, n: int) -> tuple[mx.array, dict]:
        edges = [round(i * x.shape[0] / n) for i in range(n + 1)]
        shares = [x[a:b] for a, b in zip(edges, edges[1:], strict=False)]
        mx.eval(shares)  # a worker's stream cannot evaluate work pending on this thread's stream
        cancel = threading.Event()
        before = blas.threads()
        blas.set_threads(1)
        try:
            jobs = [
                pool.submit(_in_worker_stream, self._trunk, share, depth, keep, _inline, cancel)
                for pool, share in zip(_pool(n), shares, strict=True)
            ]
            _join(jobs, cancel)  # every share done before the BLAS gets its threads back, even on an error
        finally:
            blas.set_threads(before)
        results = [job.result() for job in jobs]
        out = mx.concatenate([h for h, _ in results], axis=0)
        return out, {i: mx.concatenate([kept[i] for _, kept in results], axis=0) for i in keep}

    def _trunk(self, x: mx.array, depth: int, keep, run, cancel: threading.Event) -> tuple[mx.array, dict]:
        """The blocks on this thread; `run` spreads attention's heads (`_split`) or not (`_inline`)."""
        b, n, d = x.shape
        h = np.array(x, np.float32).reshape(b * n, d)  # the residual stream, updated in place
        kept = {}
        buffers: dict[str, np.ndarray] = {}

        def spread(fn, count: int) -> None:
            run(fn, count, cancel)

        def buffer(name: str, width: int) -> np.ndarray:
            if name not in buffers:
                buffers[name] = np.empty((b * n, width), np.float32)
            return buffers[name]

        for i, w in enumerate(self._weights[:depth]):
            if cancel.is_set():
                raise _Stopped
            qkv = w.qkv(w.norm_1(h, buffer("normed", d)), buffer("qkv", 3 * d))
            heads = buffer("heads", d)
            _attention(
                qkv.reshape(b, n, 3 * d), w.num_heads, w.scale, w.causal, heads.reshape(b, n, d), spread
            )
            w.proj(heads, h, accumulate=True)
            w.mlp.fc2(w.mlp.hidden(w.norm_2(h, buffer("normed", d)), buffer), h, accumulate=True)
            if i in keep:
                kept[i] = mx.array(h.reshape(b, n, d))  # a copy
        return mx.array(h.reshape(b, n, d)), kept


def _in_worker_stream(fn, *args):
    if not hasattr(_local, "stream"):
        _local.stream = mx.new_stream(mx.cpu)
    with mx.stream(_local.stream):
        return fn(*args)
