"""AIMv2 vision encoder in MLX: patch embedding, pre-norm SwiGLU transformer, final RMSNorm.

This is the model: what runs on Apple GPUs, in half precision and wherever no faster backend is installed,
and what a faster backend (aim_mlx/backends) must reproduce. Parameter names follow Apple's checkpoints
(checkpoints/layouts.py maps the other layouts onto them). Inputs are NHWC.

The layers are shared with AIMv1 (models/aimv1.py), whose blocks differ only in the norm (LayerNorm with
bias) and the MLP (GELU, 4 D): `config.norm_type` and `config.mlp_type` choose them. The attention-pooling
head here serves LiT (one query, linear D -> D) and AIMv1's ImageNet probe (BatchNorm first, D -> 1000).
"""

from dataclasses import dataclass
from functools import lru_cache, partial

import mlx.core as mx
import mlx.nn as nn

from .config import VisionConfig


@dataclass
class VisionOutput:
    last_hidden_state: mx.array  # (B, N, D), after the final norm
    pooler_output: mx.array  # (B, D), mean over tokens
    hidden_states: tuple[mx.array, ...] | None = None  # input to block 0, then each block's output


def norm_layer(config: VisionConfig) -> nn.Module:
    """The model's norm: RMSNorm (AIMv2, weight only) or LayerNorm (AIMv1, weight and bias)."""
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class PatchEmbed(nn.Module):
    """Conv(kernel = stride = patch) with bias, as one matmul over flattened patches, then the norm."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        self.patch_size = p
        self.proj = nn.Conv2d(c, d, kernel_size=p, stride=p)  # weight (D, p, p, C), as MLX stores convs
        self.norm = norm_layer(config)

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
    """Fixed 2-D positions (native checkpoint, AIMv1): [sin(col w) | cos(col w) | sin(row w) | cos(row w)]."""
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
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)  # (B, H, N, hd)
        mask = "causal" if self.causal else None
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # (B, H, N, hd)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, d))


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one fused kernel (mx.compile): on a GPU, no (B, N, M) intermediate is written and
    read back between the two; the values are those of the plain expression."""
    return nn.silu(gate) * up


