"""The layers the Core ML programs share, written with coremltools' MIL builder, and the weights they take.

Every layer takes the builder `mb` as its first argument, so this module never imports coremltools: the
export checks that it is installed before any program is built. Choices, each for float16 on Core ML's GPU
and Neural Engine:
- RMSNorm squares activations, which overflows float16 (residual streams reach thousands), so it divides by
  m = max(max|x|, 1) first: x / rms(x) == y / sqrt(mean(y²) + eps / m²) for y = x / m, exactly. NORMS holds
  its two formulations: `layer_norm` (default), one op that Core ML has a native Neural Engine layer for,
  and `reduce`, the square/reduce_mean/rsqrt chain it replaced; both verified against MLX
  (tests/test_coreml_ops.py);
- attention splits heads into 4-D (1, H, N, hd) tensors; from iOS18/macOS15 it is the fused
  `scaled_dot_product_attention` op, before that two batched matmuls around a softmax; SwiGLU is silu * up,
  and nothing needs dynamic shapes;
- AIMv1's LayerNorm is RMSNorm of the centred row, so it takes the same overflow guard and formulations.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from aim_mlx.models.quantized import QuantizedLinear


def numpy_params(module: nn.Module) -> dict[str, np.ndarray]:
    """A module's parameters as float32 numpy arrays. MLX-quantized layers (from `aim-mlx convert -q`) are
    dequantized by models/quantized.py (the runtime's unpacking): Core ML compression is --compress's job."""
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


NORMS = ("layer_norm", "reduce")
DEFAULT_NORM = "layer_norm"


def rms_norm(mb, x, weight, eps: float, norm: str = DEFAULT_NORM):
    """RMSNorm over the last axis that float16 cannot overflow: x / rms(x) == y / sqrt(mean(y²) + eps / m²)
    for y = x / m, and m = max(max|x|, 1) keeps |y| <= 1.

    `layer_norm`: RMSNorm is LayerNorm of a row whose mean is 0. z = [y, -y, c, -c] has mean 0 and variance
    (D·mean(y²) + c²) / (D + 1); with c = sqrt(D·eps) / m that is D/(D+1) · (mean(y²) + eps / m²), so
    layer_norm(z, epsilon=0)[:D] · sqrt(D/(D+1)) is exactly the norm above. layer_norm's own epsilon is a
    constant and cannot carry eps / m², which depends on the row: eps itself there would be eps·m² in x's
    scale, a relative error up to D·eps/2 (5e-3 for D = 1024) once max|x| is well above 1 (at AIMv2-L
    width it put a 4-block float32 package at 1.6e-4 of the output scale, past its 1e-4 bound). c carries it
    instead, and keeps the variance above 0 for an all-zero row, with no square of m (m·m in `reduce` is
    inf in float16 once max|x| > 256; eps / inf = 0 keeps that harmless in the evaluator, but it is an inf
    on the device). `reduce`: mean of squares and rsqrt."""
    if norm not in NORMS:
        raise ValueError(f"unknown RMSNorm formulation {norm!r}; one of {', '.join(NORMS)}")
    m = _row_scale(mb, x)
    return _scaled_rms_norm(mb, mb.real_div(x=x, y=m), m, weight, eps, norm)


def layer_norm(mb, x, weight, bias, eps: float, norm: str = DEFAULT_NORM):
    """LayerNorm over the last axis (AIMv1), as safe from float16 overflow as `rms_norm`: LayerNorm(x) is
    RMSNorm of the centred row, so with y = x / m the row y - mean(y) (|.| <= 2) goes through rms_norm's
    formulation with the same eps / m², then `bias` is added. The mean is taken of y, not x: a float16 sum
    of x's row can pass 65504 where every element fits."""
    if norm not in NORMS:
        raise ValueError(f"unknown LayerNorm formulation {norm!r}; one of {', '.join(NORMS)}")
    m = _row_scale(mb, x)
    y = mb.real_div(x=x, y=m)
    centred = mb.sub(x=y, y=mb.reduce_mean(x=y, axes=[-1], keep_dims=True))
    return mb.add(x=_scaled_rms_norm(mb, centred, m, weight, eps, norm), y=bias)


def _row_scale(mb, x):
    """m = max(max|x|, 1) per row (..., 1): dividing by it keeps every element and square within 1."""
    return mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True), y=np.float32(1.0))


def _scaled_rms_norm(mb, y, m, weight, eps: float, norm: str):
    """RMSNorm of x = y · m, given y (|y| <= 2) and m: y / sqrt(mean(y²) + eps / m²) · weight, in the
    formulation `norm` (see rms_norm)."""
    if norm == "reduce":
        mean_sq = mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)
        mean_sq = mb.add(x=mean_sq, y=mb.real_div(x=np.float32(eps), y=mb.mul(x=m, y=m)))
        return mb.mul(x=mb.mul(x=y, y=mb.rsqrt(x=mean_sq)), y=weight)
    d, rank = y.shape[-1], len(y.shape)
    c = mb.real_div(x=np.float32(np.sqrt(d * eps)), y=m)  # (..., 1)
    z = mb.concat(values=[y, mb.mul(x=y, y=np.float32(-1)), c, mb.mul(x=c, y=np.float32(-1))], axis=-1)
    gamma = np.concatenate([weight * np.sqrt(d / (d + 1)), np.zeros(d + 2)]).astype(np.float32)  # (2D + 2,)
    out = mb.layer_norm(x=z, axes=[-1], gamma=gamma, epsilon=np.float32(0))  # (..., 2D + 2)
    return mb.slice_by_index(
        x=out, begin=[0] * rank, end=[0] * (rank - 1) + [d], end_mask=[True] * (rank - 1) + [False]
    )


