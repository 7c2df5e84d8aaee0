"""The layers the Core ML programs share, written with coremltools' MIL builder, and the weights they take.

Every layer takes the builder `mb` as its first argument, so this module never imports coremltools: the
export checks that it is installed before any program is built. Choices, each for float16 on Core ML's GPU
and Neural Engine:
- RMSNorm squares activations, which overflows float16 (residual streams reach thousands), so it divides by
  m = max(max|x|, 1) first: x / rms(x) == y / sqrt(mean(y²) + eps / m²) for y = x / m, exactly;
- attention splits heads into 4-D (1, H, N, hd) tensors for two batched matmuls, SwiGLU is silu * up, and
  nothing needs dynamic shapes.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..quantized import QuantizedLinear


def numpy_params(module: nn.Module) -> dict[str, np.ndarray]:
    """A module's parameters as float32 numpy arrays. MLX-quantized layers (from `aim-mlx convert -q`) are
    dequantized by aim_mlx.quantized, the runtime's own unpacking: Core ML compression is --compress's job."""
    params = dict(tree_flatten(module.parameters()))
    for name, layer in module.named_modules():
        if isinstance(layer, nn.QuantizedLinear):
            prefix = f"{name}." if name else ""
            for key in ("scales", "biases"):
                params.pop(prefix + key, None)
            params[prefix + "weight"] = QuantizedLinear.float_weight(layer)  # (out, in)
    return {k: np.array(v.astype(mx.float32)) for k, v in params.items()}


def split_heads(mb, x, heads: int):
    """(1, N, D) -> (1, H, N, hd)."""
    _, n, d = x.shape
    return mb.transpose(x=mb.reshape(x=x, shape=[1, n, heads, d // heads]), perm=[0, 2, 1, 3])


def rms_norm(mb, x, weight, eps: float):
    """RMSNorm over the last axis that float16 cannot overflow: x / rms(x) == y / sqrt(mean(y²) + eps / m²)
    for y = x / m, and m = max(max|x|, 1) keeps |y| <= 1."""
    m = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True), y=np.float32(1.0))
    y = mb.real_div(x=x, y=m)
    mean_sq = mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)
    mean_sq = mb.add(x=mean_sq, y=mb.real_div(x=np.float32(eps), y=mb.mul(x=m, y=m)))
    return mb.mul(x=mb.mul(x=y, y=mb.rsqrt(x=mean_sq)), y=weight)


def l2_normalize(mb, x):
    """x / |x| over the last axis, scaled by max|x| first for the same float16 reason as `rms_norm`."""
    y = mb.real_div(x=x, y=mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True))
    return mb.mul(x=y, y=mb.rsqrt(x=mb.reduce_sum(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)))


def transformer(mb, x, w: dict, prefix: str, layers: int, heads: int, eps: float, mask=None):
    """Pre-norm blocks on (1, N, D): `x + attn(norm_1(x))`, then `x + mlp(norm_2(x))`. `mask`, added to
    the attention scores, makes it causal."""
    _, n, d = x.shape
    hd = d // heads
    for i in range(layers):
        b = f"{prefix}{i}."
        h = rms_norm(mb, x, w[b + "norm_1.weight"], eps)
        qkv = w[b + "attn.qkv.weight"]  # (3D, D), rows q, k, v
        # The softmax scale is folded into the query weights: one op fewer, smaller float16 scores.
        q = split_heads(mb, mb.linear(x=h, weight=qkv[:d] * np.float32(hd**-0.5)), heads)
        k = split_heads(mb, mb.linear(x=h, weight=qkv[d : 2 * d]), heads)
        v = split_heads(mb, mb.linear(x=h, weight=qkv[2 * d :]), heads)
        scores = mb.matmul(x=q, y=k, transpose_y=True)  # (1, H, N, N)
        if mask is not None:
            scores = mb.add(x=scores, y=mask)
        out = mb.transpose(x=mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v), perm=[0, 2, 1, 3])  # (1,N,H,hd)
        x = mb.add(x=x, y=mb.linear(x=mb.reshape(x=out, shape=[1, n, d]), weight=w[b + "attn.proj.weight"]))
        h = rms_norm(mb, x, w[b + "norm_2.weight"], eps)
        gate = mb.linear(x=h, weight=w[b + "mlp.fc1.weight"])
        up = mb.linear(x=h, weight=w[b + "mlp.fc3.weight"])
        x = mb.add(x=x, y=mb.linear(x=mb.mul(x=mb.silu(x=gate), y=up), weight=w[b + "mlp.fc2.weight"]))
    return x


def attention_pool(mb, x, w: dict, prefix: str, heads: int):
    """Attention pooling, (1, N, D) tokens -> (1, D): the learned `cls_token` is the query (a constant, no
    projection), `k` and `v` project the tokens, and `linear` (with bias) mixes the heads."""
    _, _, d = x.shape
    hd = d // heads
    k = split_heads(mb, mb.linear(x=x, weight=w[prefix + "k.weight"], bias=w.get(prefix + "k.bias")), heads)
    v = split_heads(mb, mb.linear(x=x, weight=w[prefix + "v.weight"], bias=w.get(prefix + "v.bias")), heads)
    q = w[prefix + "cls_token"].reshape(1, heads, 1, hd) * np.float32(hd**-0.5)  # (1, H, 1, hd)
    scores = mb.softmax(x=mb.matmul(x=q, y=k, transpose_y=True), axis=-1)  # (1, H, 1, N)
    out = mb.reshape(x=mb.matmul(x=scores, y=v), shape=[1, d])  # (1, D), head-major as in MLX
    return mb.linear(x=out, weight=w[prefix + "linear.weight"], bias=w[prefix + "linear.bias"])
