"""RAW photos through LibRaw (rawpy, the `raw` extra): a file in, an upright image out, or an ImageError.

A camera stores a JPEG preview of the whole photo in most RAW files: it is what the camera shows, rendered
with the camera's own colours, and it decodes in half the time of the demosaic (docs/media.md). It is used
when it is big enough for any of the models (MIN_PREVIEW on its long side, or half the sensor's); otherwise
the sensor data is demosaiced at half size (LibRaw's half_size: each 2x2 Bayer cell becomes one pixel, no
interpolation).
"""

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import AimMlxError, ImageError
from ..extras import optional, require

RAW_SUFFIXES = {".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"}
MIN_PREVIEW = 1024  # pixels on the long side: more than the largest fixed-size model's 448
# LibRaw's `flip` (dcraw's encoding of the EXIF orientation) -> the transpose that makes the image upright
_UPRIGHT = {
    1: Image.Transpose.FLIP_LEFT_RIGHT,
    2: Image.Transpose.FLIP_TOP_BOTTOM,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.TRANSPOSE,
    5: Image.Transpose.ROTATE_90,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
}


def rawpy_module(name: str):
    """rawpy, or an ImageError naming the file and the extra (so that a batch skips the file and goes on)."""
    try:
        return require("rawpy", "raw")
    except AimMlxError as exc:
        raise ImageError(f"{name}: reading RAW photos needs rawpy; {exc}") from None


def read_raw(path: str | Path, name: str | None = None) -> Image.Image:
    """The RAW file at `path` as an upright image (RGB, or whatever mode its preview JPEG has): its embedded
    preview when that is big enough, else a half-size demosaic. `name` starts the errors' lines."""
    name = name or str(path)
    rawpy = rawpy_module(name)
    try:
        with rawpy.imread(str(path)) as raw:
            image = _preview(rawpy, raw)
            if image is None:
                pixels = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)  # (H/2, W/2, 3)
                image = Image.fromarray(pixels)  # LibRaw has applied the orientation
            return image
    except (rawpy.LibRawError, rawpy.NotSupportedError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).strip("b'\"") or type(exc).__name__
        raise ImageError(f"{name}: not a RAW file LibRaw can read, or truncated ({reason})") from None


def raw_size(path: str | Path) -> tuple[int, int] | None:
    """The photo's upright (width, height) from its RAW header (LibRaw parses it, decodes nothing); None when
    rawpy is missing or LibRaw cannot read the file."""
    rawpy = optional("rawpy")
    if rawpy is None:
        return None
    try:
        with rawpy.imread(str(path)) as raw:
            sizes = raw.sizes
    except (rawpy.LibRawError, rawpy.NotSupportedError, OSError, ValueError):
        return None
    return (sizes.height, sizes.width) if sizes.flip & 4 else (sizes.width, sizes.height)  # 4: axes swap


def _preview(rawpy, raw) -> Image.Image | None:
    """The embedded preview, upright, or None where there is none or it is too small to use."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        # A preview without EXIF of its own gets the RAW's orientation in an EXIF header LibRaw adds.
        with Image.open(BytesIO(thumb.data)) as jpeg:
            jpeg.load()
            image = ImageOps.exif_transpose(jpeg)
    else:  # a bitmap preview: (h, w, 3) pixels, stored as the sensor sees them
        image = Image.fromarray(np.ascontiguousarray(thumb.data)).convert("RGB")
        if raw.sizes.flip in _UPRIGHT:
            image = image.transpose(_UPRIGHT[raw.sizes.flip])
    sizes = raw.sizes
    if max(image.size) < min(MIN_PREVIEW, max(sizes.width, sizes.height) // 2):
        return None
    return image
