"""AIMv2 vision encoder in MLX: patch embedding, pre-norm SwiGLU transformer, final RMSNorm.

Parameter names follow Apple's checkpoints (weights.py maps the other layouts onto them). Inputs are NHWC.
"""

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from ..config import VisionConfig
from . import cpu


@dataclass
class VisionOutput:
    last_hidden_state: mx.array  # (B, N, D), after the final norm
    pooler_output: mx.array  # (B, D), mean over tokens
    hidden_states: tuple[mx.array, ...] | None = None  # input to block 0, then each block's output


class PatchEmbed(nn.Module):
    """Conv(kernel = stride = patch) with bias, written as one matmul over flattened patches, then RMSNorm."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        self.patch_size = p
        self.proj = nn.Conv2d(c, d, kernel_size=p, stride=p)  # weight (D, p, p, C), as MLX stores convs
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p  # the conv floors: trailing pixels that fill no patch are dropped
        x = x[:, : gh * p, : gw * p, :].reshape(b, gh, p, gw, p, c)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)  # (B, N, p*p*C), rows outer
        # A strided conv is a matmul on patches; BLAS sgemm is far faster than MLX's CPU conv here.
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)  # (D, p*p*C)
        x = mx.addmm(self.proj.bias, x, weight.T)  # (B, N, D)
        return self.norm(x)


@lru_cache(maxsize=32)
def sincos_2d(grid_h: int, grid_w: int, dim: int) -> mx.array:
    """Fixed 2-D positions for the native checkpoint: [sin(col w) | cos(col w) | sin(row w) | cos(row w)]."""
    omega = 1.0 / 10000 ** (mx.arange(dim // 4, dtype=mx.float32) / (dim // 4))  # (D/4,)
    rows, cols = mx.meshgrid(
        mx.arange(grid_h, dtype=mx.float32), mx.arange(grid_w, dtype=mx.float32), indexing="ij"
    )
    col = cols.reshape(-1, 1) * omega  # (N, D/4)
    row = rows.reshape(-1, 1) * omega  # (N, D/4)
    table = mx.concatenate([mx.sin(col), mx.cos(col), mx.sin(row), mx.cos(row)], axis=1)  # (N, D)
    mx.eval(table)
    return table


class Attention(nn.Module):
    def __init__(self, config: VisionConfig, causal: bool = False):
        super().__init__()
        self.causal = causal  # the LiT text tower: each token attends to itself and the tokens before it
        self.num_heads = config.num_attention_heads
        self.scale = (config.hidden_size // config.num_attention_heads) ** -0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(attention(self.qkv(x), self.num_heads, self.scale, self.causal))


def attention(qkv: mx.array, num_heads: int, scale: float, causal: bool = False) -> mx.array:
    """softmax(q k^T * scale) v for every head, from the packed projections (B, N, 3D) -> (B, N, D).
    `causal`: query i sees keys 0..i only. MLX's fused kernel, except on the CPU in float32, where cpu.py's
    kernel is 2-3x faster than the fused op's CPU fallback."""
    if cpu.active(qkv):
        return cpu.attention(qkv, num_heads, scale, causal)
    b, n, three_d = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, num_heads, -1).transpose(2, 0, 3, 1, 4)  # each (B, H, N, hd)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)
    return out.transpose(0, 2, 1, 3).reshape(b, n, three_d // 3)


class SwiGLU(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.fc1 = nn.Linear(d, m, bias=bias)  # gate
        self.fc2 = nn.Linear(m, d, bias=bias)  # down
        self.fc3 = nn.Linear(d, m, bias=bias)  # up

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.fc1(x), self.fc3(x)
        return self.fc2(cpu.silu_mul(gate, up) if cpu.active(gate) else nn.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: VisionConfig, causal: bool = False):
        super().__init__()
        self.norm_1 = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Attention(config, causal)
        self.norm_2 = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


def run_in_order(blocks, x: mx.array, keep_hidden: bool = False):
    """`blocks` applied to `x` one after the other: (output, [x, each block's output] when `keep_hidden`, else
    None). On the CPU in float32 the whole trunk runs in numpy (cpu.run_trunk), elsewhere in MLX."""
    if cpu.trunk_ready(x, blocks):
        return cpu.run_trunk(blocks, x, keep_hidden)
    hidden = [x] if keep_hidden else None
    for block in blocks:
        x = block(x)
        if hidden is not None:
            hidden.append(x)
    return x, hidden


class AIMv2VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        if not config.is_native:
            self.pos_embed = mx.zeros((config.num_patches, config.hidden_size))  # learned, (N, D)
        self.blocks = [Block(config) for _ in range(config.num_hidden_layers)]
        self.post_trunk_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed(self, pixel_values: mx.array) -> mx.array:
        """Patch embedding plus positions: the input to block 0, (B, N, D)."""
        pixel_values = pixel_values.astype(self.patch_embed.proj.weight.dtype)
        x = self.patch_embed(pixel_values)
        p = self.config.patch_size
        grid = (pixel_values.shape[1] // p, pixel_values.shape[2] // p)
        if self.config.is_native:
            pos = sincos_2d(*grid, self.config.hidden_size).astype(x.dtype)
        else:
            if x.shape[1] != self.pos_embed.shape[0]:
                raise ValueError(
                    f"this checkpoint takes {self.config.image_size}x{self.config.image_size} images "
                    f"({self.pos_embed.shape[0]} patches); got a {grid[0]}x{grid[1]} patch grid"
                )
            pos = self.pos_embed
        return x + pos

    def __call__(self, pixel_values: mx.array, output_hidden_states: bool = False) -> VisionOutput:
        x = self.embed(pixel_values)  # (B, N, D)
        if (workers := cpu.workers(x)) > 1:  # the CPU: each core takes a share of the batch
            x, hidden = cpu.run_blocks(self.blocks, x, workers, output_hidden_states)
        else:
            x, hidden = run_in_order(self.blocks, x, output_hidden_states)
        x = self.post_trunk_norm(x)
        return VisionOutput(
            last_hidden_state=x,
            pooler_output=x.mean(axis=1),
            hidden_states=None if hidden is None else tuple(hidden),
        )

    def encode_image(self, pixel_values: mx.array) -> mx.array:
        """Pooled embeddings (B, D): the mean of the final token grid."""
        return self(pixel_values).pooler_output
