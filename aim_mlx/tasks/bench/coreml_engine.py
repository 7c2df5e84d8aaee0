"""The Core ML engine: `MLModel.predict` latency of an exported package, per compute unit (macOS only).

The only module of aim_mlx that imports coremltools, and only when `bench --coreml` runs; without it that
is a one-line error naming the `coreml` extra. A LiT export folder is timed package by package, the
packages named in its lit.json (`aim-mlx export coreml` names them after the model).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from ...errors import AimMlxError, ConfigError
from ...extras import require
from .timing import peak_rss_mb, summarize, time_calls

COREML_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")


def coreml_packages(path: Path) -> list[Path]:
    """The packages at `path`: itself, or those a LiT export folder's lit.json names."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--coreml {path}: no such package")
    if path.suffix == ".mlpackage":
        return [path]
    try:
        facts = json.loads((path / "lit.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--coreml {path}: neither a .mlpackage nor a LiT export folder with a readable lit.json ({exc})"
        ) from None
    return [
        path / facts[key] for key in ("image_package", "text_package", "classifier_package") if key in facts
    ]


def run_coreml(package: Path, trials: int = 5, warmup: int = 1) -> list[dict]:
    """`MLModel.predict` latency of a Core ML package (or each package of a LiT export folder) per compute
    unit. Core ML runs only on macOS."""
    if sys.platform != "darwin":
        raise AimMlxError(f"--coreml needs macOS: Core ML cannot run predictions on {sys.platform}")
    packages = coreml_packages(package)
    ct = require("coremltools")
    return [row for path in packages for row in _run_package(ct, path, trials, warmup)]


def _run_package(ct, package: Path, trials: int, warmup: int) -> list[dict]:
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
                array = item.type.multiArrayType
                shape = tuple(array.shape)
                if array.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32:  # token ids
                    feed[item.name] = np.zeros(shape, np.int32)
                else:
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
