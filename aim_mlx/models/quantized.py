"""Quantized Linear layers: built from a converted folder's `quantization` block before the strict load.

The block is recorded as mlx-lm records it: defaults `{"group_size", "bits", "mode"}` plus, for recipes that
mix bit widths, one entry per layer path (`"blocks.0.mlp.fc2": {"group_size": 64, "bits": 8}`). A layer with
no entry is quantized with the defaults when the checkpoint holds its `.scales`.

On Apple GPUs the layers use MLX's quantized matmul. On the CPU that kernel is slow (a 4-bit 256x1024 by
1024x4096 product takes ~1.4 s, against 0.03 s for float32 through BLAS), and a ViT multiplies hundreds of
tokens by every weight, so there each weight is dequantized just before its matmul and the float GEMM does
the work: only the packed weights stay resident, and unpacking costs ~10 % of the GEMM at batch 8.
"""

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from ..errors import ConfigError

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # mlx-lm's
BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode packs; `convert` offers 4 and 8 by default
MODE = "affine"

# (path, module) -> False (leave float), True (the defaults) or a dict of to_quantized parameters.
Predicate = Callable[[str, nn.Module], bool | dict]


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose CPU path unpacks the weight and multiplies in float (see the module doc)."""

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.gpu:
            return super().__call__(x)
        weight = self.float_weight()
        if "bias" in self:
            return mx.addmm(self["bias"], x, weight.T)
        return x @ weight.T

    def float_weight(self) -> mx.array:
        """The unpacked (out, in) weight, in the scales' dtype (lazy: computed when evaluated)."""
        return mx.dequantize(
            self["weight"],
            scales=self["scales"],
            biases=self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )


def params(value, where: str) -> dict:
    """Validated to_quantized parameters from a quantization entry (the defaults or one layer's)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected an object with group_size and bits, got {value!r}")
    group_size, bits, mode = value.get("group_size"), value.get("bits"), value.get("mode", MODE)
    if group_size not in GROUP_SIZES:
        raise ConfigError(
            f"{where}: group size {group_size!r} is not supported; "
            f"use one of {', '.join(map(str, GROUP_SIZES))}"
        )
    if bits not in BITS:
        raise ConfigError(f"{where}: {bits!r} bits is not supported; use one of {', '.join(map(str, BITS))}")
    if mode != MODE:
        raise ConfigError(f"{where}: quantization mode {mode!r} is not supported; aim-mlx writes {MODE!r}")
    return {"group_size": group_size, "bits": bits, "mode": mode}


def quantize(model: nn.Module, defaults: dict, predicate: Predicate | None = None) -> dict[str, dict]:
    """Replace each nn.Linear that `predicate` selects (default: all) by a QuantizedLinear, in place.

    Returns {path: parameters} of the layers replaced. The replacement is lazy: nothing is computed until
    the parameters are evaluated (or overwritten by a weight load). Raises ConfigError when a group size does
    not divide a layer's input width.
    """
    chosen = {}

    def swap(path: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, nn.Linear):
            return module
        choice = predicate(path, module) if predicate is not None else True
        if choice is False:
            return module
        layer = defaults if choice is True else params(choice, f"quantization of {path}")
        width = module.weight.shape[-1]
        if width % layer["group_size"]:
            options = [g for g in GROUP_SIZES if width % g == 0]
            raise ConfigError(
                f"group size {layer['group_size']} does not divide the {width} inputs of {path}; "
                f"use {' or '.join(map(str, options)) or 'no quantization for it'}"
            )
        chosen[path] = layer
        return QuantizedLinear.from_linear(module, **layer)

    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    return chosen


def from_config(model: nn.Module, quantization: dict, weights: dict[str, mx.array]) -> None:
    """Rebuild the quantized layers a config.json `quantization` block describes, before a strict load."""
    if not isinstance(quantization, dict):
        raise ConfigError(f"config.json: `quantization` must be an object, got {quantization!r}")
    defaults = params(quantization, "config.json quantization")

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in quantization:  # a per-layer entry: its own parameters, or False for a float layer
            return quantization[path]
        return f"{path}.scales" in weights

    quantize(model, defaults, predicate)
