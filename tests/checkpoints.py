"""Random-weight AIMv2 checkpoints written in the exact published layouts, for tests and benchmarks.

The reference model is transformers' Aimv2VisionModel (torch); its state dict is the transformers-native
layout. The Apple layouts are derived from it here by the renaming documented in shared/REFERENCE.md, written
independently of aim_mlx/weights.py.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import Aimv2VisionConfig, Aimv2VisionModel

# Tiny stand-ins for each family: the family's head count and MLP ratio, small width, two blocks.
TINY = {
    "large": dict(hidden_size=128, num_attention_heads=8, intermediate_size=352),
    "huge": dict(hidden_size=192, num_attention_heads=12, intermediate_size=512),
    "1B": dict(hidden_size=256, num_attention_heads=16, intermediate_size=704),
    "3B": dict(hidden_size=384, num_attention_heads=24, intermediate_size=1024),
}
LARGE = dict(hidden_size=1024, num_attention_heads=8, intermediate_size=2816, num_hidden_layers=24)


def make_reference(seed: int = 0, image_size: int = 56, is_native: bool = False, **dims) -> Aimv2VisionModel:
    """A transformers Aimv2VisionModel with seeded random weights (norm weights too, so they matter)."""
    torch.manual_seed(seed)
    config = Aimv2VisionConfig(
        image_size=image_size,
        patch_size=14,
        use_head=False,
        is_native=is_native,
        **{"num_hidden_layers": 2, **dims},
    )
    config._attn_implementation = "eager"
    model = Aimv2VisionModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return model


def _hf_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _apple_state(hf: dict[str, np.ndarray], conv_layout: str) -> dict[str, np.ndarray]:
    out = {}
    n_layers = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layers."))
    conv = hf["embeddings.patch_embed.weight"]  # torch OIHW
    out["preprocessor.patchifier.proj.weight"] = conv if conv_layout == "OIHW" else conv.transpose(0, 2, 3, 1)
    out["preprocessor.patchifier.proj.bias"] = hf["embeddings.patch_embed.bias"]
    out["preprocessor.patchifier.norm.weight"] = hf["embeddings.rms_norm.weight"]
    if "embeddings.position_embedding.weight" in hf:
        out["preprocessor.pos_embed"] = hf["embeddings.position_embedding.weight"][None]  # (1, N, D)
    for i in range(n_layers):
        src, dst = f"encoder.layers.{i}.", f"trunk.blocks.{i}."
        out[dst + "attn.qkv.weight"] = np.concatenate(
            [hf[src + f"attention.{x}_proj.weight"] for x in "qkv"], axis=0
        )
        out[dst + "attn.proj.weight"] = hf[src + "attention.out_proj.weight"]
        out[dst + "norm_1.weight"] = hf[src + "rms_norm1.weight"]
        out[dst + "norm_2.weight"] = hf[src + "rms_norm2.weight"]
        out[dst + "mlp.fc1.weight"] = hf[src + "ffn.gate_proj.weight"]
        out[dst + "mlp.fc2.weight"] = hf[src + "ffn.down_proj.weight"]
        out[dst + "mlp.fc3.weight"] = hf[src + "ffn.up_proj.weight"]
    out["trunk.post_trunk_norm.weight"] = hf["rms_norm.weight"]
    return out


def apple_config(cfg: Aimv2VisionConfig) -> dict:
    """config.json as Apple's remote-code repos publish it (model_type aimv2, `use_bias`, no is_native)."""
    return {
        "architectures": ["AIMv2Model"],
        "auto_map": {
            "AutoConfig": "configuration_aimv2.AIMv2Config",
            "AutoModel": "modeling_aimv2.AIMv2Model",
        },
        "model_type": "aimv2",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_channels": 3,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "attention_dropout": 0.0,
        "projection_dropout": 0.0,
        "qkv_bias": False,
        "use_bias": False,
        "torch_dtype": "float32",
        "transformers_version": "4.46.0",
    }


def _save(state: dict[str, np.ndarray], path: Path, fmt: str) -> None:
    # safetensors.numpy writes an array's raw buffer: make transposed views contiguous first.
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path), metadata={"format": fmt})


def write_layout(folder: Path, layout: str, hf: dict, hf_config: dict, to_apple, apple_cfg: dict) -> Path:
    """A checkpoint folder in `layout`: 'hf' writes the transformers state `hf` as it is; 'apple' (torch) and
    'mlx' (Apple MLX) write `to_apple(hf, conv_layout)`, the conv weight OIHW or OHWI, with Apple's config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "hf":
        _save(hf, folder / "model.safetensors", "pt")
        config = hf_config
    else:
        state = to_apple(hf, "OIHW" if layout == "apple" else "OHWI")
        name = "model.safetensors" if layout == "apple" else "mlx_model.safetensors"
        _save(state, folder / name, "pt" if layout == "apple" else "mlx")
        config = apple_cfg
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_checkpoint(model: Aimv2VisionModel, folder: Path, layout: str = "hf") -> Path:
    """Write `model` as a published checkpoint folder: layout 'hf', 'apple' (torch) or 'mlx' (Apple MLX)."""
    return write_layout(
        folder, layout, _hf_state(model), model.config.to_dict(), _apple_state, apple_config(model.config)
    )


def write_processor(folder: Path, size: int = 56) -> Path:
    """A CLIP-style preprocessor_config.json at `size`, as the hub's AIMv2 repos hold one."""
    from aim_mlx.inputs.preprocess import ImageProcessor

    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(ImageProcessor.clip(size).to_dict()))
    return Path(folder)


def reference_outputs(model: Aimv2VisionModel, pixels_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Patch embedding, every hidden state and the final output of the torch reference."""
    x = torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        patches = model.embeddings.patch_embed(x).flatten(2).transpose(1, 2)
        patch_embed = model.embeddings.rms_norm(patches)
    return {
        "patch_embed": patch_embed.numpy(),
        "hidden_states": [h.numpy() for h in out.hidden_states],
        "last_hidden_state": out.last_hidden_state.numpy(),
    }
