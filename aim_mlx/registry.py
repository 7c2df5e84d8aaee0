"""The model families aim-mlx builds, in one table, and what a loaded model says about itself.

A family is a row of `FAMILIES`: how to read its config, the model class, how to map a checkpoint's tensors
onto the model's names, how to build its processor, and what it can do. `load()` reads a checkpoint's family
from its variant (variants.py) or, for a folder of unknown origin, from its config.json (`family_of`, the
one place that guesses), and builds through the row. A new family is a row here, a model file in models/
(its config in models/config.py), its renaming rules in checkpoints/layouts.py, and its variants in
checkpoints/variants.py.

Every model class has a `family` attribute naming its row, `encode_image(pixels) -> (B, D)`,
`forward_intermediates(pixels, indices, norm, stop_early)`, `dims` and `info` (the `ModelInfo` it was
built with: the identity that caches and indexes key on); a family with `text` has `encode_text(texts) ->
(B, D)` too, one with `classes` has `classify(pixels) -> (B, classes)` logits over that label set and
`logits(features)` for encode_image's features.
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import layouts
from .checkpoints.variants import PROBES, VARIANTS, Variant, aimv1_probe_layers, aimv1_size
from .errors import ConfigError
from .inputs.preprocess import ImageProcessor, LiTProcessor
from .inputs.tokenizer import ClipTokenizer
from .models.aimv1 import AIMv1
from .models.aimv2 import AIMv2VisionEncoder
from .models.config import AIMv1Config, LiTConfig, VisionConfig
from .models.lit import AIMv2LiT
from .models.probe import ProbeClassifier, ProbeConfig

PROBE_TYPE = "aim-mlx-probe"  # the model_type of a head folder `aim-mlx train` writes
OWN_LABELS = "own"  # `classes` of a family whose checkpoints carry their labels (config.json `labels`)


@dataclass(frozen=True)
class Family:
    name: str
    # (config.json, the checkpoint's tensors as stored, the variant or None) -> the model's config
    config: Callable[[dict, dict, Variant | None], object]
    # built from that config: model(config, backend=, info=), with tokenizer= for a family with `text`
    model: type
    # a checkpoint's tensors in any published layout (and its image channels) -> the model's parameter
    # names; safe to run twice
    sanitize: Callable[[dict, int], dict]
    processor: Callable[[Path, object, Variant | None], object]  # (folder, config, variant) -> processor
    text: bool = False  # encode_text: a text tower sharing the image embeddings' space
    # the label set a trained classification head scores (classify(pixels) -> logits; tasks/heads.py reads
    # the labels), or None
    classes: str | None = None
    # (config.json, "best" | "last", variant): raises unless the checkpoint's head probes those blocks; None
    # for families without an attention-probe head (load(probe=...) is then an error)
    check_probe: Callable[[dict, str, Variant | None], None] | None = None
    # a head trained on another model's features (aim-mlx train): load() loads that base model first, by
    # the identity config.json records, and builds model(config, base=, info=)
    on_base: bool = False


def _vision_config(raw: dict, state: dict, variant: Variant | None) -> VisionConfig:
    config = VisionConfig.from_dict(raw)
    if variant is not None:
        config.is_native = variant.image_size is None
    elif "is_native" not in raw:
        # Apple's configs carry no flag: the native checkpoint is the one without a learned position table.
        config.is_native = not layouts.has_position_table(state)
    return config


def _vision_processor(folder: Path, config: VisionConfig, variant: Variant | None) -> ImageProcessor:
    return ImageProcessor.from_pretrained(
        folder, native=config.is_native, variant=variant, image_size=config.image_size
    )


def _lit_processor(folder: Path, config: LiTConfig, variant: Variant | None) -> LiTProcessor:
    image = ImageProcessor.from_pretrained(folder, variant=variant, image_size=config.vision.image_size)
    tokenizer = ClipTokenizer.from_folder(folder, context_length=config.text.max_position_embeddings)
    return LiTProcessor(image, tokenizer)


def _aimv1_probe(raw: dict, probe: str, variant: Variant | None) -> None:
    """A checkpoint holds the head for one probe set (config.json's probe_layers); `probe` must be it."""
    if probe not in PROBES:
        raise ConfigError(f"unknown probe {probe!r}; choose best or last")
    config = AIMv1Config.from_dict(raw)
    size = variant.size if variant is not None else aimv1_size(config.hidden_size, config.num_hidden_layers)
    held, depth = list(config.probe_layers), config.num_hidden_layers
    if size is None and probe == "best":
        raise ConfigError(
            f"the best probe layers are known for the published AIMv1 sizes only (600M, 1B, 3B, 7B); this "
            f"checkpoint's head reads blocks {held}: load it without a probe choice"
        )
    wanted = list(aimv1_probe_layers(size, probe)) if size else list(range(depth - 6, depth))
    if held != wanted:
        raise ConfigError(
            f"this {f'AIM-{size}' if size else 'AIMv1'} checkpoint's head reads blocks {held}, not the "
            f"{probe} layers {wanted}; the hub repos hold only the best-layers heads (apple/AIM's .pth "
            f"files hold both: `aim-mlx convert --probe {probe}` converts them)"
        )


FAMILIES = {
    "aimv2": Family("aimv2", _vision_config, AIMv2VisionEncoder, layouts.sanitize, _vision_processor),
    "aimv1": Family(
        "aimv1",
        lambda raw, state, variant: AIMv1Config.from_dict(raw),
        AIMv1,
        layouts.sanitize_aimv1,
        lambda folder, config, variant: ImageProcessor.aimv1(config.image_size),
        classes="imagenet-1k",
        check_probe=_aimv1_probe,
    ),
    "aimv2-lit": Family(
        "aimv2-lit",
        lambda raw, state, variant: LiTConfig.from_dict(raw),
        AIMv2LiT,
        layouts.sanitize_lit,
        _lit_processor,
        text=True,
    ),
    "aimv2-probe": Family(
        "aimv2-probe",
        lambda raw, state, variant: ProbeConfig.from_dict(raw),
        ProbeClassifier,
        lambda state, channels: state,  # written by aim-mlx in the probe's own names
        lambda folder, config, variant: None,  # the base model's processor
        classes=OWN_LABELS,
        on_base=True,
    ),
}


def family_of(raw: dict, variant: Variant | None = None) -> Family:
    """The family of a checkpoint: its variant's, else what its config.json describes."""
    if variant is not None:
        return FAMILIES[variant.family]
    if raw.get("model_type") == PROBE_TYPE:
        return FAMILIES["aimv2-probe"]
    if isinstance(raw.get("text_config"), dict):  # LiT: a text tower beside the vision one
        return FAMILIES["aimv2-lit"]
    if "embed_dim" in raw and "num_blocks" in raw:  # ml-aim's AIMv1 constructor arguments
        return FAMILIES["aimv1"]
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
