"""Core ML export of the LiT (zero-shot) checkpoint: everything an app needs to classify with no Python.

The output is a folder:
  ImageEncoder.mlpackage   image -> `image_embeds` (1, P), L2-normalised, in the shared space
  TextEncoder.mlpackage    `input_ids` int32 (1, 77) -> `text_embeds` (1, P), L2-normalised
  tokenizer/               the checkpoint's CLIP BPE files (pad with the end-of-text id, context 77)
  lit.json                 logit scale, token ids, context length, image size, mean/std, source, versions
  label_embeddings.json    optional: labels, the prompt template and their (L, P) text embeddings
Logits are `logit_scale * image_embeds · text_embedsᵀ`. The graphs reuse coreml.py's layers; the text tower is
causal through an added mask, and it is pooled at the first end-of-text token by a one-hot row (first EOS =
EOS and cumulative EOS count == 1) times the tokens, which needs neither argmax nor a dynamic gather.
"""

import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import AimMlxError
from . import coreml

IMAGE_PACKAGE, TEXT_PACKAGE = "ImageEncoder.mlpackage", "TextEncoder.mlpackage"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
MASKED = -1e4  # an added score that softmax turns into 0, and float16 can hold


def _image_pool(w: dict, heads: int):
    """The attention-pooling head (learned query, k/v projections, linear with bias), the image projection
    and L2 normalisation: (1, N, D) tokens -> (1, P)."""

    def pool(mb, x):
        _, n, d = x.shape
        hd = d // heads

        def split_heads(t):  # (1, N, D) -> (1, H, N, hd)
            return mb.transpose(x=mb.reshape(x=t, shape=[1, n, heads, hd]), perm=[0, 2, 1, 3])

        k = split_heads(mb.linear(x=x, weight=w["head.k.weight"], bias=w.get("head.k.bias")))
        v = split_heads(mb.linear(x=x, weight=w["head.v.weight"], bias=w.get("head.v.bias")))
        q = w["head.cls_token"].reshape(1, heads, 1, hd) * np.float32(hd**-0.5)  # (1, H, 1, hd), a constant
        scores = mb.softmax(x=mb.matmul(x=q, y=k, transpose_y=True), axis=-1)  # (1, H, 1, N)
        out = mb.reshape(x=mb.matmul(x=scores, y=v), shape=[1, d])  # (1, D), head-major as in MLX
        out = mb.linear(x=out, weight=w["head.linear.weight"], bias=w["head.linear.bias"])
        return coreml.l2_normalize(mb, mb.linear(x=out, weight=w["image_projector.weight"]))

    return pool


