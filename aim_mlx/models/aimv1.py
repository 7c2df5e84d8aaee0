"""AIMv1 in MLX: the AIMv2 trunk with LayerNorm and a GELU MLP, 2-D sin-cos positions, and ml-aim's ImageNet
attention probe.

The trunk is `AIMv2VisionEncoder` built from an `AIMv1Config` (its norm and MLP are config parameters). The
classifier reads the outputs of the probed blocks, not the final norm: their mean goes through a BatchNorm
with running statistics, one learned query attends over it with the model's heads, and a Linear D -> 1000
gives the logits. Only the blocks up to the highest probed one run. Parameter names follow ml-aim's
(layouts.sanitize_aimv1 strips its `preprocessor.`/`trunk.` prefixes).
"""

import mlx.core as mx

from .aimv2 import AIMv2VisionEncoder, AttentionPoolingHead
from .config import AIMv1Config


class AIMv1(AIMv2VisionEncoder):
    """An AIMv1 backbone with its attention-probe head: `classify(pixels)` -> (B, classes) logits,
    `encode_image(pixels)` -> (B, D) features (the head's pooled vector, what ml-aim's head returned beside
    the logits), `forward_intermediates` as AIMv2's. Pixels are NHWC float32."""

    family = "aimv1"  # its row in aim_mlx/registry.py

    def __init__(self, config: AIMv1Config, backend=None, info=None):
        super().__init__(config, backend, info)
        self.head = AttentionPoolingHead(
            config, out_features=config.num_classes, linear_bias=False, batch_norm_eps=1e-6
        )

    def probed(self, pixel_values: mx.array) -> mx.array:
        """The mean of the probed blocks' outputs (B, N, D); blocks after the last probed one do not run."""
        layers = self.config.probe_layers
        _, kept = self.run_blocks(self.embed_patches(pixel_values), layers[-1] + 1, keep=layers)
        # In float32: a float16 sum of the blocks overflows (65504) long before their mean does.
        return (sum(kept[i].astype(mx.float32) for i in layers) / len(layers)).astype(kept[layers[0]].dtype)

    def encode_image(self, pixel_values: mx.array) -> mx.array:
        """Features (B, D): the attention-pooled probed blocks, before the classifier's Linear."""
        return self.head.pool(self.probed(pixel_values))

    def logits(self, features: mx.array) -> mx.array:
        """The class logits (B, classes) of `encode_image`'s features."""
        return self.head.linear(features)

    def classify(self, pixel_values: mx.array) -> mx.array:
        """ImageNet-1k logits (B, 1000) for NHWC pixels."""
        return self.logits(self.encode_image(pixel_values))

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """The logits, as ml-aim's `model(x)`."""
        return self.classify(pixel_values)
