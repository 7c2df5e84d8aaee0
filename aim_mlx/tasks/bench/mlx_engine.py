"""The aim-mlx engine: a model loaded as `aim_mlx.load` loads it, quantized in memory when asked."""

import mlx.core as mx
import mlx.nn as nn

from ...loading import load
from ...models import quantized
from .harness import measure


def weight_format(model: nn.Module) -> str:
    """'float', or the bit widths of its quantized layers: 'q4', 'q4+q8'."""
    bits = sorted({m.bits for m in model.modules() if isinstance(m, nn.QuantizedLinear)})
    return "+".join(f"q{b}" for b in bits) or "float"


def run_mlx(spec: dict) -> dict:
    """One aim-mlx configuration in this process; `spec["bits"]` quantizes the loaded model first."""

    def run(model, x):
        mx.eval(model.encode_image(mx.array(x)))

    loaded = {}

    def load_model():
        model, _ = load(spec["model"], revision=spec.get("revision"), dtype=spec.get("dtype"))
        if spec.get("bits"):  # -q: what `convert -q --q-bits BITS` would write, made in memory
            defaults = {
                "group_size": quantized.DEFAULT_GROUP_SIZE,
                "bits": spec["bits"],
                "mode": quantized.MODE,
            }
            quantized.quantize(model, defaults)
            mx.eval(model.parameters())
        loaded["weights"] = weight_format(model)
        mx.reset_peak_memory()  # memory while embedding, as for the process peak: not loading's transient
        return model, getattr(model.config, "vision", model.config)  # a LiT model: its vision tower's

    result = measure(spec, load_model, run)
    mlx_peak = mx.get_peak_memory() / 2**20
    on_gpu = mx.default_device() == mx.gpu
    # On a GPU MLX's allocator sees all the memory that matters (Apple's unified memory; on NVIDIA's, the
    # memory MLX's CUDA allocator holds, not yet checked against nvidia-smi); on the CPU numpy buffers and
    # the process's own footprint count too, so the process peak is the honest figure there.
    return {
        **result,
        "weights": loaded["weights"],
        "peak_mlx_mb": mlx_peak,
        "peak_memory_mb": mlx_peak if on_gpu else result["peak_rss_mb"],
    }
