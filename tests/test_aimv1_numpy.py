"""The numpy backend on AIMv1's blocks (LayerNorm with bias, the exact-GELU MLP): its GELU, which has no erf
to call, against torch's exact one; its trunk against the MLX blocks; what it refuses. Whole models with the
backend installed, against the torch reference, are in test_aimv1.py."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from aim_mlx.models import aimv2, quantized
from aim_mlx.models.config import AIMv1Config
from aim_mlx.platform import blas, numpy_blocks

needs_blas = pytest.mark.skipif(not blas.loaded(), reason="the numpy backend needs the fast BLAS (Linux)")


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def test_the_gelu_is_torchs_exact_gelu_to_float32_rounding():
    """Abramowitz-Stegun 7.1.26 errs by 1.5e-7 at most in erf: measured 1.5e-7 x max(1, |x|) here, as much as
    torch's own float32 GELU (1.6e-7) and MLX's (1.7e-7). One coefficient off by 1e-4 of itself errs by
    2.5e-5, the tanh approximation by 1.8e-4: either fails the bound."""
    x = np.linspace(-10, 10, 400_000, dtype=np.float32).reshape(400, 1000)  # 6 slabs of 64 rows and a part
    exact = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    ours = np.full_like(x, np.nan)
    numpy_blocks._gelu(x, ours)
    assert (np.abs(ours - exact) / np.maximum(1, np.abs(x))).max() < 2.5e-7
    assert (ours[x < 0] <= 0).all() and (ours[x > 0] > 0).all()  # the tail keeps its sign, not only ~0
    part = np.full_like(x, np.nan)  # slabs lo..hi-1, as a caller splitting the rows would ask
    rows = slice(numpy_blocks.ACT_ROWS, 3 * numpy_blocks.ACT_ROWS)
    numpy_blocks._gelu(x, part, 1, 3)
    assert np.array_equal(part[rows], ours[rows])
    assert np.isnan(np.delete(part, np.arange(400)[rows], axis=0)).all()


def aimv1_blocks(n: int = 3) -> list[aimv2.Block]:
    """AIMv1 blocks (600M's head width) with random norms: MLX initialises LayerNorm to weight one, bias
    zero, which would hide a swapped or missing bias."""
    config = AIMv1Config(hidden_size=96, num_attention_heads=12, intermediate_size=384, num_hidden_layers=n)
    blocks = [aimv2.Block(config) for _ in range(n)]
    for block in blocks:
        for norm in (block.norm_1, block.norm_2):
            norm.weight = 1 + 0.2 * mx.random.normal(norm.weight.shape)
            norm.bias = 0.5 * mx.random.normal(norm.bias.shape)
    return blocks


@needs_blas
@pytest.mark.parametrize("quantize", [False, True])
def test_numpy_trunk_matches_aimv1s_mlx_blocks(quantize):
    """Every block's output against the blocks' own MLX loop, float32 and with aim-mlx's quantized layers
    (4-bit attention, 8-bit MLP, unpacked just before their GEMM as the MLX path does)."""
    mx.random.seed(5)
    blocks = aimv1_blocks()
    if quantize:
        for block in blocks:
            quantized.quantize(block.attn, {"group_size": 32, "bits": 4, "mode": quantized.MODE})
            quantized.quantize(block.mlp, {"group_size": 32, "bits": 8, "mode": quantized.MODE})
    x = 3 * mx.random.normal((2, 9, 96), key=mx.random.key(3))  # wide enough to reach GELU's tails
    expected = [x]
    for block in blocks:
        expected.append(block(expected[-1]))
    assert numpy_blocks.unsupported(blocks) is None
    trunk = aimv2.BlockStack(blocks, backend=numpy_blocks.NumpyBlocks)
    assert trunk.backend.takes(x)  # the numpy backend runs these calls, not MLX's loop
    out, kept = trunk.run_blocks(x, 3, keep=range(3))
    assert sorted(kept) == [0, 1, 2] and rel_err(out, np.asarray(expected[-1])) < 1e-5
    for i in range(3):
        assert rel_err(kept[i], np.asarray(expected[i + 1])) < 1e-5, f"block {i}"
    two, _ = trunk.run_blocks(x[:1], 2)  # one image: one trunk, attention split over the cores
    assert rel_err(two, np.asarray(expected[2][:1])) < 1e-5


@needs_blas
def test_numpy_trunk_refuses_what_it_does_not_run():
    assert numpy_blocks.unsupported(aimv1_blocks(2)) is None
    half = aimv1_blocks(1)
    half[0].set_dtype(mx.float16)
    assert (
        numpy_blocks.unsupported(half)
        == "block 0's norms are not float32 RMSNorms or LayerNorms with a weight"
    )
    plain = aimv1_blocks(1)
    plain[0].norm_2 = nn.LayerNorm(96, affine=False)
    assert "with a weight" in numpy_blocks.unsupported(plain)
    other = aimv1_blocks(2)
    other[1].mlp = nn.Sequential(nn.Linear(96, 384), nn.Linear(384, 96))
    assert (
        numpy_blocks.unsupported(other)
        == "block 1's MLP is a Sequential, not AIMv2's SwiGLU or AIMv1's GELU MLP"
    )
