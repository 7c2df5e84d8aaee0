"""Model configuration: the fields aim-mlx needs, read from any published config.json.

Apple's config.json (at the pinned revisions) and transformers' Aimv2VisionConfig use the same key names for
the fields below; other keys (dropouts, `auto_map`, `use_bias`, ...) are ignored. A LiT config nests the
vision tower under `vision_config`. AIMv1's config.json is ml-aim's constructor arguments (`embed_dim`,
`num_blocks`, ...): `AIMv1Config.from_dict` reads it.
"""

from dataclasses import asdict, dataclass, field, fields

from ..errors import ConfigError

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

    @property
    def dims(self) -> dict:
        """The widths and depths a model built from this config has (`model.dims`, part of its identity)."""
        return {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "image_size": None if self.is_native else self.image_size,
            "patch_size": self.patch_size,
            "embed_dim": self.hidden_size,  # encode_image's width
        }

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AIMv1Config(VisionConfig):
    """AIMv1: the AIMv2 trunk with LayerNorm and a GELU MLP of 4 D, fixed 2-D sin-cos positions, and an
    attention-probe classifier over the mean of the `probe_layers` blocks' outputs."""

    norm_type: str = "layernorm"
    mlp_type: str = "gelu"
    is_native: bool = True  # positions are the sin-cos table of the input's grid, not a learned table
    probe_layers: tuple[int, ...] = field(default_factory=tuple)  # 0-based blocks the head reads, sorted
    num_classes: int = 1000

    @classmethod
    def from_dict(cls, config: dict) -> "AIMv1Config":
        """ml-aim's config.json (`AIMForImageClassification(config)` as huggingface_hub's mixin saved it):
        img_size, patch_size, embed_dim, num_blocks, num_heads, and probe_layers (a list of blocks, or n for
        the last n; absent: ml-aim's default, the last 6)."""
        try:
            width, depth = int(config["embed_dim"]), int(config["num_blocks"])
            probe = config.get("probe_layers", 6)
            layers = range(depth - probe, depth) if isinstance(probe, int) else probe
            self = cls(
                hidden_size=width,
                num_attention_heads=int(config["num_heads"]),
                intermediate_size=int(config.get("mlp_hidden_dim") or config.get("mlp_ratio", 4) * width),
                num_hidden_layers=depth,
                num_channels=int(config.get("num_channels", 3)),
                patch_size=int(config.get("patch_size", 14)),
                image_size=int(config.get("img_size", 224)),
                probe_layers=tuple(sorted({int(i) for i in layers})),
                num_classes=int(config.get("num_classes", 1000)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"config.json does not describe an AIMv1 model ({exc!r} is missing or wrong)"
            ) from exc
        self.validate()
        return self

    @property
    def dims(self) -> dict:
        return {
            **super().dims,
            "image_size": self.image_size,  # any grid fits sin-cos; the head was trained at this size
            "probe_layers": list(self.probe_layers),
            "num_classes": self.num_classes,
        }

    def validate(self) -> None:
        super().validate()
        if self.hidden_size % 4:
            raise ConfigError(
                f"config.json: sin-cos positions need embed_dim % 4 == 0, got {self.hidden_size}"
            )
        if not self.probe_layers or not all(0 <= i < self.num_hidden_layers for i in self.probe_layers):
            raise ConfigError(
                f"config.json: probe_layers {list(self.probe_layers)} must name blocks among the "
                f"{self.num_hidden_layers} (0-based)"
            )


@dataclass
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    num_attention_heads: int = 6
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77  # Apple's configs call it max_context_length
    eos_token_id: int = 49407
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    mlp_bias: bool = False
    # The shared Block's choices (models/aimv2.py): the text tower is AIMv2's RMSNorm/SwiGLU block.
    norm_type: str = "rmsnorm"
    mlp_type: str = "swiglu"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, config: dict) -> "TextConfig":
        config = dict(config)
        config.setdefault("max_position_embeddings", config.get("max_context_length", 77))
        config.setdefault("mlp_bias", config.get("use_bias", False))
        known = {f.name for f in fields(cls)}
        try:
            self = cls(**{k: v for k, v in config.items() if k in known})
        except TypeError as exc:
            raise ConfigError(
                f"config.json: text_config does not describe an AIMv2 text encoder: {exc}"
            ) from exc
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config.json: text hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        return self


@dataclass
class LiTConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projection_dim: int = 768
    max_logit_scale: float = 100.0

    @classmethod
    def from_dict(cls, config: dict) -> "LiTConfig":
        """A LiT config.json (Apple's or transformers'): `vision_config` and `text_config` nested."""
        if not isinstance(config.get("text_config"), dict):
            raise ConfigError("config.json has no text_config; it is not a LiT (zero-shot) checkpoint")
        return cls(
            vision=VisionConfig.from_dict(config.get("vision_config") or {}),
            text=TextConfig.from_dict(config["text_config"]),
            projection_dim=int(config.get("projection_dim", 768)),
            max_logit_scale=float(config.get("max_logit_scale", 100.0)),
        )

    @property
    def num_channels(self) -> int:
        return self.vision.num_channels

    @property
    def dims(self) -> dict:
        t = self.text
        return {
            **self.vision.dims,
            "text_hidden_size": t.hidden_size,
            "text_num_hidden_layers": t.num_hidden_layers,
            "context_length": t.max_position_embeddings,
            "embed_dim": self.projection_dim,  # encode_image's and encode_text's width
        }
