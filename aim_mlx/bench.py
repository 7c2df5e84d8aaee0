"""Timing and machine facts shared by `benchmarks/` and the `bench` command: one timing path for all."""

import os
import platform
import resource
import sys
import time
from collections.abc import Callable

import numpy as np

from .config import VisionConfig


def flops_per_image(config: VisionConfig, grid: tuple[int, int] | None = None) -> float:
    """Multiply-add FLOPs of one forward pass (matmuls and attention; norms and activations are noise)."""
    gh, gw = grid or (config.image_size // config.patch_size,) * 2
    n, d, m = gh * gw, config.hidden_size, config.intermediate_size
    patch = 2 * n * d * config.patch_size**2 * config.num_channels
    per_block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * n * d * m * 3 + 2 * 2 * n * n * d
    return float(patch + config.num_hidden_layers * per_block)


def time_calls(fn: Callable[[], object], trials: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of `trials` calls of `fn` after `warmup` untimed ones. `fn` must block until done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summarize(times: list[float], batch: int, flops: float) -> dict:
    """images/s from the median call, per-image latency percentiles, achieved GFLOP/s."""
    t = np.asarray(times)
    median = float(np.median(t))
    return {
        "batch": batch,
        "images_per_s": batch / median,
        "ms_per_image_p50": 1e3 * median / batch,
        "ms_per_image_p95": 1e3 * float(np.percentile(t, 95)) / batch,
        "gflops": flops * batch / median / 1e9,
        "trials": len(times),
    }


def sgemm_gflops(n: int = 2048, trials: int = 5) -> float:
    """This machine's fp32 GEMM rate through numpy's BLAS: the roofline the encoders are measured against."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    best = min(time_calls(lambda: a @ b, trials=trials, warmup=1))
    return 2 * n**3 / best / 1e9


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far.

    On Linux this is VmHWM, which starts afresh at exec; ru_maxrss would include the parent's peak when the
    process was started with fork+exec (as the benchmarks start their engines).
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, macOS: bytes
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def machine() -> dict:
    """CPU model, cores, OS and library versions, for the header of every result."""
    cpu = platform.processor() or platform.machine()
    if sys.platform == "linux":
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    import mlx.core as mx

    from . import __version__, _blas

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "numpy": np.__version__,
        "aim_mlx": __version__,
        "mlx_device": str(mx.default_device()),
        "mlx_blas": _blas.status()["path"] or "MLX's bundled BLAS",
    }
