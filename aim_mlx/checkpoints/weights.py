"""Checkpoint files: safe reading, layout detection, renaming to aim-mlx's layout, strict loading.

This is the only module that knows foreign key names. Three published layouts hold the same tensors:
  apple   Apple's torch checkpoints (`model.safetensors` at the pinned revisions): conv weight OIHW
  mlx     Apple's MLX checkpoints (`mlx_model.safetensors`): the same names, conv weight OHWI
  hf      transformers-native checkpoints (hub `main` branches): split q/k/v, other names
aim-mlx's own layout is Apple's names without the `preprocessor.`/`trunk.` prefixes, conv OHWI.
AIMv1 (ml-aim's state dict, `sanitize_aimv1`) uses Apple's names too, plus `head.*` for the probe.
"""

import json
import re
import struct
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import WeightsError
from .folder import INDEX_FILE, PICKLE_SUFFIXES, SAFETENSORS_FILES

# (pattern, replacement) applied in order; the first match wins. Keys already in our layout match none.
_APPLE_RULES = [
    (r"^preprocessor\.patchifier\.", "patch_embed."),
    (r"^preprocessor\.pos_embed$", "pos_embed"),
    (r"^trunk\.", ""),
]
_HF_RULES = [
    (r"^embeddings\.patch_embed\.", "patch_embed.proj."),
    (r"^embeddings\.rms_norm\.", "patch_embed.norm."),
    (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
    (r"^encoder\.layers\.(\d+)\.attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.ffn\.gate_proj\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.(\d+)\.ffn\.down_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layers\.(\d+)\.ffn\.up_proj\.", r"blocks.\1.mlp.fc3."),
    (r"^encoder\.layers\.(\d+)\.rms_norm1\.", r"blocks.\1.norm_1."),
    (r"^encoder\.layers\.(\d+)\.rms_norm2\.", r"blocks.\1.norm_2."),
    (r"^rms_norm\.", "post_trunk_norm."),
]
_HF_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


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
            key = _rename(key, _HF_RULES)
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


def check_safetensors(path: Path) -> None:
    """Validate the header and that the file holds every byte it promises, before anything is loaded."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if not isinstance(end, int):
            raise ValueError(f"data offset {end!r} is not an integer")
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise WeightsError(f"{path} is not a valid safetensors file ({exc}); download it again") from exc
    if 8 + n + end > size:
        raise WeightsError(
            f"{path} is truncated ({size} bytes, its header needs {8 + n + end}); download it again"
        )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint in `folder`. Pickled checkpoints are refused."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if not all(isinstance(s, str) and s == Path(s).name for s in shards):
                raise TypeError("its weight_map values must be file names in the same folder")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{index} is not a valid safetensors index ({exc})") from exc
        return [folder / s for s in shards]
    for name in SAFETENSORS_FILES:
        if (folder / name).exists():
            return [folder / name]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{folder} has only pickled weights ({', '.join(pickles)}); aim-mlx never unpickles checkpoints. "
            "Use a safetensors checkpoint (the hub repos have model.safetensors)"
        )
    raise WeightsError(f"{folder} has no model.safetensors; pass a folder with an AIMv2 checkpoint")


def load_file(path: Path) -> dict[str, mx.array]:
    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: aim-mlx never unpickles checkpoints; use a .safetensors file")
    check_safetensors(path)
    try:
        return mx.load(str(path))
    except Exception as exc:
        raise WeightsError(f"{path} could not be read ({exc}); download it again") from exc


def read_folder(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a checkpoint folder (one file or the shards of its index), as stored."""
    weights = {}
    for path in weight_files(folder):
        if not path.exists():
            raise WeightsError(f"{path} is listed in {INDEX_FILE} but missing; download the checkpoint again")
        weights.update(load_file(path))
    return weights


def load_folder(folder: Path, num_channels: int = 3) -> dict[str, mx.array]:
    """A vision checkpoint folder's tensors under aim-mlx's names."""
    return sanitize(read_folder(folder), num_channels)


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def load_into(model, weights: dict[str, mx.array], source: str = "checkpoint") -> None:
    """Strict load: every parameter present with its exact shape, nothing extra. Errors list what differs."""
    expected = dict(tree_flatten(model.parameters()))
    missing = expected.keys() - weights.keys()
    unexpected = weights.keys() - expected.keys()
    misshaped = [
        f"{k} {tuple(weights[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected.keys() & weights.keys()
        if weights[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        parts = [
            f"{label}: {_first(names)}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if names
        ]
        raise WeightsError(f"{source} does not match config.json; " + "; ".join(parts))
    model.update(tree_unflatten(list(weights.items())))


# aim-mlx -> transformers names: the inverse of _HF_RULES (qkv is split separately).
_TO_HF_RULES = [
    (r"^patch_embed\.proj\.", "embeddings.patch_embed."),
    (r"^patch_embed\.norm\.", "embeddings.rms_norm."),
    (r"^pos_embed$", "embeddings.position_embedding.weight"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.attention.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layers.\1.ffn.gate_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layers.\1.ffn.down_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc3\.", r"encoder.layers.\1.ffn.up_proj."),
    (r"^blocks\.(\d+)\.norm_1\.", r"encoder.layers.\1.rms_norm1."),
    (r"^blocks\.(\d+)\.norm_2\.", r"encoder.layers.\1.rms_norm2."),
    (r"^post_trunk_norm\.", "rms_norm."),
]
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


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
            out[_rename(key, _TO_HF_RULES)] = value
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


def load_lit_folder(folder: Path, num_channels: int = 3) -> dict[str, mx.array]:
    """`load_folder` for a LiT checkpoint."""
    return sanitize_lit(read_folder(folder), num_channels)


def sanitize_aimv1(weights: dict[str, mx.array], num_channels: int = 3) -> dict[str, mx.array]:
    """Map an AIMv1 state dict (ml-aim's names, as its hub mixin or `torch_weights_to_mlx` saved it; conv OIHW
    or OHWI) onto aim-mlx's. The head's `head.*` names are already the model's. Safe to run twice."""
    # BatchNorm's step counter is training state, with no place in the model (ml-aim's MLX port drops it too).
    weights = {k: v for k, v in weights.items() if k != "head.bn.num_batches_tracked"}
    head = {k: weights.pop(k) for k in [k for k in weights if k.startswith("head.")]}
    if not weights:
        raise WeightsError("the checkpoint holds only an attention-probe head; its backbone is missing")
    return {**sanitize(weights, num_channels), **head}
