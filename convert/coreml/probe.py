"""A head from `aim-mlx train` on its AIMv2 base as a MIL program: (1, 3, S, S) pixels in, (1, classes)
probabilities out, for coreml.classifier_model.

The trunk is vision.py's; the pooling is the probe's (models/probe.py):
- linear: the mean of the final tokens (the base's embedding), the fixed standardisation as one multiply-add
  per channel, the Linear, a softmax;
- attentive: AIMv1's head pooling (aimv1.py) over the final tokens, or over the mean of the chosen blocks'
  raw outputs (vision.build_program's probe_layers), with the Linear's bias.
"""

import numpy as np

from aim_mlx.errors import ConfigError

from . import aimv1 as coreml_aimv1
from .layers import numpy_params
from .vision import vision_weights


def probe_weights(net) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the base encoder's weights, the probe's weights under `head.`), refusing a base vision.py cannot
    build: an AIMv2 vision checkpoint at a fixed size."""
    base = net.base
    if base.family != "aimv2" or base.config.is_native:
        raise ConfigError(
            f"Core ML export of a trained head supports heads on fixed-size AIMv2 vision checkpoints; this "
            f"head's base is {base.info.source if base.info is not None else base.family} ({base.family})"
        )
    head = {f"head.{k}": v for k, v in numpy_params(net.head).items()}
    return vision_weights(base), head


def _standardise(w: dict[str, np.ndarray], eps: float):
    """(x - mean) / sqrt(var + eps) as x * a + b, the constants computed in float64."""
    a = 1 / np.sqrt(w["head.bn.running_var"].astype(np.float64) + eps)
    return a.astype(np.float32), (-w["head.bn.running_mean"].astype(np.float64) * a).astype(np.float32)


def probe_probabilities(w: dict[str, np.ndarray], config, tokens: int, eps: float):
    """The pooling for vision.build_program: the probe's softmax probabilities (1, classes) from the final
    (1, N, D) tokens (attentive with blocks: from their mean, build_program's probe_layers)."""
    if config.probe == "attentive":
        return coreml_aimv1.head_probabilities(w, config.num_heads, eps)
    gain, shift = _standardise(w, eps)

    def pool(mb, x, fused: bool):
        # the mean as a sum of x / N: no partial sum can pass float16's range where every token is in it
        x = mb.reduce_sum(x=mb.mul(x=x, y=np.float32(1.0 / tokens)), axes=[1], keep_dims=False)  # (1, D)
        x = mb.add(x=mb.mul(x=x, y=gain[None]), y=shift[None])
        logits = mb.linear(x=x, weight=w["head.linear.weight"], bias=w["head.linear.bias"])  # (1, classes)
        return mb.softmax(x=logits, axis=-1)

    return pool
