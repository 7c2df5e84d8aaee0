"""The AIMv2 vision encoder as a MIL program: (1, 3, S, S) pixels in, `image_embeds` (+ tokens) out.

- The patch embedding is a strided conv; the blocks are mil.py's, with the config's norm and MLP (AIMv1's
  trunk too: LayerNorm, GELU; its probed blocks feed the pooling instead of the final norm).
- Core ML's image preprocessing has one scale for all channels, so the per-channel mean/std sits in the graph.
- The native-resolution checkpoint is built at one size per program, with its sin-cos table as a constant:
  fixed shapes are what the Neural Engine runs, while flexible and enumerated input shapes can send a model
  back to the GPU or CPU.
"""

import numpy as np

from aim_mlx.errors import ConfigError
from aim_mlx.models.aimv2 import AIMv2VisionEncoder, sincos_2d

from .layers import DEFAULT_NORM, block_norm, fused_attention, numpy_params, transformer


def vision_weights(model) -> dict[str, np.ndarray]:
    """The vision encoder's weights, refusing anything the graph below does not build."""
    if not isinstance(model, AIMv2VisionEncoder):
        raise ConfigError(f"Core ML export takes an AIMv2 vision encoder, not a {type(model).__name__}")
    params = numpy_params(model)
    odd = sorted(k for k in params if not k.endswith(("weight", "bias", "pos_embed", "cls_token")))
    if odd:
        raise ConfigError(f"cannot export a model with the parameter {odd[0]}: not an AIMv2 encoder layer")
    if model.config.qkv_bias or model.config.mlp_bias:
        raise ConfigError(
            "Core ML export supports the published AIMv2 encoders, which have no qkv/MLP biases"
        )
    return params


def build_program(
    w: dict[str, np.ndarray],
    config,
    image_size: int,
    mean,
    std,
    rescale: float,
    input_kind: str,
    tokens: bool,
    opset,
    pool=None,
    norm: str = DEFAULT_NORM,
    probe_layers: tuple[int, ...] | None = None,
):
    """The encoder as a MIL program: (1, 3, S, S) pixels in, `image_embeds` (+ `last_hidden_state`) out.

    `pool(mb, tokens, fused)` makes the (1, D') embedding from the final (1, N, D) tokens; default: their
    mean. `norm` is the norms' formulation (mil.NORMS); the attention is fused where `opset` has the op.
    `probe_layers` (AIMv1's head): `pool` gets the mean of these blocks' outputs instead, no final norm,
    and the blocks after the last of them are not built."""
    from coremltools.converters.mil import Builder as mb

    d, p = config.hidden_size, config.patch_size
    eps = config.layer_norm_eps if config.norm_type == "layernorm" else config.rms_norm_eps
    kind = {"norm_type": config.norm_type, "mlp_type": config.mlp_type}
    n = (image_size // p) ** 2
    fused = fused_attention(opset)
    # The native checkpoint's positions: the (N, D) sin-cos table MLX computes for this grid.
    pos = np.array(sincos_2d(image_size // p, image_size // p, d)) if config.is_native else w["pos_embed"]
    # pixel * rescale / std - mean / std, per channel; the identity for already normalised tensors
    gain = (rescale / np.asarray(std, np.float32)).reshape(1, 3, 1, 1).astype(np.float32)
    shift = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(1, 3, 1, 1)

    def encoder(x):
        if input_kind == "image":
            x = mb.add(x=mb.mul(x=x, y=gain), y=shift)
        conv = w["patch_embed.proj.weight"].transpose(0, 3, 1, 2)  # MLX (D, p, p, C) -> Core ML OIHW
        x = mb.conv(x=x, weight=conv, bias=w["patch_embed.proj.bias"], strides=[p, p], pad_type="valid")
        x = mb.transpose(x=mb.reshape(x=x, shape=[1, d, n]), perm=[0, 2, 1])  # (1, N, D), rows outer
        x = mb.add(x=block_norm(mb, x, w, "patch_embed.norm", config.norm_type, eps, norm), y=pos[None])
        heads = config.num_attention_heads
        if probe_layers:
            depth, keep = max(probe_layers) + 1, tuple(probe_layers)
            _, kept = transformer(mb, x, w, "blocks.", depth, heads, eps, fused, norm, keep=keep, **kind)
            # the mean as a sum of x / L: a float16 sum of the blocks passes 65504 long before their mean
            x = mb.mul(x=kept[keep[0]], y=np.float32(1.0 / len(keep)))
            for i in keep[1:]:
                x = mb.add(x=x, y=mb.mul(x=kept[i], y=np.float32(1.0 / len(keep))))  # (1, N, D)
            return mb.identity(x=pool(mb, x, fused), name="image_embeds")
        x = transformer(mb, x, w, "blocks.", config.num_hidden_layers, heads, eps, fused, norm, **kind)
        x = block_norm(mb, x, w, "post_trunk_norm", config.norm_type, eps, norm)
        if pool is None:
            # the mean as a sum of x / N: no partial sum can pass float16's range where every token is in it
            x_n = mb.mul(x=x, y=np.float32(1.0 / n))
            pooled = mb.reduce_sum(x=x_n, axes=[1], keep_dims=False, name="image_embeds")  # (1, D)
        else:
            pooled = mb.identity(x=pool(mb, x, fused), name="image_embeds")
        if tokens:
            return pooled, mb.identity(x=x, name="last_hidden_state")  # (1, N, D)
        return pooled

    # mb.program names the input after the function's argument.
    spec = [mb.TensorSpec(shape=(1, 3, image_size, image_size))]
    if input_kind == "image":

        @mb.program(input_specs=spec, opset_version=opset)
        def program(image):
            return encoder(image)

    else:

        @mb.program(input_specs=spec, opset_version=opset)
        def program(pixel_values):
            return encoder(pixel_values)

    return program
