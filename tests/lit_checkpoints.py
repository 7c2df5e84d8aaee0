"""Random-weight LiT checkpoints in the published layouts, and a real CLIP BPE vocabulary, for tests.

The reference is transformers' Aimv2Model; its state dict is the transformers-native layout. Apple's layout is
derived from it here with the renaming of transformers' own conversion script (convert_aimv2_original_pytorch
_to_hf.py, read in reverse), written independently of aim_mlx/weights.py. The vocabulary is OpenAI's
bpe_simple_vocab_16e6.txt.gz as the `openai-clip` package ships it, converted to vocab.json + merges.txt the
way the hub's CLIP repos hold it.
"""

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from checkpoints import apple_config, write_layout
from transformers import Aimv2Config, Aimv2Model

TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=176,
    num_hidden_layers=2,
    max_position_embeddings=77,
)
TINY_VISION = dict(hidden_size=128, num_attention_heads=8, intermediate_size=352, num_hidden_layers=2)


def make_lit_reference(
    seed: int = 0, image_size: int = 56, projection_dim: int = 48, text: dict | None = None
) -> Aimv2Model:
    """A random-weight transformers Aimv2Model; `text` overrides entries of TINY_TEXT."""
    torch.manual_seed(seed)
    config = Aimv2Config(
        vision_config=dict(image_size=image_size, patch_size=14, use_head=True, **TINY_VISION),
        text_config={**TINY_TEXT, **(text or {})},
        projection_dim=projection_dim,
    )
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    model = Aimv2Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias") or "cls_token" in name:
                p.copy_(0.02 * torch.randn_like(p))
        model.logit_scale.fill_(2.9)
    return model


# transformers name -> Apple name, after the q/k/v projections are fused (the conversion script's table).
_TO_APPLE = [
    ("vision_model.embeddings.patch_embed.", "image_encoder.preprocessor.patchifier.proj."),
    ("vision_model.embeddings.rms_norm.", "image_encoder.preprocessor.patchifier.norm."),
    ("vision_model.embeddings.position_embedding.weight", "image_encoder.preprocessor.pos_embed"),
    ("vision_model.encoder.layers.", "image_encoder.trunk.blocks."),
    ("vision_model.rms_norm.", "image_encoder.trunk.post_trunk_norm."),
    ("vision_model.head.k_proj.", "image_encoder.head.k."),
    ("vision_model.head.v_proj.", "image_encoder.head.v."),
    ("vision_model.head.output_proj.", "image_encoder.head.linear."),
    ("vision_model.head.cls_token", "image_encoder.head.cls_token"),
    ("text_model.embeddings.token_embedding.", "text_encoder.preprocessor.text_embedding."),
    ("text_model.embeddings.position_embedding.weight", "text_encoder.preprocessor.positional_embedding"),
    ("text_model.encoder.layers.", "text_encoder.trunk.blocks."),
    ("text_model.rms_norm.", "text_encoder.trunk.post_trunk_norm."),
    ("visual_projection.", "image_projector."),
    ("text_projection.", "text_projector."),
    ("logit_scale", "log_logit_scale"),
]
_BLOCK_PARTS = [
    ("attention.out_proj.", "attn.proj."),
    ("ffn.gate_proj.", "mlp.fc1."),
    ("ffn.down_proj.", "mlp.fc2."),
    ("ffn.up_proj.", "mlp.fc3."),
    ("rms_norm1.", "norm_1."),
    ("rms_norm2.", "norm_2."),
]


def _apple_lit_state(hf: dict[str, np.ndarray], conv_layout: str) -> dict[str, np.ndarray]:
    hf = dict(hf)
    for key in [k for k in hf if ".attention.q_proj." in k]:
        fused = [hf.pop(key.replace(".q_proj.", f".{x}_proj.")) for x in "qkv"]
        hf[key.replace(".attention.q_proj.", ".attention.qkv_proj.")] = np.concatenate(fused, axis=0)
    out = {}
    for key, value in hf.items():
        for src, dst in _TO_APPLE:
            if key.startswith(src):
                key = dst + key[len(src) :]
                break
        key = key.replace("attention.qkv_proj.", "attn.qkv.")
        for src, dst in _BLOCK_PARTS:
            key = key.replace(src, dst)
        out[key] = value
    pos = "image_encoder.preprocessor.pos_embed"
    out[pos] = out[pos][None]  # Apple stores (1, N, D)
    if conv_layout == "OHWI":
        conv = "image_encoder.preprocessor.patchifier.proj.weight"
        out[conv] = out[conv].transpose(0, 2, 3, 1)
    return out


def apple_lit_config(model: Aimv2Model) -> dict:
    """config.json as Apple's remote-code LiT repo publishes it (nested configs, max_context_length)."""
    text = model.config.text_config
    return {
        "architectures": ["AIMv2Model"],
        "model_type": "aimv2",
        "projection_dim": model.config.projection_dim,
        "init_temperature": 0.07,
        "max_logit_scale": 100.0,
        "vision_config": apple_config(model.config.vision_config),
        "text_config": {
            "model_type": "aimv2",
            "vocab_size": text.vocab_size,
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "rms_norm_eps": text.rms_norm_eps,
            "qkv_bias": False,
            "use_bias": False,
            "eos_token_id": 49407,
            "max_context_length": text.max_position_embeddings,
        },
    }


def write_lit_checkpoint(model: Aimv2Model, folder: Path, layout: str = "hf", tokenizer: bool = True) -> Path:
    """Write `model` as a LiT checkpoint folder: layout 'hf', 'apple' (torch) or 'mlx' (Apple MLX)."""
    hf = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    folder = write_layout(folder, layout, hf, config, _apple_lit_state, apple_lit_config(model))
    if tokenizer:
        write_clip_vocab(folder)
    return folder


@lru_cache(maxsize=1)
def _clip_vocab() -> tuple[str, str]:
    """(vocab.json, merges.txt) texts from OpenAI's BPE file, without importing the torch-bound package."""
    spec = importlib.util.find_spec("clip")  # locates the package without running its __init__ (torch)
    gz = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(gz) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # CLIP uses the first 48894 merges
    byte_chars = _bytes_to_unicode()
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    return json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), merges_txt


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_vocab(folder: Path) -> Path:
    vocab, merges = _clip_vocab()
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    return folder
