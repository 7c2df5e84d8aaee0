"""Model configuration: the fields aim-mlx needs, read from any published config.json.

Apple's config.json (at the pinned revisions) and transformers' Aimv2VisionConfig use the same key names for
the fields below; other keys (dropouts, `auto_map`, `use_bias`, ...) are ignored. A LiT config nests the
vision tower under `vision_config`.
"""

from dataclasses import asdict, dataclass, fields

from .errors import ConfigError

NORM_TYPES = ("rmsnorm", "layernorm")
MLP_TYPES = ("swiglu", "gelu")


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    num_attention_heads: int = 8
    intermediate_size: int = 2816
    num_hidden_layers: int = 24
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    rms_norm_eps: float = 1e-5
    is_native: bool = False  # 2-D sin-cos positions computed per grid instead of a learned table
    qkv_bias: bool = False
    mlp_bias: bool = False
    # What sets AIMv1's blocks apart from AIMv2's: LayerNorm (with bias) and a GELU MLP instead of RMSNorm and
    # SwiGLU. The layers in models/aimv2.py take these as parameters.
    norm_type: str = "rmsnorm"  # or "layernorm"
    mlp_type: str = "swiglu"  # or "gelu"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, config: dict) -> "VisionConfig":
        config = config.get("vision_config", config)
        known = {f.name for f in fields(cls)}
        try:
            self = cls(**{k: v for k, v in config.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"config.json does not describe an AIMv2 vision encoder: {exc}") from exc
        # Apple's configs call the MLP bias `use_bias`; every published checkpoint has none.
        self.mlp_bias = bool(config.get("mlp_bias", config.get("use_bias", False)))
        self.validate()
        return self

    def validate(self) -> None:
        if self.norm_type not in NORM_TYPES or self.mlp_type not in MLP_TYPES:
            raise ConfigError(
                f"config.json: norm_type {self.norm_type!r} / mlp_type {self.mlp_type!r} are not among "
                f"{', '.join(NORM_TYPES)} / {', '.join(MLP_TYPES)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config.json: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.is_native and self.hidden_size % 4:
            raise ConfigError(
                f"config.json: native sin-cos positions need hidden_size % 4 == 0, got {self.hidden_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

