"""aim-mlx: Apple's AIM vision encoders on MLX.

    import aim_mlx
    model, processor = aim_mlx.load("apple/aimv2-large-patch14-224")
    embeddings = model.encode_image(processor(["photo.jpg"]))  # (1, 1024)

Importing this package is cheap; MLX and the model code load on first use. On Linux the first use also
gives MLX a fast BLAS (see aim_mlx/_blas.py).
"""

import logging
import sys

from . import _blas

__version__ = "0.1.0"

# MLX binds its BLAS symbols when mlx.core loads, so the fast BLAS must be in place before that.
if "mlx.core" in sys.modules:
    logging.getLogger("aim_mlx").warning(
        "aim-mlx: mlx.core was imported before aim_mlx, so MLX keeps its slow reference BLAS on Linux; "
        "import aim_mlx first"
    )
_blas.enable()
__all__ = ["load", "__version__"]


def load(path_or_id: str, revision: str | None = None, dtype: str | None = None):
    """Load an AIMv2 checkpoint (hub id or local folder); return `(model, processor)`. See aim_mlx.loading."""
    from .loading import load as _load

    return _load(path_or_id, revision=revision, dtype=dtype)
