"""The reference engine: transformers' Aimv2VisionModel (torch, CPU, float32) with the weights aim-mlx loads.

The only module of aim_mlx that imports torch and transformers, and only when a torch configuration runs
(`bench --compare-torch`); without them that is a one-line error naming the `bench` extra.
"""

import os

import numpy as np
from mlx.utils import tree_flatten

from ...checkpoints import layouts
from ...errors import ConfigError
from ...extras import require
from ...loading import load
from .harness import measure


def run_torch(spec: dict) -> dict:
    """The same configuration in transformers' Aimv2VisionModel (torch, CPU, float32)."""
    torch = require("torch", "bench")
    transformers = require("transformers", "bench")

    def load_model():
        # Loaded as aim-mlx loads it (strict, native or not decided there), then handed over to torch.
        model, _ = load(spec["model"], revision=spec.get("revision"), dtype="float32")
        if model.info.text or model.info.quantization:
            raise ConfigError(
                f"--compare-torch runs float vision-only checkpoints; {spec['model']} is "
                + ("a LiT checkpoint" if model.info.text else "a quantized folder")
            )
        hf = transformers.Aimv2VisionConfig(**{**model.config.to_dict(), "use_head": False})
        hf._attn_implementation = "sdpa"
        net = transformers.Aimv2VisionModel(hf).eval()
        state = layouts.to_transformers(dict(tree_flatten(model.parameters())))
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
        return net, model.config

    def run(net, x):
        with torch.inference_mode():
            net(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).last_hidden_state.mean(1)

    torch.set_num_threads(os.cpu_count() or 1)
    result = measure({**spec, "dtype": "float32", "bits": None}, load_model, run)
    return {**result, "weights": "float", "peak_mlx_mb": None, "peak_memory_mb": result["peak_rss_mb"]}
