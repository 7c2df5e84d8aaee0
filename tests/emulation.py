"""Which defaults the suite runs under, and the tolerances that follow from a dtype.

`AIM_MLX_EMULATE=apple pytest` runs the suite with what a Mac chooses by default, where MLX's default device
is the GPU: float16 when `load()` is given no dtype (AIM_MLX_DTYPE), MLX's own blocks (AIM_MLX_BACKEND=mlx)
and no Linux BLAS swap (AIM_MLX_BLAS=0). conftest.py calls `apply()` before aim_mlx is imported; processes
that tests start inherit the environment. It runs on a CPU: Metal kernels, Accelerate and the GPU itself
are not exercised.
"""

import os

import pytest

_CHOICE = os.environ.get("AIM_MLX_EMULATE", "").strip().lower()
if _CHOICE not in ("", "apple"):
    raise pytest.UsageError(f"AIM_MLX_EMULATE={_CHOICE!r} is not an emulation; use apple, or leave it unset")
APPLE = _CHOICE == "apple"

# How far a result computed in each dtype may be from its float32 reference, relative to its scale: float16
# keeps 10 mantissa bits and bfloat16 7, and a few blocks of rounding add up to about 1e-2 and 5e-2.
HALF_PRECISION = {"float16": 1e-2, "bfloat16": 5e-2}

not_on_apple = pytest.mark.skipif(
    APPLE,
    reason="AIM_MLX_EMULATE=apple: a Mac has neither the Linux BLAS nor the numpy backend (float32 only)",
)


def apply() -> None:
    """Set the environment a Mac's defaults amount to (nothing without AIM_MLX_EMULATE=apple)."""
    if APPLE:
        os.environ.update(AIM_MLX_DTYPE="float16", AIM_MLX_BACKEND="mlx", AIM_MLX_BLAS="0")


def tolerance(model_or_dtype, float32: float) -> float:
    """The tolerance for comparing a result of a model (or of a dtype's computation) with a float32
    reference: `float32` where it computes in float32, otherwise its dtype's precision (at least)."""
    dtype = model_or_dtype if isinstance(model_or_dtype, str) else model_or_dtype.info.dtype
    return max(float32, HALF_PRECISION.get(dtype, 0.0))
