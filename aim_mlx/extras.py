"""Optional dependencies: imported when a feature needs one, or one line naming the extra that installs it.

The runtime needs none of them. Each is listed once, with the distribution pip installs and the aim-mlx
extra that brings it.
"""

import importlib
from types import ModuleType

from .errors import AimMlxError

# top-level import name -> (the distribution pip installs, the aim-mlx extra that brings it)
OPTIONAL = {
    "coremltools": ("coremltools", "coreml"),  # aim-mlx export coreml
    "skimage": ("scikit-image", "coreml"),  # the photos `export coreml --check` verifies on
    "torch": ("torch", "pth"),  # reading AIMv1's published pickles (convert/pickles.py)
    "transformers": ("transformers", "bench"),  # bench --compare-torch
    "matplotlib": ("matplotlib", "plot"),  # bench --plot
    "starlette": ("starlette", "library"),  # aim-mlx serve
    "uvicorn": ("uvicorn", "library"),
    "usearch": ("usearch", "library"),  # the photo library's fast first pass
    "pillow_heif": ("pillow-heif", "library"),  # HEIC photos
    "watchfiles": ("watchfiles", "library"),  # aim-mlx index --watch
    "rawpy": ("rawpy", "raw"),  # RAW photos (LibRaw): inputs/raw.py
    "exifread": ("exifread", "raw"),  # RAW photos' EXIF: inputs/metadata.py
    "av": ("av", "video"),  # videos' frames (PyAV, FFmpeg in the wheel): inputs/video.py
}


def missing(module: str, extra: str | None = None) -> str:
    """The line that says `module` is not installed and which extra installs it."""
    package, default = OPTIONAL[module.split(".")[0]]
    return f"{package} is not installed; pip install 'aim-mlx[{extra or default}]'"


def require(module: str, extra: str | None = None) -> ModuleType:
    """`module`, imported; if it is missing, an AimMlxError such as "coremltools is not installed; pip
    install 'aim-mlx[coreml]'" instead of an ImportError traceback (`extra` names another extra that also
    brings it, e.g. torch through `bench`). A module that is installed but fails to import (a dependency of
    its own missing) still raises."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module.startswith(exc.name):
            raise
        raise AimMlxError(missing(module, extra)) from None


def optional(module: str) -> ModuleType | None:
    """`module`, imported, or None where it is not installed: for features that work without it."""
    try:
        return require(module)
    except AimMlxError:
        return None
