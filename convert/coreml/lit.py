"""The LiT (zero-shot) checkpoint's programs: the image tower's pooling head and the causal text tower.

Both end in the shared space, L2-normalised, so that logits are `logit_scale * image_embeds · text_embedsᵀ`.
The image program is coreml_vision.py's with `image_pool` as its pooling; the text tower is causal through
an added mask, and it is pooled at the first end-of-text token by a one-hot row (first EOS = EOS and
cumulative EOS count == 1) times the tokens, which needs neither argmax nor a dynamic gather. Ids with no
end-of-text token pool at position 0, as MLX's argmax does (a zero row would normalise to NaN).
"""

import numpy as np

from .layers import (
    DEFAULT_NORM,
    attention_pool,
    fused_attention,
    l2_normalize,
    numpy_params,
    rms_norm,
    transformer,
)

MASKED = -1e4  # an added score that softmax turns into 0, and float16 can hold


def lit_weights(net) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(image tower, text tower) weights as numpy, each with its projection into the shared space."""
    image_w = numpy_params(net.image_encoder)
    image_w["image_projector.weight"] = numpy_params(net.image_projector)["weight"]  # (P, D)
    text_w = numpy_params(net.text_encoder)
    text_w["text_projector.weight"] = numpy_params(net.text_projector)["weight"]  # (P, D_text)
    return image_w, text_w


def image_pool(w: dict, heads: int):
    """The pooling for coreml_vision.build_program: the attention-pooling head, the image projection and L2
    normalisation, (1, N, D) tokens -> (1, P)."""

    def pool(mb, x, fused: bool):
        pooled = attention_pool(mb, x, w, "head.", heads, fused)  # (1, D)
        return l2_normalize(mb, mb.linear(x=pooled, weight=w["image_projector.weight"]))

    return pool


def label_probabilities(w: dict, heads: int, label_embeds: np.ndarray, logit_scale: float):
    """The pooling for a zero-shot classifier: (1, N, D) tokens -> (1, L) probabilities, the softmax of
    `logit_scale * image_embeds · label_embedsᵀ` (label_embeds (L, P), L2-normalised). The label table enters
    through `matmul`, not `linear`: it is data, not a layer's weight, so --compress leaves it float."""
    embed = image_pool(w, heads)
    table = (np.float32(logit_scale) * label_embeds.astype(np.float32)).T  # (P, L), the scale folded in

    def pool(mb, x, fused: bool):
        return mb.softmax(x=mb.matmul(x=embed(mb, x, fused), y=table), axis=-1)  # (1, L)

    return pool


def build_text_program(w: dict, config, opset, norm: str = DEFAULT_NORM):
    """`input_ids` (1, L) int32 -> `text_embeds` (1, P): the causal text tower pooled at the first EOS.
    `norm` and the fused attention as in coreml_vision.build_program."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    length, d = config.max_position_embeddings, config.hidden_size
    mask = np.triu(np.full((length, length), MASKED, np.float32), k=1)[None, None]  # (1, 1, L, L)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, length), dtype=types.int32)], opset_version=opset)
    def program(input_ids):
        x = mb.gather(x=w["text_embedding.weight"], indices=input_ids, axis=0)  # (1, L, D)
        x = mb.add(x=x, y=w["positional_embedding"][None, :length])
        eps = config.rms_norm_eps
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        x = transformer(mb, x, w, "blocks.", layers, heads, eps, fused_attention(opset), norm, mask)
        eos = mb.cast(x=mb.equal(x=input_ids, y=np.int32(config.eos_token_id)), dtype="fp32")  # (1, L)
        first = mb.mul(
            x=eos, y=mb.cast(x=mb.equal(x=mb.cumsum(x=eos, axis=1), y=np.float32(1)), dtype="fp32")
        )
        none = mb.sub(x=np.float32(1), y=mb.reduce_sum(x=first, axes=[1], keep_dims=True))  # (1, 1): no EOS
        position_0 = np.eye(1, length, dtype=np.float32)  # (1, L)
        first = mb.add(x=first, y=mb.mul(x=none, y=position_0))
        pooled = mb.reshape(x=mb.matmul(x=mb.expand_dims(x=first, axes=[1]), y=x), shape=[1, d])  # (1, D)
        pooled = rms_norm(mb, pooled, w["post_trunk_norm.weight"], eps, norm)
        embeds = l2_normalize(mb, mb.linear(x=pooled, weight=w["text_projector.weight"]))
        return mb.identity(x=embeds, name="text_embeds")

    return program
