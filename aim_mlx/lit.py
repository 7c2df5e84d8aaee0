"""Loading the LiT (zero-shot) checkpoint: nested config, both towers' weights, image processor, tokenizer.

`aim_mlx.load()` comes here when a checkpoint's config.json has a `text_config`.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np

from . import weights
from .embed import EmbedResult
from .errors import ConfigError
from .loading import fill
from .models.lit import AIMv2LiT, LiTConfig
from .preprocess import ImageProcessor
from .tokenizer import ClipTokenizer
from .variants import VARIANTS


def zero_shot_models() -> list[str]:
    """The hub ids of the checkpoints that can classify zero-shot (the ones with a text tower)."""
    return [v.repo_id for v in VARIANTS.values() if v.lit]


class LiTProcessor:
    """`processor(images)` -> NHWC pixels, as for vision models; `processor.tokenize(texts)` -> token ids."""

    def __init__(self, image: ImageProcessor, tokenizer: ClipTokenizer):
        self.image = image
        self.tokenizer = tokenizer

    def __call__(self, images) -> mx.array:
        return self.image(images)

    def preprocess_one(self, image):
        return self.image.preprocess_one(image)

    def tokenize(self, texts: list[str]):
        return self.tokenizer(texts)

    def to_dict(self) -> dict:
        return self.image.to_dict()


def load_lit(folder: Path, raw: dict, dtype, variant=None) -> tuple[AIMv2LiT, LiTProcessor]:
    """The LiT model from a resolved checkpoint folder and its parsed config.json; strict weight load."""
    config = LiTConfig.from_dict(raw)
    state = weights.load_lit_folder(folder, config.vision.num_channels)
    model = fill(AIMv2LiT(config), raw, state, folder, dtype)
    tokenizer = ClipTokenizer.from_folder(folder, context_length=config.text.max_position_embeddings)
    model.tokenizer = tokenizer
    model.folder = folder  # what the text-embedding cache keys on for local folders
    image = ImageProcessor.from_pretrained(folder, variant=variant, image_size=config.vision.image_size)
    return model, LiTProcessor(image, tokenizer)


def require_lit(model, model_id: str, task: str) -> None:
    """A one-line error for a vision-only model given to a task that needs the text tower."""
    if not hasattr(model, "encode_text"):
        raise ConfigError(
            f"{model_id} is a vision-only checkpoint and cannot {task}; use a zero-shot (LiT) checkpoint: "
            + ", ".join(zero_shot_models())
        )


def embed_texts(model, texts: list[str], batch_size: int = 64) -> EmbedResult:
    """Texts -> (P,) L2-normalised LiT embeddings, in `EmbedResult` form (the texts stand where paths do)."""
    if any(not t.strip() for t in texts):
        raise ConfigError("an empty --text was given; pass the text to embed")
    result = EmbedResult()
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        emb = model.encode_text(chunk)  # (b, P)
        result.paths.extend(chunk)
        result.embeddings.extend(np.asarray(emb.astype(mx.float32)))
    return result
