"""The LiT (zero-shot) checkpoint's processor, and text embeddings in EmbedResult form.

The model is models/lit.py; aim_mlx/registry.py builds it and this processor.
"""

import mlx.core as mx
import numpy as np

from .embed import EmbedResult
from .errors import ConfigError
from .preprocess import ImageProcessor
from .tokenizer import ClipTokenizer


class LiTProcessor:
    """`processor(images)` -> NHWC pixels, as for vision models; `processor.tokenize(texts)` -> token ids."""

    def __init__(self, image: ImageProcessor, tokenizer: ClipTokenizer):
        self.image = image
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return f"LiTProcessor(image={self.image!r}, tokenizer={self.tokenizer!r})"

    def __call__(self, images) -> mx.array:
        return self.image(images)

    def preprocess_one(self, image):
        return self.image.preprocess_one(image)

    def tokenize(self, texts: list[str]):
        return self.tokenizer(texts)

    def to_dict(self) -> dict:
        return self.image.to_dict()


def embed_texts(model, texts: list[str], batch_size: int = 64) -> EmbedResult:
    """Texts -> (P,) L2-normalised LiT embeddings, in `EmbedResult` form (the texts stand where paths do)."""
    if any(not t.strip() for t in texts):
        raise ConfigError("an empty --text was given; pass the text to embed")
    result = EmbedResult(kind="text")
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        emb = model.encode_text(chunk)  # (b, P)
        result.paths.extend(chunk)
        result.embeddings.extend(np.asarray(emb.astype(mx.float32)))
    return result
