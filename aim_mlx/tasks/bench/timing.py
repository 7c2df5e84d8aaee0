"""What a benchmark measures, and on what: timed calls and their summary, FLOPs per image, the sgemm
roofline, peak memory, and the machine facts and header that every printed result carries.

numpy and the standard library only (mlx for the machine facts), so that every script can time with it.
"""

import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...models.config import VisionConfig


def flops_per_image(config: VisionConfig, grid: tuple[int, int] | None = None) -> float:
    """Multiply-add FLOPs of one forward pass (matmuls and attention; norms and activations are noise)."""
    gh, gw = grid or (config.image_size // config.patch_size,) * 2
    n, d, m = gh * gw, config.hidden_size, config.intermediate_size
    patch = 2 * n * d * config.patch_size**2 * config.num_channels
    per_block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * n * d * m * 3 + 2 * 2 * n * n * d
    return float(patch + config.num_hidden_layers * per_block)


def time_calls(
    fn: Callable[[], object], trials: int = 5, warmup: int = 1, before: Callable[[], object] | None = None
) -> list[float]:
    """Wall seconds of `trials` calls of `fn` after `warmup` untimed ones. `fn` must block until done;
    `before()`, untimed, runs ahead of each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(trials):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summarize(times: list[float], batch: int, flops: float | None) -> dict:
    """images/s from the median call, per-image latency percentiles, achieved GFLOP/s (None when the FLOPs
    per image are unknown)."""
    t = np.asarray(times)
    median = float(np.median(t))
    return {
        "batch": batch,
        "images_per_s": batch / median,
        "ms_per_image_p50": 1e3 * median / batch,
        "ms_per_image_p95": 1e3 * float(np.percentile(t, 95)) / batch,
        "gflops": None if flops is None else flops * batch / median / 1e9,
        "trials": len(times),
    }


def sgemm_gflops(n: int = 2048, trials: int = 5) -> float:
    """This machine's fp32 GEMM rate through numpy's BLAS: the roofline the encoders are measured against."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    best = min(time_calls(lambda: a @ b, trials=trials, warmup=1))
    return 2 * n**3 / best / 1e9


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: clear_refs resets VmHWM; elsewhere nothing happens)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


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
    """CPU model, cores, OS, library versions and the device MLX runs on (as aim_mlx/devices.py chose it),
    for the header of every result."""
    cpu = platform.processor() or platform.machine()
    if sys.platform == "darwin":  # the chip's name, e.g. "Apple M2 Pro"
        done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        cpu = done.stdout.strip() or cpu
    elif sys.platform == "linux":
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    from ... import __version__
    from ...platform import blas as _blas
    from ...platform import devices

    devices.apply()  # MLX's default device as load() sets it in the processes that run the engines
    import mlx.core as mx

    on_gpu = mx.default_device() == mx.gpu
    cuda = getattr(mx, "cuda", None)  # (mx.cuda and mx.device_info: MLX 0.30 on)
    gpu = ("cuda" if cuda is not None and cuda.is_available() else "metal") if on_gpu else None
    device_info = getattr(mx, "device_info", None)
    blas = _blas.status()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "numpy": np.__version__,
        "aim_mlx": __version__,
        "mlx_device": str(mx.default_device()),
        "gpu": gpu,
        "device_name": device_name(gpu, device_info(mx.default_device()) if device_info else {}, cpu),
        "mlx_blas": blas["path"] or ("Accelerate" if sys.platform == "darwin" else "MLX's own"),
        "mlx_blas_kernel": blas["kernel"],
        "numpy_blas_kernel": _numpy_blas_kernel(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),  # when set, it forces both kernels
        "threads": int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count() or 1),
    }


def device_name(gpu: str | None, mlx_info: dict, cpu: str, nvidia_smi=None) -> str:
    """What MLX runs on, by name: the GPU's (MLX's device_info; on CUDA, nvidia-smi's where MLX gives none)
    or the CPU model `cpu`. `gpu` is "cuda", "metal" or None (the CPU)."""
    if gpu is None:
        return cpu
    name = str(mlx_info.get("device_name") or "")
    if not name and gpu == "cuda":
        name = (nvidia_smi or _nvidia_smi_name)() or ""
    return name or ("an NVIDIA GPU" if gpu == "cuda" else "an Apple GPU")


def _nvidia_smi_name() -> str | None:
    """The first GPU's name as nvidia-smi gives it (under CUDA_VISIBLE_DEVICES it may not be MLX's)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines() if done.returncode == 0 else []
    return lines[0].strip() if lines else None


def header(info: dict) -> str:
    """`machine()` as the comment lines that head a printed result."""
    blas = info["mlx_blas"] + (f" ({info['mlx_blas_kernel']} kernels)" if info["mlx_blas_kernel"] else "")
    numpy = info["numpy"] + (
        f" (OpenBLAS, {info['numpy_blas_kernel']} kernels)" if info["numpy_blas_kernel"] else ""
    )
    lines = [
        f"# {info['cpu']}, {info['cores']} cores, {info['os']}",
        f"# mlx {info['mlx']} on {_device(info)}, BLAS {blas}, {info['threads']} threads; "
        f"aim-mlx {info['aim_mlx']}, numpy {numpy}",
    ]
    if info["openblas_coretype"]:
        lines.append(
            f"# OPENBLAS_CORETYPE={info['openblas_coretype']} is set: it picks every OpenBLAS's kernels"
        )
    return "\n".join(lines)


def _device(info: dict) -> str:
    """e.g. "NVIDIA H200 (CUDA)", "Apple M2 Pro (Metal)", "AMD EPYC (CPU)"; results written before the device
    was named say MLX's Device(...)."""
    if "device_name" not in info:
        return info["mlx_device"]
    kind = {"cuda": "CUDA", "metal": "Metal"}.get(info.get("gpu"), "CPU")
    return f"{info['device_name']} ({kind})"


def _numpy_blas_kernel() -> str | None:
    """The CPU kernels numpy's own OpenBLAS runs (the sgemm roofline's), read with threadpoolctl. None without
    threadpoolctl (the test extra has it) or when numpy's BLAS is not the OpenBLAS its wheel bundles."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    numpy_dir = str(Path(np.__file__).parent)  # a prefix of numpy.libs/, where the wheel keeps its OpenBLAS
    for lib in threadpool_info():
        if lib.get("internal_api") == "openblas" and lib["filepath"].startswith(numpy_dir):
            return lib.get("architecture")
    return None