def build_text_program(w: dict, config, opset):
    """`input_ids` (1, L) int32 -> `text_embeds` (1, P): the causal text tower pooled at the first EOS."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    length, d = config.max_position_embeddings, config.hidden_size
    mask = np.triu(np.full((length, length), MASKED, np.float32), k=1)[None, None]  # (1, 1, L, L)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, length), dtype=types.int32)], opset_version=opset)
    def program(input_ids):
        x = mb.gather(x=w["text_embedding.weight"], indices=input_ids, axis=0)  # (1, L, D)
        x = mb.add(x=x, y=w["positional_embedding"][None, :length])
        x = coreml.transformer(
            mb,
            x,
            w,
            "blocks.",
            config.num_hidden_layers,
            config.num_attention_heads,
            config.rms_norm_eps,
            mask,
        )
        eos = mb.cast(x=mb.equal(x=input_ids, y=np.int32(config.eos_token_id)), dtype="fp32")  # (1, L)
        first = mb.mul(
            x=eos, y=mb.cast(x=mb.equal(x=mb.cumsum(x=eos, axis=1), y=np.float32(1)), dtype="fp32")
        )
        pooled = mb.reshape(x=mb.matmul(x=mb.expand_dims(x=first, axes=[1]), y=x), shape=[1, d])  # (1, D)
        pooled = coreml.rms_norm(mb, pooled, w["post_trunk_norm.weight"], config.rms_norm_eps)
        embeds = coreml.l2_normalize(mb, mb.linear(x=pooled, weight=w["text_projector.weight"]))
        return mb.identity(x=embeds, name="text_embeds")

    return program


def export_lit(net, processor, folder: Path, output: Path, options: dict, meta: dict, labels=None) -> None:
    """Write the LiT folder at `output` (a temporary path that the caller renames into place)."""
    import coremltools as ct

    opset = getattr(ct.target, options["target"])
    vision = net.config.vision
    image_w = coreml.numpy_params(net.image_encoder)
    image_w["image_projector.weight"] = coreml.numpy_params(net.image_projector)["weight"]
    text_w = coreml.numpy_params(net.text_encoder)
    text_w["text_projector.weight"] = coreml.numpy_params(net.text_projector)["weight"]
    output.mkdir(parents=True)
    size = vision.image_size
    program = coreml.build_program(
        image_w,
        vision,
        size,
        processor.image.image_mean,
        processor.image.image_std,
        processor.image.rescale_factor,
        options["input_kind"],
        options["outputs"] == "pooled,tokens",
        opset,
        pool=_image_pool(image_w, vision.num_attention_heads),
    )
    image = coreml.convert_program(program, options, size)
    projection = int(image_w["image_projector.weight"].shape[0])
    meta = {**meta, "embedding_size": str(projection)}
    coreml.describe(image, meta, options["input_kind"], size, projection)
    image.output_description["image_embeds"] = f"(1, {projection}) float32, L2-normalised (shared space)"
    image.save(str(output / IMAGE_PACKAGE))

    text = coreml.convert_program(build_text_program(text_w, net.config.text, opset), options, None)
    text.author, text.license, text.version = image.author, image.license, image.version
    text.short_description = (
        f"AIMv2 LiT text encoder ({meta['source_model']}): token ids to a {projection}-d embedding."
    )
    length = net.config.text.max_position_embeddings
    text.user_defined_metadata.update({**meta, "context_length": str(length)})
    text.input_description["input_ids"] = f"(1, {length}) int32 CLIP BPE ids, padded with the pad id"
    text.output_description["text_embeds"] = f"(1, {projection}) float32, L2-normalised (shared space)"
    text.save(str(output / TEXT_PACKAGE))

    (output / "tokenizer").mkdir()
    copied = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not copied:
        raise AimMlxError(f"{folder} has no tokenizer files to ship with the text package")
    for name in copied:
        shutil.copyfile(folder / name, output / "tokenizer" / name)
    facts = {
        "image_package": IMAGE_PACKAGE,
        "text_package": TEXT_PACKAGE,
        "logit_scale": float(np.array(net.logit_scale)),
        "context_length": net.config.text.max_position_embeddings,
        "bos_token_id": int(net.tokenizer.bos_id),
        "eos_token_id": int(net.tokenizer.eos_id),
        "pad_token_id": int(net.tokenizer.pad_id),
        "tokenizer_files": copied,
        **meta,
        "embedding_size": projection,
    }
    (output / "lit.json").write_text(json.dumps(facts, indent=2))
    if labels is not None:
        from ..zeroshot import DEFAULT_TEMPLATE, check_labels, encode_prompts

        labels = check_labels(labels)
        emb = encode_prompts(net, processor, labels, [DEFAULT_TEMPLATE])  # (L, P), MLX float32
        table = {"labels": labels, "template": DEFAULT_TEMPLATE, "embeddings": emb.round(6).tolist()}
        (output / "label_embeddings.json").write_text(json.dumps(table))


def check_lit(output: Path, net, texts=("a photo of a cat", "a photo of a rocket", "coffee")) -> dict:
    """Both packages against MLX: the image one on photos, the text one on prompts."""
    from . import coreml_check

    image = coreml_check.check_package(output / IMAGE_PACKAGE, net)
    text = coreml_check.check_text_package(output / TEXT_PACKAGE, net, list(texts))
    passed = image["passed"] and text["passed"]
    return {
        "passed": passed,
        "image": image,
        "text": text,
        "summary": f"image: {image['summary']}; text: {text['summary']}",
        "predict": image["predict"],
    }
