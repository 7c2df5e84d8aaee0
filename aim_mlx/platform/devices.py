"""Where MLX runs, and what follows from it: the default dtype, the fast CPU BLAS, the numpy backend.

`import aim_mlx` must decide about the BLAS swap (blas.py) before mlx.core loads, so the choice is made by
one pure function, `choose`, from facts read without importing MLX (`read_facts`): which MLX native library
is in place (mlx-metal, mlx-cpu, mlx-cuda-12/13 all install mlx/lib/libmlx.so; its size against each one's
RECORD tells which won), and with the CUDA build, whether the NVIDIA driver loads and how many GPUs it shows
(NVML, narrowed by CUDA_VISIBLE_DEVICES).
- device: a GPU where MLX has one (Apple silicon; the CUDA build with a visible GPU), else the CPU;
  AIM_MLX_DEVICE=cpu|gpu overrides. dtype: float16 on a GPU, float32 on a CPU; AIM_MLX_DTYPE wins.
- the fast BLAS and the numpy backend: on the CPU on Linux only.
MLX's CUDA build calls its GPU available whenever it is installed, so `apply()` sets MLX's default device
where the choice differs from MLX's own; with that build but no driver it raises one line before MLX is
imported (MLX itself would raise an ImportError naming libcuda.so.1).
"""

import ctypes
import functools
import os
import platform
import sys
from pathlib import Path
from typing import NamedTuple

from ..errors import ConfigError
from ..log import warn_once

DEVICES = ("cpu", "gpu")
DTYPES = ("float32", "float16", "bfloat16")
# The distributions that carry MLX's native library, and the build each is (`mlx-cuda`: MLX 0.29-0.30's
# CUDA 12 build), in the order `find_build` prefers them where sizes cannot tell.
BUILDS = {
    "mlx-cuda-13": "cuda",
    "mlx-cuda-12": "cuda",
    "mlx-cuda": "cuda",
    "mlx-cpu": "cpu",
    "mlx-metal": "metal",
}
CUDA_EXTRA = 'pip install "aim-mlx[cuda]"'


class Facts(NamedTuple):
    """What the choice depends on, all known before mlx.core is imported."""

    platform: str  # sys.platform: "linux", "darwin"
    machine: str  # platform.machine(): "x86_64", "aarch64", "arm64"
    build: str | None  # the MLX native library in place: "cuda", "cpu", "metal"; None when none is
    package: str | None = None  # the distribution that put it there, e.g. "mlx-cuda-12"
    others: tuple[str, ...] = ()  # other MLX backend distributions installed over the same file
    version: str | None = None  # the version of `package` (each backend's equals mlx's)
    cuda_driver: bool = False  # libcuda.so.1 loads
    cuda_gpus: int = 0  # NVIDIA GPUs the driver reports, after CUDA_VISIBLE_DEVICES
    device: str = ""  # AIM_MLX_DEVICE as set
    dtype: str = ""  # AIM_MLX_DTYPE as set (read_facts() leaves it out: the device does not depend on it)


class Choice(NamedTuple):
    """What `choose` decided."""

    device: str  # "gpu" or "cpu"
    gpu: str | None  # the kind of GPU MLX runs on: "cuda", "metal"; None on the CPU
    dtype: str  # the default compute dtype
    fast_blas: bool  # load the OpenBLAS of backends/blas.py (Linux CPU only)
    numpy_backend: bool  # the numpy backend may run the blocks (the CPU on Linux, with the fast BLAS)
    set_default: bool  # MLX's own default device differs: apply() must set `device`
    notes: tuple[str, ...] = ()  # what the user should know (logged once by `current`)


