"""The published checkpoint layouts, and the one place that knows their key names.

Three layouts hold the same AIMv2 tensors:
  apple   Apple's torch checkpoints (`model.safetensors` at the pinned revisions): conv weight OIHW
  mlx     Apple's MLX checkpoints (`mlx_model.safetensors`): the same names, conv weight OHWI
  hf      transformers-native checkpoints (hub `main` branches): split q/k/v, other names
aim-mlx's own layout is Apple's names without the `preprocessor.`/`trunk.` prefixes, conv OHWI. AIMv1
(ml-aim's state dict) uses Apple's names too, plus `head.*` for the probe. Every `sanitize` maps a layout
onto the model's names and is safe to run twice; `to_transformers` goes back (for `bench --compare-torch`).
"""

import re

import mlx.core as mx

from ..errors import WeightsError

# Apple's prefixes -> aim-mlx's (one way: aim-mlx never writes Apple's layout).
_APPLE_RULES = [
    (r"^preprocessor\.patchifier\.", "patch_embed."),
    (r"^preprocessor\.pos_embed$", "pos_embed"),
    (r"^trunk\.", ""),
]
# transformers' Aimv2VisionModel names beside aim-mlx's, one row each, read in both directions. {i} is
# a block index; a name ending in "." is a prefix. q, k, v (split there, one qkv here) are handled apart.
HF_NAMES = [
    ("embeddings.patch_embed.", "patch_embed.proj."),
    ("embeddings.rms_norm.", "patch_embed.norm."),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("encoder.layers.{i}.attention.out_proj.", "blocks.{i}.attn.proj."),
    ("encoder.layers.{i}.ffn.gate_proj.", "blocks.{i}.mlp.fc1."),
    ("encoder.layers.{i}.ffn.down_proj.", "blocks.{i}.mlp.fc2."),
    ("encoder.layers.{i}.ffn.up_proj.", "blocks.{i}.mlp.fc3."),
    ("encoder.layers.{i}.rms_norm1.", "blocks.{i}.norm_1."),
    ("encoder.layers.{i}.rms_norm2.", "blocks.{i}.norm_2."),
    ("rms_norm.", "post_trunk_norm."),
]
_HF_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def _rules(pairs) -> list[tuple[str, str]]:
    """(from, to) name templates as (pattern, replacement) rules for `_rename`."""
    rules = []
    for source, target in pairs:
        pattern = "^" + re.escape(source).replace(r"\{i\}", r"(\d+)") + ("" if source.endswith(".") else "$")
        rules.append((pattern, target.replace("{i}", r"\1")))
    return rules


_FROM_HF = _rules(HF_NAMES)
_TO_HF = _rules((ours, theirs) for theirs, ours in HF_NAMES)
# Where each layout keeps a learned position table (the native checkpoint has none).
_POSITION_TABLES = ("preprocessor.pos_embed", "embeddings.position_embedding.weight", "pos_embed")


def detect_layout(keys) -> str:
    """'apple' (torch or MLX flavour), 'hf', or 'aim-mlx' (already ours), from the key names alone."""
    keys = set(keys)
    if any(k.startswith(("trunk.", "preprocessor.")) for k in keys):
        return "apple"
    if any(k.startswith(("encoder.layers.", "embeddings.", "vision_model.")) for k in keys):
        return "hf"
    if any(k.startswith(("blocks.", "patch_embed.")) for k in keys):
        return "aim-mlx"
    raise WeightsError(
        f"unrecognised checkpoint layout (first keys: {sorted(keys)[:3]}); expected AIMv2 weights"
    )


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def sanitize(weights: dict[str, mx.array], num_channels: int = 3) -> dict[str, mx.array]:
    """Map any published layout onto aim-mlx's names and shapes. Safe to run twice."""
    layout = detect_layout(weights)
    out, qkv = {}, {}
    for key, value in weights.items():
        if layout == "hf":
            key = key.removeprefix("vision_model.")
            if m := _HF_QKV.match(key):
                qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
                continue
            key = _rename(key, _FROM_HF)
        elif layout == "apple":
            key = _rename(key, _APPLE_RULES)
        out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsError(
                f"layer {layer}: attention {kind} has only {sorted(parts)} of q, k, v projections"
            )
        # Apple fuses q, k, v along the output dimension in this order.
        out[f"blocks.{layer}.attn.qkv.{kind}"] = mx.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    conv = out.get("patch_embed.proj.weight")
    if (
        conv is not None
        and conv.ndim == 4
        and conv.shape[1] == num_channels
        and conv.shape[3] != num_channels
    ):
        out["patch_embed.proj.weight"] = conv.transpose(0, 2, 3, 1)  # torch OIHW -> MLX OHWI
    pos = out.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        out["pos_embed"] = pos[0]  # Apple stores (1, N, D)
    return out


