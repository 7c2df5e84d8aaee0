"""`load()`: a hub id or a local folder in, `(model, processor)` out."""

import json
import logging
from pathlib import Path

import mlx.core as mx

from . import _blas, hub, quantized, weights
from .config import VisionConfig
from .errors import ConfigError
from .models.aimv2 import AIMv2VisionEncoder
from .preprocess import ImageProcessor
from .variants import find_variant

logger = logging.getLogger("aim_mlx")

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype() -> str:
    """float16 on Apple GPUs, float32 on CPUs (MLX's CPU float16 matmul has no BLAS path)."""
    return "float16" if mx.default_device() == mx.gpu else "float32"


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{folder} has no config.json; pass a folder holding an AIMv2 checkpoint") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from exc


def fill(model, raw: dict, state: dict[str, mx.array], folder: Path, dtype: mx.Dtype):
    """Put a checkpoint's weights into a freshly built `model`: the quantized layers a converted folder's
    config.json records first, then a strict load, the compute dtype, and evaluation (loads are lazy)."""
    if "quantization" in raw:  # a converted folder (aim-mlx convert -q): swap in its quantized layers
        quantized.from_config(model, raw["quantization"], state)
    weights.load_into(model, state, source=str(folder))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def load(path_or_id: str, revision: str | None = None, dtype: str | None = None):
    """Load an AIMv2 vision checkpoint from the hub (pinned revision by default) or a local folder.

    Returns `(model, processor)`: `processor(images)` gives NHWC float32 pixels, `model(pixels)` a
    VisionOutput and `model.encode_image(pixels)` pooled (B, D) embeddings. `dtype` is float32, float16 or
    bfloat16 (default: float16 on Apple GPUs, float32 on CPUs).
    """
    loaded = _build(path_or_id, revision, dtype)
    _blas.release_freed_memory()  # the checkpoint's load-time copies (e.g. before an upcast) are garbage now
    return loaded


def _build(path_or_id: str, revision: str | None, dtype: str | None):
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    folder = hub.resolve(path_or_id, revision)
    variant = None if Path(path_or_id).expanduser().is_dir() else find_variant(path_or_id)
    raw = read_config(folder)
    if isinstance(raw.get("text_config"), dict):  # LiT: a text tower too; (AIMv2LiT, LiTProcessor)
        from .lit import load_lit

        model, processor = load_lit(folder, raw, DTYPES[dtype], variant)
        logger.info("loaded %s (%s, %s)", path_or_id, folder, dtype)
        return model, processor
    config = VisionConfig.from_dict(raw)
    state = weights.load_folder(folder, config.num_channels)
    vision = raw.get("vision_config", raw)
    if variant is not None:
        config.is_native = variant.image_size is None
    elif "is_native" not in vision:
        # Apple's configs carry no flag: the native checkpoint is the one without a learned position table.
        config.is_native = "pos_embed" not in state
    model = fill(AIMv2VisionEncoder(config), raw, state, folder, DTYPES[dtype])
    processor = ImageProcessor.from_pretrained(
        folder, native=config.is_native, variant=variant, image_size=config.image_size
    )
    logger.info("loaded %s (%s, %s)", path_or_id, folder, dtype)
    return model, processor