def choose(facts: Facts) -> Choice:
    """The device, dtype and CPU-side helpers for `facts`. A ConfigError with a one-line message for: a
    mistyped AIM_MLX_DEVICE or AIM_MLX_DTYPE; a GPU asked for where there is none; MLX's CUDA build in place
    without the NVIDIA driver, where mlx.core cannot load at all."""
    asked = facts.device.strip().lower()
    if asked and asked not in DEVICES:
        raise ConfigError(f"AIM_MLX_DEVICE={asked!r} is not a device; use {' or '.join(DEVICES)}")
    cpu_build = f"pip install --force-reinstall --no-deps mlx-cpu=={facts.version}"
    if facts.build == "cuda" and not facts.cuda_driver:
        # The CUDA build's libmlx.so links libcuda.so.1: without it `import mlx.core` raises ImportError, with
        # no fallback to the CPU (measured with mlx[cuda12] 0.32.4).
        uninstall = f"pip uninstall -y {facts.package}"
        raise ConfigError(
            f"MLX's CUDA build ({facts.package}) cannot load: {_why_no_gpu(facts)}. For the CPU, put MLX's "
            f"CPU build in its place: {uninstall} && {cpu_build}"
        )
    gpu = _usable_gpu(facts)
    if asked == "gpu" and gpu is None:
        raise ConfigError(f"AIM_MLX_DEVICE=gpu, but {_why_no_gpu(facts)}")
    device = asked or ("gpu" if gpu else "cpu")
    # What MLX picks by itself: its GPU wherever its build has a GPU backend, usable or not.
    mlx_default = "gpu" if facts.build == "cuda" or _usable_gpu(facts) == "metal" else "cpu"
    notes = []
    cuda = [name for name in facts.others if BUILDS[name] == "cuda"]
    if facts.build == "cpu" and cuda:
        # `aim-mlx[cuda]` installs both builds, and both write mlx/lib/libmlx.so: pip installs mlx-cpu first,
        # uv at the same time, so the CPU's can end up in place.
        notes.append(
            f"{cuda[0]} is installed, but mlx-cpu's libmlx.so (the same file) is in place, so MLX runs on "
            f"the CPU. For the GPU: pip install --force-reinstall --no-deps {cuda[0]}=={facts.version}; to "
            f"keep the CPU: pip uninstall -y {cuda[0]} && {cpu_build}"
        )
    if facts.build == "cuda" and gpu is None and not asked:
        notes.append(f"MLX's CUDA build is installed, but {_why_no_gpu(facts)}; MLX runs on the CPU")
    return Choice(
        device=device,
        gpu=gpu if device == "gpu" else None,
        dtype=dtype_for(device, facts.dtype),
        fast_blas=device == "cpu" and facts.platform == "linux",
        numpy_backend=device == "cpu" and facts.platform == "linux",  # it runs on the fast BLAS
        set_default=device != mlx_default,
        notes=tuple(notes),
    )


def dtype_for(device: str, setting: str = "") -> str:
    """The default dtype on `device` ("gpu" or "cpu"): `setting` (AIM_MLX_DTYPE's value) if it names one."""
    chosen = setting.strip().lower()
    if chosen and chosen not in DTYPES:
        raise ConfigError(f"AIM_MLX_DTYPE={chosen!r} is not a dtype; use {', '.join(DTYPES)}")
    return chosen or ("float16" if device == "gpu" else "float32")


def _usable_gpu(facts: Facts) -> str | None:
    # MLX wheels from before the mlx-metal split carry the Metal library themselves.
    if facts.build == "metal" or (
        facts.build is None and facts.platform == "darwin" and facts.machine == "arm64"
    ):
        return "metal"
    if facts.build == "cuda" and facts.cuda_driver and facts.cuda_gpus > 0:
        return "cuda"
    return None


def _why_no_gpu(facts: Facts) -> str:
    if facts.platform == "darwin":
        return "MLX has no GPU backend on an Intel Mac"
    if facts.build != "cuda":
        return f"the MLX installed here is its CPU build; for an NVIDIA GPU: {CUDA_EXTRA}"
    if not facts.cuda_driver:
        return "the NVIDIA driver's libcuda.so.1 is not found"
    return "the NVIDIA driver reports no GPU (see nvidia-smi, and CUDA_VISIBLE_DEVICES if it is set)"


