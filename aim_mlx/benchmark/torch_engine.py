"""The reference engine: transformers' Aimv2VisionModel (torch, CPU, float32) on the same checkpoint.

The only module of aim_mlx that imports torch and transformers, and only when a torch configuration runs
(`bench --compare-torch`).
"""

import os

import mlx.core as mx
import numpy as np

from .. import hub, weights
from ..config import VisionConfig
from ..errors import AimMlxError, ConfigError
from ..loading import read_config
from .harness import measure


def run_torch(spec: dict) -> dict:
    """The same configuration in transformers' Aimv2VisionModel (torch, CPU, float32)."""
    try:
        import torch
        from transformers import Aimv2VisionConfig, Aimv2VisionModel
    except ImportError:
        raise AimMlxError("--compare-torch needs torch and transformers: pip install -e '.[test]'") from None

    def load_model():
        folder = hub.resolve(spec["model"], spec.get("revision"))
        raw = read_config(folder)
        if "text_config" in raw or "quantization" in raw:
            raise ConfigError(
                f"--compare-torch runs float vision-only checkpoints; {spec['model']} is "
                + ("a LiT checkpoint" if "text_config" in raw else "a quantized folder")
            )
        config = VisionConfig.from_dict(raw)
        state = weights.load_folder(folder, config.num_channels)
        config.is_native = "pos_embed" not in state
        hf = Aimv2VisionConfig(**{**config.to_dict(), "use_head": False})
        hf._attn_implementation = "sdpa"
        net = Aimv2VisionModel(hf).eval()
        state = weights.to_transformers(state)
        net.load_state_dict({k: torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in state.items()})
        return net, config

    def run(net, x):
        with torch.inference_mode():
            net(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).last_hidden_state.mean(1)

    torch.set_num_threads(os.cpu_count() or 1)
    result = measure({**spec, "dtype": "float32", "bits": None}, load_model, run)
    return {**result, "weights": "float", "peak_mlx_mb": None, "peak_memory_mb": result["peak_rss_mb"]}
