"""The numpy backend: AIMv2's and AIMv1's blocks in numpy with direct BLAS calls, for float32 on a CPU.

MLX's CPU backend runs all but its BLAS calls on one thread, with a scalar `exp`. With the fast BLAS of
blas.py these blocks give the MLX blocks' results up to float rounding, 2-3x faster on two cores
(benchmarks/RESULTS.md). One image runs as one trunk: the residual stream is one buffer, each projection one
BLAS call that also adds the residual, and attention's heads are split over the cores (workers.py). A batch
runs in batch shares, one worker thread with a single-threaded BLAS each. As in the MLX models, the block is
one runner whose norm (RMSNorm, or LayerNorm with bias) and MLP (SwiGLU, or the exact GELU through
Abramowitz and Stegun's erfc, within float32's rounding) are parameters. AIM_MLX_CPU_WORKERS=N sets the
number of threads or shares.
"""

import threading
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.aimv2 import MLP, Attention, Block, SwiGLU
from ..models.quantized import QuantizedLinear
from . import blas, workers

SCORES_BYTES = 4 << 20  # attention scores a thread holds at once: the heads it takes per group
ACT_ROWS = 64  # rows of the MLP's activation computed at once, a cache-sized slab


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


def unusable(dtype: str = "float32") -> str | None:
    """Why this backend cannot run here, computing in `dtype`, or None when it can."""
    if not blas.loaded():
        return "the fast BLAS is not loaded (Linux only; see AIM_MLX_BLAS)"
    if mx.default_device() != mx.cpu:
        return "it runs on the CPU only"
    if dtype != "float32":
        return f"it computes in float32 only, not {dtype}"
    return None


def unsupported(blocks) -> str | None:
    """Why this backend cannot run `blocks`, or None when it can."""
    if reason := unusable():
        return reason
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
    """A BlockStack's backend (see models/aimv2.py: the stack is built with `backend=NumpyBlocks`): runs the
    stack's blocks as this module's doc says wherever it `takes` the call. The weights are read at the first
    call, and again whenever the blocks' arrays were replaced (a weight load, set_dtype, quantization)."""

    name = "numpy"

    def __init__(self, stack):
        self.stack = stack  # its `blocks` are read at each call: loading replaces layers after building
        self._sources: list[mx.array] = []
        self._weights: list[_BlockWeights] = []

    def takes(self, x: mx.array) -> bool:
        """Whether this call runs here: float32 on the CPU, with blocks this backend runs."""
        if x.dtype != mx.float32 or mx.default_device() != mx.cpu:
            return False
        blocks = self.stack.blocks
        current = _arrays(blocks)
        if (
            not self._sources
            or len(current) != len(self._sources)
            or any(a is not b for a, b in zip(current, self._sources, strict=False))
        ):
            if unsupported(blocks) is not None:
                return False
            mx.eval(current)  # a fresh load is lazy; numpy reads the buffers
            self._sources = current
            self._weights = [_BlockWeights.read(block) for block in blocks]
        return True

    def __call__(self, x: mx.array, depth: int, keep=()) -> tuple[mx.array, dict]:
        """The first `depth` blocks on `x` (B, N, D): (output, {i: block i's output for i in keep})."""
        shares = min(workers.cores(), x.shape[0])
        with workers.lock:
            if shares < 2:
                return self._trunk(x, depth, keep, workers.split, threading.Event())
            return self._shares(x, depth, keep, shares)

    def _shares(self, x: mx.array, depth: int, keep, n: int) -> tuple[mx.array, dict]:
        edges = [round(i * x.shape[0] / n) for i in range(n + 1)]
        shares = [x[a:b] for a, b in zip(edges, edges[1:], strict=False)]
        mx.eval(shares)  # a worker's stream cannot evaluate work pending on this thread's stream
        cancel = threading.Event()
        with workers.single_threaded_blas():
            jobs = [
                worker.submit(
                    workers.in_worker_stream, self._trunk, share, depth, keep, workers.inline, cancel
                )
                for worker, share in zip(workers.pool(n), shares, strict=True)
            ]
            workers.join(jobs, cancel)  # every share done before the BLAS gets its threads back
        results = [job.result() for job in jobs]
        out = mx.concatenate([h for h, _ in results], axis=0)
        return out, {i: mx.concatenate([kept[i] for _, kept in results], axis=0) for i in keep}

    def _trunk(self, x: mx.array, depth: int, keep, run, cancel: threading.Event) -> tuple[mx.array, dict]:
        """The blocks on this thread; `run` spreads attention's heads (`workers.split`) or not (`inline`)."""
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
                raise workers.Stopped
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