class SwiGLU(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.fc1 = nn.Linear(d, m, bias=bias)  # gate
        self.fc2 = nn.Linear(m, d, bias=bias)  # down
        self.fc3 = nn.Linear(d, m, bias=bias)  # up

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(swiglu(self.fc1(x), self.fc3(x)))


class MLP(nn.Module):
    """AIMv1's MLP: fc2(gelu(fc1(x))), GELU exact (erf), as torch's nn.GELU()."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.fc1 = nn.Linear(d, m, bias=bias)
        self.fc2 = nn.Linear(m, d, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(x)))


MLPS = {"swiglu": SwiGLU, "gelu": MLP}  # config.mlp_type -> the block's MLP


class Block(nn.Module):
    def __init__(self, config: VisionConfig, causal: bool = False):
        super().__init__()
        self.norm_1 = norm_layer(config)
        self.attn = Attention(config, causal)
        self.norm_2 = norm_layer(config)
        self.mlp = MLPS[config.mlp_type](config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class BlockStack(nn.Module):
    """A module whose `blocks` run one after the other: the vision trunk, and the LiT text tower.

    `backend`, given when the stack is built, makes a faster runner of the same blocks
    (platform/numpy_blocks.py: `backend(stack)`); the runner says per call whether it `takes` the input,
    and must give the same results, so None (the MLX blocks alone) changes speed only."""

    def __init__(self, blocks: list[nn.Module], backend=None):
        super().__init__()
        self.blocks = blocks
        self.backend = backend(self) if backend is not None else None

    def run_blocks(self, x: mx.array, depth: int | None = None, keep=()) -> tuple[mx.array, dict]:
        """The first `depth` blocks (default: all) applied to `x` (B, N, D): (output, {i: block i's output
        for i in keep})."""
        depth = len(self.blocks) if depth is None else depth
        if self.backend is not None and self.backend.takes(x):
            return self.backend(x, depth, keep)
        kept = {}
        for i, block in enumerate(self.blocks[:depth]):
            x = block(x)
            if i in keep:
                kept[i] = x
        return x, kept


def block_indices(num_blocks: int, indices=None) -> list[int]:
    """timm's `indices`: None -> every block, n -> the last n, a sequence -> those (negative from the end);
    sorted, in range."""
    if indices is None:
        return list(range(num_blocks))
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"asked for the last {indices} blocks of {num_blocks}")
        return list(range(num_blocks - indices, num_blocks))
    chosen = sorted({i % num_blocks if -num_blocks <= i < num_blocks else i for i in indices})
    if not chosen or chosen[0] < 0 or chosen[-1] >= num_blocks:
        raise ValueError(f"block indices {list(indices)} are not within the {num_blocks} blocks")
    return chosen


class AIMv2VisionEncoder(BlockStack):
    """The AIMv2 vision encoder: `model(pixels)` -> VisionOutput (final tokens, their mean, optionally every
    hidden state), `encode_image(pixels)` -> (B, D), `forward_intermediates(pixels, indices, norm,
    stop_early)` -> chosen blocks' outputs. Pixels are NHWC float32, as the processor makes them."""

    family = "aimv2"  # its row in aim_mlx/registry.py

    def __init__(self, config: VisionConfig, backend=None, info=None):
        super().__init__([Block(config) for _ in range(config.num_hidden_layers)], backend)
        self.config = config
        self.info = info  # what load() loaded (a registry.ModelInfo): the identity caches and indexes use
        self.patch_embed = PatchEmbed(config)
        if not config.is_native:
            self.pos_embed = mx.zeros((config.num_patches, config.hidden_size))  # learned, (N, D)
        self.post_trunk_norm = norm_layer(config)

    @property
    def dims(self) -> dict:
        return self.config.dims

    def embed_patches(self, pixel_values: mx.array) -> mx.array:
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
        x0 = self.embed_patches(pixel_values)  # (B, N, D)
        keep = range(len(self.blocks)) if output_hidden_states else ()
        x, kept = self.run_blocks(x0, keep=keep)
        x = self.post_trunk_norm(x)
        return VisionOutput(
            last_hidden_state=x,
            # In float32: a float16 sum over the tokens overflows (65504) long before their mean does.
            pooler_output=x.astype(mx.float32).mean(axis=1).astype(x.dtype),  # (B, D)
            hidden_states=(x0, *(kept[i] for i in keep)) if output_hidden_states else None,
        )

    def forward_intermediates(
        self, pixel_values: mx.array, indices=None, norm: bool = False, stop_early: bool = False
    ) -> list[mx.array]:
        """The outputs of the chosen blocks (timm's `indices`: None, the last n, or a list), each (B, N, D),
        in block order; `norm` applies the final norm to each; `stop_early` skips the blocks after the
        last one chosen. The final token grid is `indices=[-1], norm=True`."""
        chosen = block_indices(len(self.blocks), indices)
        depth = chosen[-1] + 1 if stop_early else None
        _, kept = self.run_blocks(self.embed_patches(pixel_values), depth, keep=chosen)
        return [self.post_trunk_norm(kept[i]) if norm else kept[i] for i in chosen]

    def encode_image(self, pixel_values: mx.array) -> mx.array:
        """Pooled embeddings (B, D): the mean of the final token grid."""
        return self(pixel_values).pooler_output


class RunningNorm(nn.Module):
    """BatchNorm at inference without affine parameters: (x - running_mean) / sqrt(running_var + eps) per
    channel. Written out rather than nn.BatchNorm, so that no training flag can switch it to batch
    statistics."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.running_mean = mx.zeros((dim,))
        self.running_var = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return (x - self.running_mean) * mx.rsqrt(self.running_var + self.eps)


class AttentionPoolingHead(nn.Module):
    """One learned query (no q projection) attends over the token grid with the model's heads; then `linear`.

    LiT: linear D -> D with bias. AIMv1's ImageNet probe: a RunningNorm over channels first
    (`batch_norm_eps`), linear D -> classes without bias. `pool` gives the pooled (B, D) vector before
    `linear`."""

    def __init__(
        self,
        config: VisionConfig,
        out_features: int | None = None,
        linear_bias: bool = True,
        batch_norm_eps: float | None = None,
    ):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        if batch_norm_eps is not None:
            self.bn = RunningNorm(d, batch_norm_eps)
        self.cls_token = mx.zeros((1, 1, d))
        self.k = nn.Linear(d, d, bias=config.qkv_bias)
        self.v = nn.Linear(d, d, bias=config.qkv_bias)
        self.linear = nn.Linear(d, out_features or d, bias=linear_bias)

    def pool(self, x: mx.array) -> mx.array:
        """(B, N, D) tokens -> (B, D): the query's attention output, heads concatenated."""
        if "bn" in self:
            x = self.bn(x)
        b, n, d = x.shape
        h = self.num_heads
        k = self.k(x).reshape(b, n, h, d // h).transpose(0, 2, 1, 3)  # (B, H, N, hd)
        v = self.v(x).reshape(b, n, h, d // h).transpose(0, 2, 1, 3)  # (B, H, N, hd)
        q = mx.broadcast_to(self.cls_token.reshape(1, h, 1, d // h), (b, h, 1, d // h))  # (B, H, 1, hd)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=(d // h) ** -0.5)  # (B, H, 1, hd)
        return out.reshape(b, d)  # with one query, (B, H, 1, hd) is already head-major

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(self.pool(x))
