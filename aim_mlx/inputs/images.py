"""Reading images safely: a file Pillow opens becomes an upright RGB image, or an ImageError says why not.

iPhone photos are HEIC: Pillow reads them through pillow-heif (the `library` extra) when it is installed;
without it such a file is skipped with a line naming the extra. AVIF is Pillow's own. RAW photos (DNG, CR2,
NEF, ...) are read by inputs/raw.py through rawpy (the `raw` extra), and skipped the same way without it. A
video (inputs/video.py, the `video` extra) reads as its first frame, and a frame's name (`clip.mp4#t=1.000`)
as that frame.
"""

import os
import warnings
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError
from ..extras import optional
from .raw import RAW_SUFFIXES, read_raw
from .video import MAX_FRAMES, VIDEO_SUFFIXES, expand_videos, is_video, parse_frame_name, read_frame

ImageLike = str | os.PathLike | Image.Image
HEIF_SUFFIXES = {".heic", ".heics", ".heif", ".heifs", ".hif"}
_plugins: list[bool] = []  # [whether pillow-heif registered], once tried


def heif_available() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow (once); False when it is not installed."""
    if not _plugins:
        heif = optional("pillow_heif")
        if heif is not None:
            heif.register_heif_opener()
        _plugins.append(heif is not None)
    return _plugins[0]


def image_suffixes() -> set[str]:
    """File suffixes Pillow can open (used when walking folders; files named explicitly are always tried).
    HEIC/HEIF and RAW count even without their extras, so that such photos are reported, not silently passed
    over."""
    heif_available()
    return {suffix.lower() for suffix in Image.registered_extensions()} | HEIF_SUFFIXES | RAW_SUFFIXES


def find_images(
    paths: Iterable[str | os.PathLike], videos: bool = False, max_frames: int = MAX_FRAMES
) -> list[Path]:
    """Expand the given paths: files are kept as given (in order), folders are walked recursively in sorted
    order for image files, skipping hidden files and folders. A path that does not exist is kept, so that
    reading it reports the problem next to the other per-file failures. With `videos`, folders' videos are
    found too, and every video stands as its chosen frames (`clip.mp4#t=1.000`, at most `max_frames`)."""
    suffixes = image_suffixes() | (VIDEO_SUFFIXES if videos else set())
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        for child in sorted(path.rglob("*")):
            hidden = any(part.startswith(".") for part in child.relative_to(path).parts)
            if not hidden and child.suffix.lower() in suffixes and child.is_file():
                found.append(child)
    return list(expand_videos(found, max_frames)) if videos else found


def load_image(source: ImageLike) -> Image.Image:
    """Open an image file (or take a PIL image) and return it upright (EXIF orientation applied) in RGB.

    Transparent images are composited on white; 16-bit and float images are scaled to 8 bits; grey, palette,
    CMYK and the other modes are converted. Raises ImageError for a missing, empty, unreadable or truncated
    file and for images over Pillow's decompression-bomb limit.
    """
    if isinstance(source, Image.Image):
        check_size(source, "image")
        return to_rgb(ImageOps.exif_transpose(source))
    path = Path(source)
    frame = parse_frame_name(path)
    if frame is not None:
        return _upright(lambda: read_frame(*frame), str(path))
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: file is empty")
    if path.suffix.lower() in RAW_SUFFIXES:  # Pillow would take a DNG for a TIFF it cannot decode
        return _upright(lambda: read_raw(path), str(path))
    if is_video(path):
        return _upright(lambda: read_frame(path), str(path))
    return _open(path, str(path), heif=path.suffix.lower() in HEIF_SUFFIXES)


def load_image_bytes(data: bytes, name: str) -> Image.Image:
    """An image file's bytes (an upload) as `load_image` reads a file; `name` starts its errors' lines."""
    if not data:
        raise ImageError(f"{name}: no image data")
    return _open(BytesIO(data), name)


def _open(file, name: str, heif: bool = False) -> Image.Image:
    heif_available()

    def decode() -> Image.Image:
        with Image.open(file) as image:
            check_size(image, name)
            image.load()
            return ImageOps.exif_transpose(image)

    return _upright(decode, name, heif)


def _upright(decode, name: str, heif: bool = False) -> Image.Image:
    """`decode()`'s upright image in RGB, within Pillow's decompression-bomb limit, or an ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = decode()
            check_size(image, name)
            return to_rgb(image)
    except ImageError:  # already one line naming the file (a ValueError too: not "corrupt" below)
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        limit = Image.MAX_IMAGE_PIXELS
        raise ImageError(
            f"{name}: over Pillow's decompression-bomb limit of {limit} pixels; downscale it"
        ) from None
    except UnidentifiedImageError:
        if heif and not heif_available():
            raise ImageError(
                f"{name}: reading HEIC/HEIF photos needs pillow-heif; pip install 'aim-mlx[library]'"
            ) from None
        raise ImageError(f"{name}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow reports truncated/corrupt data in all three
        raise ImageError(f"{name}: truncated or corrupt image ({exc})") from None


def check_size(image: Image.Image, name: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise ImageError(
            f"{name}: {image.width}x{image.height} is over Pillow's decompression-bomb limit of {limit} "
            "pixels; downscale it"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return Image.fromarray(to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16-bit integers (0-65535) and floats (0-1, or 0-255 when larger) to 8-bit grey."""
    pixels = pixels.astype(np.float64)
    scale = 1 / 257
    if mode == "F":
        scale = 255.0 if pixels.max(initial=0.0) <= 1.0 else 1.0
    return np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
