"""The model families aim-mlx builds, in one table, and what a loaded model says about itself.

A family is a row of `FAMILIES`: how to read its config, the model class, how to map a checkpoint's tensors
onto the model's names, how to build its processor, and what it can do. `load()` reads a checkpoint's family
from its variant (variants.py) or, for a folder of unknown origin, from its config.json (`family_of`, the
one place that guesses), and builds through the row. A new family is a row here, a model file in models/,
its renaming rules in weights.py, and variants in variants.py.

Every model class has a `family` attribute naming its row, `encode_image(pixels) -> (B, D)`,
`forward_intermediates(pixels, indices, norm, stop_early)` and `dims`; a family with `text` has
`encode_text(texts) -> (B, D)` too. `load()` attaches a `ModelInfo` as `model.info`: the identity that
caches and indexes key on.
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import weights
from .config import VisionConfig
from .errors import ConfigError
from .lit import LiTProcessor
from .models.aimv2 import AIMv2VisionEncoder
from .models.lit import AIMv2LiT, LiTConfig
from .preprocess import ImageProcessor
from .tokenizer import ClipTokenizer
from .variants import VARIANTS, Variant


@dataclass(frozen=True)
class Family:
    name: str
    # (config.json, the sanitized weights, the variant or None) -> the model's config
    config: Callable[[dict, dict, Variant | None], object]
    model: type  # built from that config
    # a checkpoint's tensors in any published layout -> the model's parameter names; safe to run twice
    sanitize: Callable[[dict, int], dict]
    processor: Callable[[Path, object, Variant | None], object]  # (folder, config, variant) -> processor
    text: bool = False  # encode_text: a text tower sharing the image embeddings' space


def _vision_config(raw: dict, state: dict, variant: Variant | None) -> VisionConfig:
    config = VisionConfig.from_dict(raw)
    if variant is not None:
        config.is_native = variant.image_size is None
    elif "is_native" not in raw:
        # Apple's configs carry no flag: the native checkpoint is the one without a learned position table.
        config.is_native = "pos_embed" not in state
    return config


def _vision_processor(folder: Path, config: VisionConfig, variant: Variant | None) -> ImageProcessor:
    return ImageProcessor.from_pretrained(
        folder, native=config.is_native, variant=variant, image_size=config.image_size
    )


def _lit_processor(folder: Path, config: LiTConfig, variant: Variant | None) -> LiTProcessor:
    image = ImageProcessor.from_pretrained(folder, variant=variant, image_size=config.vision.image_size)
    tokenizer = ClipTokenizer.from_folder(folder, context_length=config.text.max_position_embeddings)
    return LiTProcessor(image, tokenizer)


FAMILIES = {
    "aimv2": Family("aimv2", _vision_config, AIMv2VisionEncoder, weights.sanitize, _vision_processor),
    "aimv2-lit": Family(
        "aimv2-lit",
        lambda raw, state, variant: LiTConfig.from_dict(raw),
        AIMv2LiT,
        weights.sanitize_lit,
        _lit_processor,
        text=True,
    ),
}


def family_of(raw: dict, variant: Variant | None = None) -> Family:
    """The family of a checkpoint: its variant's, else what its config.json describes."""
    if variant is not None:
        return FAMILIES[variant.family]
    if isinstance(raw.get("text_config"), dict):  # LiT: a text tower beside the vision one
        return FAMILIES["aimv2-lit"]
    return FAMILIES["aimv2"]


def text_models() -> list[str]:
    """The hub ids of the checkpoints with a text tower (zero-shot classification, text embeddings)."""
    return [v.repo_id for v in VARIANTS.values() if FAMILIES[v.family].text]


def require_text(model, task: str) -> None:
    """A one-line error for a vision-only model given to a task that needs the text tower."""
    if not FAMILIES[model.family].text:
        name = model.info.source if model.info is not None else "this model"
        raise ConfigError(
            f"{name} is a vision-only checkpoint and cannot {task}; use a zero-shot (LiT) checkpoint: "
            + ", ".join(text_models())
        )


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is: `key` is the identity caches and indexes use (same key, same embeddings)."""

    family: str
    source: str  # the hub id (as the variant table spells it) or the folder's absolute path
    revision: str | None  # the hub commit; None for a local folder
    dims: dict  # the model's `dims`: widths, depths, image size, embedding size
    dtype: str
    quantization: dict | None = None  # a converted folder's record (config.json `quantization`)
    files: list = field(default_factory=list)  # a local folder's files: (name, size, mtime in ns)
    backend: str = "mlx"  # what runs the blocks (aim_mlx/backends); never changes the results

    @property
    def text(self) -> bool:
        return FAMILIES[self.family].text

    @property
    def key(self) -> str:
        """A hex digest of everything that decides the embeddings: family, source, revision (or, for a
        local folder, its files' names, sizes and times), dims, dtype and quantization."""
        fields = [
            self.family,
            self.source,
            self.revision,
            self.files,
            self.dims,
            self.dtype,
            self.quantization,
        ]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "source": self.source,
            "revision": self.revision,
            "dims": self.dims,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "backend": self.backend,
            "key": self.key,
        }