def has_position_table(keys) -> bool:
    """Whether a vision checkpoint's tensors (any layout) hold a learned position table: what tells the
    fixed-resolution checkpoints from the native one, whose sin-cos positions are computed."""
    return any(k.removeprefix("vision_model.") in _POSITION_TABLES for k in keys)


def to_transformers(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """aim-mlx's vision layout as transformers' Aimv2VisionModel state dict (for `bench --compare-torch`)."""
    out = {}
    for key, value in weights.items():
        if m := _QKV.match(key):
            for name, part in zip("qkv", mx.split(value, 3, axis=0), strict=True):
                out[f"encoder.layers.{m[1]}.attention.{name}_proj.{m[2]}"] = part
        elif key == "patch_embed.proj.weight":
            out["embeddings.patch_embed.weight"] = value.transpose(0, 3, 1, 2)  # MLX OHWI -> torch OIHW
        else:
            out[_rename(key, _TO_HF)] = value
    return out


# LiT (zero-shot) checkpoints. aim-mlx's LiT layout is Apple's names with the vision and text towers mapped as
# above: image_encoder.{patch_embed,pos_embed,blocks,post_trunk_norm,head}, text_encoder.{text_embedding,
# positional_embedding,blocks,post_trunk_norm}, image_projector, text_projector, log_logit_scale.
_LIT_TOP_RULES = [
    (r"^visual_projection\.", "image_projector."),
    (r"^text_projection\.", "text_projector."),
    (r"^logit_scale$", "log_logit_scale"),
]
_LIT_HEAD_RULES = [  # transformers' attention-pooling head names -> Apple's
    (r"^head\.k_proj\.", "head.k."),
    (r"^head\.v_proj\.", "head.v."),
    (r"^head\.output_proj\.", "head.linear."),
]
_LIT_TEXT_RULES = [  # embeddings -> names the vision rules leave alone; positions -> `pos_embed` for them
    (r"^preprocessor\.text_embedding\.", "text_embedding."),
    (r"^embeddings\.token_embedding\.", "text_embedding."),
    (r"^preprocessor\.positional_embedding$", "pos_embed"),
    (r"^positional_embedding$", "pos_embed"),
]


def is_lit(keys) -> bool:
    """Whether a checkpoint's tensors (any layout, or already renamed) hold a text tower."""
    return any(k.startswith(("text_encoder.", "text_model.")) for k in keys)


def sanitize_lit(weights: dict[str, mx.array], num_channels: int = 3) -> dict[str, mx.array]:
    """Map a LiT checkpoint (Apple's torch or MLX layout, or transformers') onto aim-mlx's. Safe to run twice.

    Each tower is renamed by the vision rules above once its prefix is stripped: the text tower's blocks are
    named exactly like the vision tower's in every layout.
    """
    if not is_lit(weights):
        raise WeightsError("config.json describes a LiT model but the weights have no text tower")
    towers: dict[str, dict[str, mx.array]] = {"image_encoder": {}, "text_encoder": {}}
    out = {}
    for key, value in weights.items():
        prefix, _, rest = key.partition(".")
        tower = {"vision_model": "image_encoder", "text_model": "text_encoder"}.get(prefix, prefix)
        if tower in towers and rest:
            towers[tower][rest] = value
        else:
            out[_rename(key, _LIT_TOP_RULES)] = value
    vision = towers["image_encoder"]
    head = {_rename(k, _LIT_HEAD_RULES): vision.pop(k) for k in [k for k in vision if k.startswith("head.")]}
    text = {_rename(k, _LIT_TEXT_RULES): v for k, v in towers["text_encoder"].items()}
    text = sanitize(text, num_channels)
    if "pos_embed" in text:
        text["positional_embedding"] = text.pop("pos_embed")
    vision = {**sanitize(vision, num_channels), **head}
    for name, tower in (("image_encoder", vision), ("text_encoder", text)):
        out.update({f"{name}.{k}": v for k, v in tower.items()})
    if "log_logit_scale" in out:
        out["log_logit_scale"] = out["log_logit_scale"].reshape(())  # a scalar, however it was stored
    return out


def sanitize_aimv1(weights: dict[str, mx.array], num_channels: int = 3) -> dict[str, mx.array]:
    """Map an AIMv1 state dict (ml-aim's names, as its hub mixin or `torch_weights_to_mlx` saved it; conv OIHW
    or OHWI) onto aim-mlx's. The head's `head.*` names are already the model's. Safe to run twice."""
    # BatchNorm's step counter is training state, with no place in the model (ml-aim's MLX port drops it too).
    weights = {k: v for k, v in weights.items() if k != "head.bn.num_batches_tracked"}
    head = {k: weights.pop(k) for k in [k for k in weights if k.startswith("head.")]}
    if not weights:
        raise WeightsError("the checkpoint holds only an attention-probe head; its backbone is missing")
    return {**sanitize(weights, num_channels), **head}