def block_norm(mb, x, w: dict, name: str, norm_type: str, eps: float, norm: str = DEFAULT_NORM):
    """The norm whose parameters are `name`.weight (and .bias): config.norm_type rmsnorm (AIMv2) or
    layernorm (AIMv1)."""
    if norm_type == "layernorm":
        return layer_norm(mb, x, w[name + ".weight"], w[name + ".bias"], eps, norm)
    return rms_norm(mb, x, w[name + ".weight"], eps, norm)


def l2_normalize(mb, x):
    """x / |x| over the last axis, scaled by max|x| first for the same float16 reason as `rms_norm`."""
    y = mb.real_div(x=x, y=mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True))
    return mb.mul(x=y, y=mb.rsqrt(x=mb.reduce_sum(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)))


def attention(mb, q, k, v, fused: bool, mask=None):
    """softmax(q·kᵀ + mask)·v on (1, H, L, hd) heads -> (1, H, L, hd). `fused`: iOS18's
    scaled_dot_product_attention, which scales by hd^-0.5 itself; otherwise two matmuls around a softmax and
    `q` comes scaled already (folded into its weights: one op fewer, smaller float16 scores)."""
    if fused:
        return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask)
    scores = mb.matmul(x=q, y=k, transpose_y=True)  # (1, H, L, N)
    if mask is not None:
        scores = mb.add(x=scores, y=mask)
    return mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v)


def transformer(
    mb,
    x,
    w: dict,
    prefix: str,
    layers: int,
    heads: int,
    eps: float,
    fused: bool,
    norm: str,
    mask=None,
    norm_type: str = "rmsnorm",
    mlp_type: str = "swiglu",
    keep=(),
):
    """Pre-norm blocks on (1, N, D): `x + attn(norm_1(x))`, then `x + mlp(norm_2(x))`. `mask`, added to
    the attention scores, makes it causal; `fused` and `norm` choose the formulations (see above);
    `norm_type` and `mlp_type` are the config's (AIMv2: rmsnorm, swiglu; AIMv1: layernorm, gelu).
    Returns the output, or with `keep` (block indices) (output, {i: block i's output})."""
    _, n, d = x.shape
    hd = d // heads
    scale = np.float32(1 if fused else hd**-0.5)
    kept = {}
    for i in range(layers):
        b = f"{prefix}{i}."
        h = block_norm(mb, x, w, b + "norm_1", norm_type, eps, norm)
        qkv = w[b + "attn.qkv.weight"]  # (3D, D), rows q, k, v
        q = split_heads(mb, mb.linear(x=h, weight=qkv[:d] * scale), heads)
        k = split_heads(mb, mb.linear(x=h, weight=qkv[d : 2 * d]), heads)
        v = split_heads(mb, mb.linear(x=h, weight=qkv[2 * d :]), heads)
        out = mb.transpose(x=attention(mb, q, k, v, fused, mask), perm=[0, 2, 1, 3])  # (1, N, H, hd)
        x = mb.add(x=x, y=mb.linear(x=mb.reshape(x=out, shape=[1, n, d]), weight=w[b + "attn.proj.weight"]))
        h = block_norm(mb, x, w, b + "norm_2", norm_type, eps, norm)
        if mlp_type == "gelu":  # AIMv1: fc2(gelu(fc1(h))), the exact (erf) GELU as torch's nn.GELU()
            hidden = mb.gelu(x=mb.linear(x=h, weight=w[b + "mlp.fc1.weight"]), mode="EXACT")
        else:
            gate = mb.linear(x=h, weight=w[b + "mlp.fc1.weight"])
            hidden = mb.mul(x=mb.silu(x=gate), y=mb.linear(x=h, weight=w[b + "mlp.fc3.weight"]))
        x = mb.add(x=x, y=mb.linear(x=hidden, weight=w[b + "mlp.fc2.weight"]))
        if i in keep:
            kept[i] = x
    return (x, kept) if keep else x


def attention_pool(mb, x, w: dict, prefix: str, heads: int, fused: bool):
    """Attention pooling, (1, N, D) tokens -> (1, D'): the learned `cls_token` is the query (a constant, no
    projection), `k` and `v` project the tokens, and `linear` (LiT: D -> D with bias; AIMv1: D -> classes,
    no bias) mixes the heads."""
    _, _, d = x.shape
    hd = d // heads
    k = split_heads(mb, mb.linear(x=x, weight=w[prefix + "k.weight"], bias=w.get(prefix + "k.bias")), heads)
    v = split_heads(mb, mb.linear(x=x, weight=w[prefix + "v.weight"], bias=w.get(prefix + "v.bias")), heads)
    q = w[prefix + "cls_token"].reshape(1, heads, 1, hd) * np.float32(1 if fused else hd**-0.5)  # (1,H,1,hd)
    out = mb.reshape(x=attention(mb, q, k, v, fused), shape=[1, d])  # (1, D), head-major as in MLX
    return mb.linear(x=out, weight=w[prefix + "linear.weight"], bias=w.get(prefix + "linear.bias"))


def fused_attention(opset) -> bool:
    """Whether the deployment target (a coremltools.target member) has scaled_dot_product_attention: iOS18
    and macOS15 (the same opset) onwards. Its own enum, so that this module needs no coremltools import."""
    return opset >= type(opset).iOS18
