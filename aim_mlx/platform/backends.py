"""Backends: faster implementations of a model's blocks, which load() installs only where they support them.

- `mlx`: no backend; the MLX blocks of aim_mlx/models run. That is what GPUs (Apple's; NVIDIA's with MLX's
  CUDA build), half precision and any block a backend does not know (MLX's own quantized layers) run.
- `numpy` (numpy_blocks.py): the blocks of AIMv2 (RMSNorm, SwiGLU), its LiT text tower and AIMv1 (LayerNorm
  with bias, exact GELU) in numpy with direct BLAS calls, for float32 on a CPU with the fast BLAS of blas.py
  (Linux): about 2-3x faster there than MLX's CPU backend. Never on a GPU: the device is MLX's default one,
  which aim_mlx/devices.py chooses (AIM_MLX_DEVICE=cpu forces the CPU).

A backend must give the MLX blocks' results up to float rounding (the tests run both against transformers at
every hidden state), so removing one changes speed, never results. AIM_MLX_BACKEND=mlx|numpy chooses; by
default numpy wherever it is supported, MLX elsewhere. Importing this package is cheap: `import aim_mlx`
loads blas.py through it before MLX.
"""

import os

from ..errors import ConfigError

BACKENDS = ("mlx", "numpy")


def check_choice() -> str | None:
    """AIM_MLX_BACKEND, checked: 'mlx', 'numpy', or None (the default: numpy where supported)."""
    value = os.environ.get("AIM_MLX_BACKEND", "").strip().lower()
    if value and value not in BACKENDS:
        raise ConfigError(f"AIM_MLX_BACKEND={value!r} is not a backend; use {' or '.join(BACKENDS)}")
    return value or None


def install(model) -> str:
    """Put the chosen backend on every block stack of `model` it supports (the others run MLX); return the
    name of what runs the blocks. AIM_MLX_BACKEND=numpy where numpy cannot run them is an error."""
    from ..models.aimv2 import BlockStack
    from . import numpy_blocks

    choice = check_choice()
    stacks = [m for m in model.modules() if isinstance(m, BlockStack)]
    installed = []
    for stack in stacks:
        reason = None if choice == "mlx" else numpy_blocks.unsupported(stack.blocks)
        if choice == "numpy" and reason is not None:
            raise ConfigError(
                f"AIM_MLX_BACKEND=numpy cannot run this model: {reason}; unset it, or set AIM_MLX_BACKEND=mlx"
            )
        stack.backend = numpy_blocks.NumpyBlocks(stack.blocks) if choice != "mlx" and reason is None else None
        installed.append(stack.backend is not None)
    return "numpy" if installed and all(installed) else "mlx" if not any(installed) else "numpy+mlx"
