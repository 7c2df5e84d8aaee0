"""What runs a model's blocks: MLX's own, or the numpy backend where it is faster. load() asks here which
backend to build a model with, and the answer is given to the model's block stacks when they are built.

- `mlx`: no backend; the MLX blocks of aim_mlx/models run. That is what GPUs (Apple's; NVIDIA's with MLX's
  CUDA build), half precision and any block the numpy backend does not know run.
- `numpy` (numpy_blocks.py): AIMv2's, its LiT text tower's and AIMv1's blocks in numpy with direct BLAS
  calls, for float32 on a CPU with the fast BLAS of blas.py (Linux): 2-3x faster there than MLX's CPU
  backend (benchmarks/RESULTS.md).

A backend gives the MLX blocks' results up to float rounding (the tests run both against transformers at
every hidden state), so the choice changes speed, never results. AIM_MLX_BACKEND=mlx|numpy chooses; by
default numpy wherever it runs. Importing this module is cheap (no MLX): `import aim_mlx` reads it first.
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


def choose(dtype: str):
    """The backend to build a model computing in `dtype` with on MLX's default device: numpy_blocks'
    NumpyBlocks, or None for MLX's own blocks. AIM_MLX_BACKEND=numpy where numpy cannot run is an error."""
    choice = check_choice()
    if choice == "mlx":
        return None
    from . import numpy_blocks

    reason = numpy_blocks.unusable(dtype)
    if reason is None:
        return numpy_blocks.NumpyBlocks
    if choice == "numpy":
        raise ConfigError(
            f"AIM_MLX_BACKEND=numpy cannot run this model: {reason}; unset it, or set AIM_MLX_BACKEND=mlx"
        )
    return None


def name(model) -> str:
    """What runs `model`'s blocks now: 'numpy', 'mlx', or 'numpy+mlx' where its stacks differ."""
    from ..models.aimv2 import BlockStack
    from . import numpy_blocks

    stacks = [m for m in model.modules() if isinstance(m, BlockStack)]
    numpy = [s.backend is not None and numpy_blocks.unsupported(s.blocks) is None for s in stacks]
    return "numpy" if numpy and all(numpy) else "mlx" if not any(numpy) else "numpy+mlx"
