"""aim-mlx: Apple's AIM vision encoders on MLX.

    import aim_mlx
    model, processor = aim_mlx.load("apple/aimv2-large-patch14-224")
    embeddings = model.encode_image(processor(["photo.jpg"]))  # (1, 1024)

Importing this package is cheap: MLX and the model code load on first use. The import decides, without
loading MLX, where MLX will run (platform/devices.py): a GPU where MLX has one (Apple silicon; an NVIDIA GPU
with MLX's CUDA build, `pip install "aim-mlx[cuda]"`), else the CPU; AIM_MLX_DEVICE=cpu|gpu overrides, and
`load` makes the choice MLX's default device where MLX's own default differs. What the import changes in
the process, for the CPU on Linux only and unless AIM_MLX_BLAS=0 (platform/blas.py):
- an OpenBLAS is loaded into the global symbol scope, so that MLX's CPU backend (loaded later) multiplies
  with it instead of its reference BLAS; OpenBLAS's idle threads are told to sleep sooner
  (OPENBLAS_THREAD_TIMEOUT for that library alone; the process's environment is left as it was);
- glibc's malloc keeps up to 512 MiB of freed memory instead of returning it at once (mallopt), unless the
  environment tunes malloc itself (MALLOC_*, GLIBC_TUNABLES; platform/malloc.py); `load` hands back what a
  load freed.
The numpy backend (platform/numpy_blocks.py) keeps one worker thread per core once it has run, and runs one
call at a time (platform/workers.py): threads of a server share it safely, one after the other.
"""

import sys

from .errors import ConfigError
from .log import logger
from .platform import blas, devices

__version__ = "0.1.0"

try:
    _fast_blas = devices.current().fast_blas  # on the CPU on Linux; a GPU's matmuls never reach it
except ConfigError:  # a mistyped AIM_MLX_DEVICE (or MLX's CUDA build without the driver) fails no import:
    _fast_blas = False  # `load` says so in one line
# MLX binds its BLAS symbols when mlx.core loads, so the fast BLAS must be in place before that (Linux only:
# macOS keeps Accelerate, whatever the import order).
if _fast_blas and "mlx.core" in sys.modules:
    logger.warning(
        "aim-mlx: mlx.core was imported before aim_mlx, so MLX keeps its slow reference BLAS on Linux; "
        "import aim_mlx first"
    )
if _fast_blas:
    blas.enable()
__all__ = ["load", "__version__"]


def load(path_or_id: str, revision: str | None = None, dtype: str | None = None, probe: str | None = None):
    """Load an AIM checkpoint (hub id or local folder): `(model, processor)`.

    `model.encode_image(processor(paths))` gives (B, D) embeddings; `model.info` says what was loaded. See
    aim_mlx.loading.load for the arguments."""
    try:
        from .loading import load as _load  # imports mlx.core
    except ImportError:
        devices.current()  # MLX's CUDA build without the NVIDIA driver: one line that says so and what to do
        raise

    return _load(path_or_id, revision=revision, dtype=dtype, probe=probe)
