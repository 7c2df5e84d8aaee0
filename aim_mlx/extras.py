"""The export tooling's optional dependencies: imported when needed, or one line that names the extra.

coremltools (building and reading packages) and scikit-image (the photos `--check` verifies on) come with
`pip install 'aim-mlx[coreml]'`; torch, for converting AIMv1's pickled checkpoints, with `aim-mlx[pth]`. The
runtime never needs any of them.
"""

import importlib
from types import ModuleType

from .errors import AimMlxError

# import name -> (the distribution pip installs, the aim-mlx extra that brings it)
OPTIONAL = {
    "coremltools": ("coremltools", "coreml"),
    "skimage": ("scikit-image", "coreml"),
    "torch": ("torch", "pth"),  # reading AIMv1's published pickles in `aim-mlx convert` (convert/pickles.py)
    "starlette": ("starlette", "library"),  # the photo library's web app (`aim-mlx serve`)
    "uvicorn": ("uvicorn", "library"),
    "usearch": ("usearch", "library"),  # the library's approximate first pass
    "pillow_heif": ("pillow-heif", "library"),  # HEIC photos
}


def require(module: str) -> ModuleType:
    """`module`, imported; if it is missing, an AimMlxError such as
    "coremltools is not installed; pip install 'aim-mlx[coreml]'" instead of an ImportError traceback.
    A module that is installed but fails to import (a dependency of its own missing) still raises."""
    package, extra = OPTIONAL[module]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise AimMlxError(f"{package} is not installed; pip install 'aim-mlx[{extra}]'") from None