def visible_gpus(count: int, cuda_visible_devices: str | None) -> int:
    """How many of the driver's `count` GPUs CUDA shows under CUDA_VISIBLE_DEVICES: a comma-separated list of
    indices or UUIDs that CUDA reads up to its first invalid entry (unset: all; empty or -1: none). A UUID
    is taken as valid without asking the driver."""
    if cuda_visible_devices is None:
        return count
    seen = 0
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        if not (entry.isdigit() and int(entry) < count) and not entry.startswith(("GPU-", "MIG-")):
            break
        seen += 1
    return min(seen, count)


# Reading the facts: thin, cached (installed packages and hardware do not change under a running process),
# never importing mlx.core.


@functools.cache
def _installed_build() -> tuple[str | None, str | None, str | None, tuple[str, ...]]:
    return find_build(Path(entry or ".") for entry in sys.path)


def find_build(folders) -> tuple[str | None, str | None, str | None, tuple[str, ...]]:
    """(build, distribution, its version, other backend distributions) of MLX's native library, from the
    first of `folders` (sys.path) that holds the `mlx` package and a backend's dist-info.

    Read from the dist-info folders rather than through importlib.metadata, whose import alone would double
    this package's."""
    for site in folders:
        if not (site / "mlx").is_dir():
            continue
        found = {}  # name: (version, dist-info folder)
        for info in site.glob("mlx_*.dist-info"):
            name, _, version = info.name[: -len(".dist-info")].partition("-")
            if name.replace("_", "-") in BUILDS:
                found[name.replace("_", "-")] = (version, info)
        if not found:
            continue
        names = sorted(found, key=list(BUILDS).index)
        winner, lib = names[0], site / "mlx" / "lib" / "libmlx.so"
        if len(names) > 1 and lib.exists():  # the file is the last installer's: whose RECORD gives its size?
            size = str(lib.stat().st_size)
            for name in names:
                record = (found[name][1] / "RECORD").read_text().splitlines()
                if any(r.startswith("mlx/lib/libmlx.so,") and r.rsplit(",", 1)[-1] == size for r in record):
                    winner = name
                    break
        return BUILDS[winner], winner, found[winner][0], tuple(n for n in names if n != winner)
    return None, None, None, ()


@functools.cache
def _cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@functools.cache
def _driver_gpus() -> int:
    """The GPUs the NVIDIA driver reports through NVML (libnvidia-ml.so.1); /proc/driver/nvidia/gpus
    without it."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            count = ctypes.c_uint(0)
            ok = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0
            nvml.nvmlShutdown()
            if ok:
                return count.value
    except (OSError, AttributeError):
        pass
    try:
        return len(list(Path("/proc/driver/nvidia/gpus").iterdir()))
    except OSError:
        return 0


def read_facts() -> Facts:
    """This process's facts: the installed MLX, the NVIDIA driver and GPUs (only where the CUDA build is
    installed), and AIM_MLX_DEVICE as it is now. Not AIM_MLX_DTYPE, which loading.default_dtype reads only
    where a caller gives no dtype."""
    build, package, version, others = _installed_build()
    cuda = sys.platform == "linux" and build == "cuda"
    return Facts(
        platform=sys.platform,
        machine=platform.machine(),
        build=build,
        package=package,
        others=others,
        version=version,
        cuda_driver=cuda and _cuda_driver(),
        cuda_gpus=visible_gpus(_driver_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES")) if cuda else 0,
        device=os.environ.get("AIM_MLX_DEVICE", ""),
    )


def current() -> Choice:
    """The choice for this process now (the environment is read on every call); its notes are logged once."""
    choice = choose(read_facts())
    for note in choice.notes:
        warn_once(f"aim-mlx: {note}")
    return choice


def apply() -> Choice:
    """Make MLX's default device the chosen one where MLX's own default differs (see the module doc), and
    return the choice. Raises ConfigError as `choose` does, before mlx.core is imported."""
    choice = current()
    if choice.set_default:
        import mlx.core as mx

        target = mx.gpu if choice.device == "gpu" else mx.cpu
        if mx.default_device() != target:
            mx.set_default_device(target)
    return choice
