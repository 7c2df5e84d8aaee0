"""AIMv2 LiT in MLX: the AIMv2 vision encoder with an attention-pooling head, a causal text encoder pooled at
the first end-of-text token, projections into a shared space and a learned logit scale.

Parameter names follow Apple's checkpoint (layouts.sanitize_lit maps transformers' names onto them). The
layers are the vision encoder's: the text tower is the same pre-norm RMSNorm/SwiGLU block, made causal.
"""

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .aimv2 import AIMv2VisionEncoder, AttentionPoolingHead, Block, BlockStack, VisionOutput
from .config import LiTConfig, TextConfig, VisionConfig


class LiTVisionEncoder(AIMv2VisionEncoder):
    """The AIMv2 encoder whose pooled output is the attention-pooling head's, as in transformers."""

    def __init__(self, config: VisionConfig, backend=None):
        super().__init__(config, backend)
        self.head = AttentionPoolingHead(config)

    def __call__(self, pixel_values: mx.array, output_hidden_states: bool = False) -> VisionOutput:
        out = super().__call__(pixel_values, output_hidden_states)
        out.pooler_output = self.head(out.last_hidden_state)  # (B, D)
        return out


class TextEncoder(BlockStack):
    def __init__(self, config: TextConfig, backend=None):
        super().__init__([Block(config, causal=True) for _ in range(config.num_hidden_layers)], backend)
        self.config = config
        self.text_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positional_embedding = mx.zeros((config.max_position_embeddings, config.hidden_size))  # (77, D)
        self.post_trunk_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, input_ids: mx.array) -> mx.array:
        """(B, L) token ids -> (B, D): the final-norm hidden state at the first end-of-text token."""
        b, n = input_ids.shape
        if n > self.positional_embedding.shape[0]:
            raise ValueError(
                f"{n} tokens; this text encoder takes at most {self.positional_embedding.shape[0]}"
            )
        x, _ = self.run_blocks(self.text_embedding(input_ids) + self.positional_embedding[:n])  # (B, L, D)
        # Causal attention makes the first EOS summarise the text; padding after it never reaches it.
        first_eos = mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=-1)  # (B,)
        return self.post_trunk_norm(x[mx.arange(b), first_eos])  # (B, D); the norm is per token


def l2_normalize(x: mx.array) -> mx.array:
    """x / |x| along the last axis, computed in float32: in float16 the sum of squares of a vector with a norm
    above ~256 overflows, and the normalised vector would be zeros."""
    x32 = x.astype(mx.float32)
    return (x32 / mx.linalg.norm(x32, axis=-1, keepdims=True)).astype(x.dtype)


@dataclass
class LiTOutput:
    logits_per_image: mx.array  # (B_images, B_texts)
    logits_per_text: mx.array  # (B_texts, B_images)
    image_embeds: mx.array  # (B_images, P), L2-normalised
    text_embeds: mx.array  # (B_texts, P), L2-normalised


class AIMv2LiT(nn.Module):
    """AIMv2 LiT: `encode_image(pixels)` and `encode_text(texts or token ids)` -> L2-normalised (B, P) in one
    space; `model(pixels, texts)` -> LiTOutput with logits scaled by the learned logit scale."""

    family = "aimv2-lit"  # its row in aim_mlx/registry.py

    def __init__(self, config: LiTConfig, tokenizer=None, backend=None, info=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer  # a ClipTokenizer: lets encode_text take strings
        self.info = info  # what load() loaded (a registry.ModelInfo): the identity caches and indexes use
        self.image_encoder = LiTVisionEncoder(config.vision, backend)
        self.text_encoder = TextEncoder(config.text, backend)
        self.image_projector = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projector = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.log_logit_scale = mx.array(math.log(1 / 0.07))

    @property
    def dims(self) -> dict:
        return self.config.dims

    def encode_image(self, pixel_values: mx.array) -> mx.array:
        """(B, H, W, 3) pixels -> (B, P) L2-normalised embeddings in the shared space."""
        pooled = self.image_encoder(pixel_values).pooler_output  # (B, D)
        return l2_normalize(self.image_projector(pooled))

    def encode_text(self, texts) -> mx.array:
        """Strings (tokenized with the checkpoint's tokenizer) or (B, L) token ids -> (B, P) L2-normalised."""
        if isinstance(texts, str) or (
            isinstance(texts, list | tuple) and texts and isinstance(texts[0], str)
        ):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass token ids, or load it with aim_mlx.load")
            texts = self.tokenizer([texts] if isinstance(texts, str) else list(texts))
        ids = mx.array(texts, dtype=mx.int32)
        ids = ids[None] if ids.ndim == 1 else ids  # (B, L)
        is_eos = ids == self.config.text.eos_token_id
        if is_eos.any(axis=-1).all().item():
            # Causal attention: tokens after the last first-EOS cannot change any pooled state, so they are
            # not computed. Prompts are ~10-20 of the 77 positions, so this is most of the text tower's time.
            ids = ids[:, : mx.argmax(is_eos, axis=-1).max().item() + 1]
        pooled = self.text_encoder(ids)  # (B, D)
        return l2_normalize(self.text_projector(pooled))

    def forward_intermediates(self, pixel_values: mx.array, **kwargs) -> list[mx.array]:
        """The image tower's block outputs (see AIMv2VisionEncoder.forward_intermediates)."""
        return self.image_encoder.forward_intermediates(pixel_values, **kwargs)

    @property
    def logit_scale(self) -> mx.array:
        return mx.exp(mx.clip(self.log_logit_scale, 0.0, math.log(self.config.max_logit_scale)))

    def __call__(self, pixel_values: mx.array, texts) -> LiTOutput:
        image = self.encode_image(pixel_values)
        text = self.encode_text(texts)
        logits_per_text = self.logit_scale.astype(text.dtype) * text @ image.T  # (B_texts, B_images)
        return LiTOutput(logits_per_text.T, logits_per_text, image, text)
