"""Probes that `aim-mlx train` fits on a frozen AIM encoder (tasks/train.py), and the classifier a probe makes
with its base model.

- linear: the pooled embedding (`encode_image`'s), standardised per channel with statistics measured on the
  training set (fixed, not trained), then Linear D -> classes.
- attentive: AIMv1's head (models/aimv1.py): the tokens, standardised per channel by a RunningNorm whose
  statistics are the training set's, one learned query attending with the model's heads, Linear D -> classes
  (with bias). Its tokens are the final token grid, or the mean of the raw outputs of chosen blocks, as
  AIMv1's heads read them.
"""

from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError
from .aimv2 import AttentionPoolingHead, RunningNorm, block_indices
from .config import VisionConfig

KINDS = ("linear", "attentive")
NORM_EPS = 1e-6


@dataclass
class ProbeConfig:
    probe: str  # "linear" or "attentive"
    hidden_size: int  # the width of the features the probe reads
    labels: list[str]  # the classes, in output order
    num_heads: int = 1  # attentive: the base model's heads
    blocks: list[int] | None = None  # attentive: the mean of these blocks' raw outputs; None: final tokens
    base: dict = field(default_factory=dict)  # the base model: source, revision, key, family, dtype

    @classmethod
    def from_dict(cls, raw: dict) -> "ProbeConfig":
        try:
            config = cls(
                probe=raw["probe"],
                hidden_size=int(raw["hidden_size"]),
                labels=[str(label) for label in raw["labels"]],
                num_heads=int(raw.get("num_heads", 1)),
                blocks=None if raw.get("blocks") is None else [int(i) for i in raw["blocks"]],
                base=dict(raw["base_model"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"config.json does not describe an aim-mlx probe head ({exc!r} missing or bad)"
            ) from None
        if config.probe not in KINDS:
            raise ConfigError(f"config.json: unknown probe {config.probe!r}; expected linear or attentive")
        return config

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["base_model"] = out.pop("base")
        return out


class LinearProbe(nn.Module):
    """(B, D) pooled embeddings -> (B, classes) logits: a fixed per-channel standardisation, then Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = RunningNorm(dim, NORM_EPS)
        self.linear = nn.Linear(dim, num_classes)
        self.bn.freeze()  # measured on the training set, not learned

    def pool(self, x: mx.array) -> mx.array:
        return x  # the features already are one vector per image

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(self.bn(x))


class AttentiveProbe(AttentionPoolingHead):
    """AIMv1's attention-probe head (models/aimv2.py's AttentionPoolingHead, the same parameters) with a
    bias on its Linear, whose pooling is computed in a factored form: with one query, the scores q·(W_k x)
    are (W_kᵀ q)·x and the output Σ a (W_v x) is W_v (Σ a x), per head. That is the same function in
    N·D·H + H·D² multiply-adds per image instead of 2·N·D², which is what makes training on cached
    token grids cheap (N = 256, D = 1024, H = 8: about 50x fewer)."""

    def pool(self, x: mx.array) -> mx.array:
        x = self.bn(x)
        b, n, d = x.shape
        h = self.num_heads
        q = self.cls_token.reshape(h, d // h)  # (H, hd)
        query = mx.einsum("hc,hcd->hd", q, self.k.weight.reshape(h, d // h, d))  # (H, D): W_kᵀ q per head
        # k's bias adds q·b_k to every token's score alike, which the softmax cancels
        attn = mx.softmax((x @ query.T) * (d // h) ** -0.5, axis=1)  # (B, N, H) over the tokens
        # einsum rather than batched matmuls of transposes, whose gradients MLX's CPU computes 100x slower
        mixed = mx.einsum("bnh,bnd->bhd", attn, x)  # (B, H, D): each head's weighted mean of the tokens
        out = mx.einsum("bhd,hcd->bhc", mixed, self.v.weight.reshape(h, d // h, d)).reshape(b, d)
        return out + self.v.bias if "bias" in self.v else out  # (B, D), head-major


def attentive_probe(dim: int, num_heads: int, num_classes: int) -> AttentiveProbe:
    """The attentive probe: (B, N, D) tokens -> (B, classes) logits."""
    head = AttentiveProbe(
        VisionConfig(hidden_size=dim, num_attention_heads=num_heads),
        out_features=num_classes,
        linear_bias=True,
        batch_norm_eps=NORM_EPS,
    )
    head.bn.freeze()
    return head


def make_probe(config: ProbeConfig) -> nn.Module:
    if config.probe == "linear":
        return LinearProbe(config.hidden_size, config.num_classes)
    return attentive_probe(config.hidden_size, config.num_heads, config.num_classes)


def probe_features(base, pixels: mx.array, probe: str, blocks: list[int] | None = None) -> mx.array:
    """What a probe reads from `base` for NHWC `pixels`: linear, the pooled embedding (B, D); attentive, the
    final token grid (B, N, D), or the mean of the raw outputs of `blocks` (later blocks do not run)."""
    if probe == "linear":
        return base.encode_image(pixels)
    if blocks is None:
        return base.forward_intermediates(pixels, indices=[-1], norm=True)[0]
    kept = base.forward_intermediates(pixels, indices=blocks, stop_early=True)
    # In float32: a float16 sum of the blocks overflows (65504) long before their mean does.
    return sum(x.astype(mx.float32) for x in kept) / len(kept)


class ProbeClassifier:
    """A trained probe on its base model: `classify(pixels)` -> (B, classes) logits over `labels`,
    `encode_image(pixels)` -> (B, D) features (linear: the base's embedding; attentive: the pooled vector
    before the Linear), `logits(features)`. The probe runs in float32 whatever the base's dtype."""

    family = "aimv2-probe"  # its row in aim_mlx/registry.py

    def __init__(self, config: ProbeConfig, base=None, info=None):
        self.config = config
        self.labels = list(config.labels)
        self.info = info
        self.base = base  # a loaded model (loading.load); the head's parameters alone are the probe's
        if config.blocks is not None and base is not None:  # sorted, non-negative, within the model
            try:
                config.blocks = block_indices(base.dims["num_hidden_layers"], list(config.blocks))
            except ValueError as exc:
                raise ConfigError(f"--blocks: {exc}") from None
        self.head = make_probe(config)

    @property
    def dims(self) -> dict:
        return {
            **self.base.dims,
            "embed_dim": self.config.hidden_size,
            "num_classes": self.config.num_classes,
        }

    def features(self, pixels: mx.array) -> mx.array:
        """What the probe reads (see probe_features), in float32."""
        return probe_features(self.base, pixels, self.config.probe, self.config.blocks).astype(mx.float32)

    def encode_image(self, pixels: mx.array) -> mx.array:
        return self.head.pool(self.features(pixels))

    def logits(self, features: mx.array) -> mx.array:
        if self.config.probe == "linear":
            return self.head(features.astype(mx.float32))
        return self.head.linear(features.astype(mx.float32))

    def classify(self, pixels: mx.array) -> mx.array:
        return self.logits(self.encode_image(pixels))

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.classify(pixels)

    def forward_intermediates(self, pixels: mx.array, **kwargs) -> list[mx.array]:
        return self.base.forward_intermediates(pixels, **kwargs)
