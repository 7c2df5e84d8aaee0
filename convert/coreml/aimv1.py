"""AIMv1's ImageNet classifier as a MIL program: (1, 3, 224, 224) pixels in, (1, classes) probabilities out.

The trunk is vision.py's with AIMv1's LayerNorm and GELU MLP, built only up to the highest probed
block; `head_probabilities` is its pooling: the mean of the probed blocks' outputs goes through the BatchNorm
(running statistics, no affine), the attention probe (one learned query, the model's heads), the Linear
D -> classes and a softmax, so that coreml.classifier_model can make a Core ML classifier of it.
"""

import numpy as np

from aim_mlx.errors import ConfigError
from aim_mlx.models.aimv1 import AIMv1

from .layers import attention_pool, numpy_params

# Every parameter the program reads; anything else (e.g. a bias the published checkpoints do not have) is
# refused rather than silently dropped. post_trunk_norm exists in the checkpoint, and the classifier skips it.
SUFFIXES = ("weight", "bias", "cls_token", "running_mean", "running_var")


def aimv1_weights(model) -> dict[str, np.ndarray]:
    """The AIMv1 model's weights as numpy, refusing anything the program does not build."""
    if not isinstance(model, AIMv1):
        raise ConfigError(f"the AIMv1 classifier export takes an AIMv1 model, not a {type(model).__name__}")
    params = numpy_params(model)
    odd = sorted(k for k in params if not k.endswith(SUFFIXES))
    if odd:
        raise ConfigError(f"cannot export a model with the parameter {odd[0]}: not an AIMv1 layer")
    if model.config.qkv_bias or model.config.mlp_bias:
        raise ConfigError("Core ML export supports the published AIMv1 models, which have no qkv/MLP biases")
    return params


def head_probabilities(w: dict[str, np.ndarray], heads: int, eps: float):
    """The pooling for vision.build_program with probe_layers: the probed mean (1, N, D) ->
    (1, classes) softmax probabilities. The BatchNorm is one multiply-add per channel, its constants
    computed here in float64: (x - mean) / sqrt(var + eps) = x · a - mean · a."""
    a = 1 / np.sqrt(w["head.bn.running_var"].astype(np.float64) + eps)  # (D,)
    gain = a.astype(np.float32)[None, None]  # (1, 1, D)
    shift = (-w["head.bn.running_mean"].astype(np.float64) * a).astype(np.float32)[None, None]

    def pool(mb, x, fused: bool):
        x = mb.add(x=mb.mul(x=x, y=gain), y=shift)  # (1, N, D)
        logits = attention_pool(mb, x, w, "head.", heads, fused)  # (1, classes)
        return mb.softmax(x=logits, axis=-1)

    return pool
