"""The Core ML engine: `MLModel.predict` latency of an exported package, per compute unit (macOS only).

The only module of aim_mlx that imports coremltools, and only when `bench --coreml` runs; without it that
is a one-line error naming the `coreml` extra.
"""

import sys
import time
from pathlib import Path

import numpy as np

from ..errors import AimMlxError, ConfigError
from .harness import require
from .timing import peak_rss_mb, summarize, time_calls

COREML_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")


def run_coreml(package: Path, trials: int = 5, warmup: int = 1) -> list[dict]:
    """`MLModel.predict` latency of a Core ML package per compute unit. Core ML runs only on macOS."""
    if sys.platform != "darwin":
        raise AimMlxError(f"--coreml needs macOS: Core ML cannot run predictions on {sys.platform}")
    if not package.exists():
        raise ConfigError(f"--coreml {package}: no such package")
    ct = require("coremltools", "coreml")
    from PIL import Image

    rows = []
    for unit in COREML_UNITS:
        start = time.perf_counter()
        model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit[unit])
        load_s = time.perf_counter() - start
        feed = {}
        for item in model.get_spec().description.input:
            if item.type.WhichOneof("Type") == "imageType":
                size = (item.type.imageType.width, item.type.imageType.height)
                feed[item.name] = Image.fromarray(
                    np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), np.uint8)
                )
            else:
                shape = tuple(item.type.multiArrayType.shape)
                feed[item.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        times = time_calls(lambda m=model, f=feed: m.predict(f), trials=trials, warmup=warmup)
        compression = model.user_defined_metadata.get("compression", "package")
        rows.append(coreml_row(package, unit, times, load_s, compression))
    return rows


def coreml_row(package: Path, unit: str, times: list[float], load_s: float, compression: str) -> dict:
    """One compute unit's result, in the shape of the MLX rows (its FLOP rate unknown: None)."""
    return {
        "model": str(package),
        "engine": f"coreml {unit}",
        "dtype": "package",
        "weights": compression,
        **summarize(times, 1, None),
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_mlx_mb": None,
        "peak_memory_mb": peak_rss_mb(),
    }
