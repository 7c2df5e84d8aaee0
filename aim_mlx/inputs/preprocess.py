"""Image preprocessing without torch, matching transformers' PIL CLIP image processor.

Fixed-resolution checkpoints: resize the shortest edge (bicubic), center crop, rescale to [0, 1], normalize.
The native checkpoint keeps each image's aspect ratio: see `native_size`. AIMv1: ml-aim's torchvision
`val_transforms` (`ImageProcessor.aimv1`).
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from ..checkpoints.variants import CLIP_PREPROCESSOR, IMAGENET_MEAN, IMAGENET_STD, Variant
from ..errors import ConfigError
from ..log import logger
from .images import ImageLike, load_image
from .tokenizer import ClipTokenizer

PATCH = 14
MIN_PATCHES = 112
MAX_PATCHES = 4096


def native_size(
    width: int,
    height: int,
    patch: int = PATCH,
    min_patches: int = MIN_PATCHES,
    max_patches: int = MAX_PATCHES,
) -> tuple[int, int]:
    """The (width, height) the native checkpoint sees an image at.

    Both sides are rounded to the nearest multiple of `patch`; if the grid then has more than `max_patches`
    patches it is scaled down (fewer than `min_patches`: up) by a common factor, keeping the aspect ratio as
    closely as whole patches allow. Extremely thin images are clamped along their long side.
    """
    cols, rows = max(1, round(width / patch)), max(1, round(height / patch))
    if cols * rows > max_patches:
        scale = math.sqrt(max_patches / (cols * rows))
        cols, rows = max(1, math.floor(cols * scale)), max(1, math.floor(rows * scale))
        cols, rows = min(cols, max_patches // rows), min(rows, max_patches // cols)
    elif cols * rows < min_patches:
        scale = math.sqrt(min_patches / (cols * rows))
        cols, rows = math.ceil(cols * scale), math.ceil(rows * scale)
    return cols * patch, rows * patch


def _size(value, name: str) -> tuple[str, int | tuple[int, int]]:
    """transformers' size forms: int, {"shortest_edge": n} or {"height": h, "width": w}."""
    if isinstance(value, int):
        return "square", (value, value)
    if isinstance(value, dict) and "shortest_edge" in value:
        return "shortest_edge", int(value["shortest_edge"])
    if isinstance(value, dict) and {"height", "width"} <= value.keys():
        return "square", (int(value["height"]), int(value["width"]))
    raise ConfigError(f"unsupported {name} in preprocessor_config.json: {value!r}")


@dataclass
class ImageProcessor:
    """Turns images (paths or PIL images) into normalized NHWC float32 pixels for the encoder."""

    do_resize: bool = True
    size: dict | int | None = None  # {"shortest_edge": n} or {"height": h, "width": w}
    resample: int = Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: dict | int | None = None
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = tuple(CLIP_PREPROCESSOR["image_mean"])
    image_std: tuple[float, float, float] = tuple(CLIP_PREPROCESSOR["image_std"])
    native: bool = False  # resize each image to `native_size` instead (the native-resolution checkpoint)
    # Where the crop starts when the margin is odd: transformers floors half of it; torchvision's CenterCrop
    # rounds it (Python's round, half to even), so the two can differ by one pixel.
    crop_offset: str = "floor"  # or "round"

    @classmethod
    def from_dict(cls, config: dict, native: bool = False) -> "ImageProcessor":
        processor = cls(
            do_resize=config.get("do_resize", True),
            size=config.get("size"),
            resample=int(config.get("resample", Image.Resampling.BICUBIC)),
            do_center_crop=config.get("do_center_crop", True),
            crop_size=config.get("crop_size"),
            rescale_factor=float(
                config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1
            ),
            image_mean=tuple(config.get("image_mean", CLIP_PREPROCESSOR["image_mean"])),
            image_std=tuple(config.get("image_std", CLIP_PREPROCESSOR["image_std"])),
            native=native,
        )
        if not config.get("do_normalize", True):
            processor.image_mean, processor.image_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        processor.validate()
        return processor

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, native: bool = False, variant: Variant | None = None, image_size: int = 224
    ) -> "ImageProcessor":
        """Read `preprocessor_config.json` from a checkpoint folder; without one, use the variant's published
        config, or CLIP preprocessing at `image_size`."""
        path = Path(folder) / "preprocessor_config.json"
        if path.is_file():
            try:
                return cls.from_dict(json.loads(path.read_text()), native=native)
            except ValueError as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"{path} is not valid JSON ({exc})") from exc
        if variant is not None:
            return cls.from_dict(variant.preprocessor_config(), native=native)
        logger.warning(
            "%s has no preprocessor_config.json; using CLIP preprocessing at %d px", folder, image_size
        )
        return cls.clip(image_size, native=native)

    @classmethod
    def clip(cls, image_size: int, native: bool = False) -> "ImageProcessor":
        """The checkpoints' own preprocessing: shortest edge to `image_size`, center crop, CLIP mean/std."""
        return cls(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            native=native,
        )

    @classmethod
    def imagenet(cls, image_size: int = 224) -> "ImageProcessor":
        """ml-aim README's transform: shortest edge to size/0.875 (256 for 224), crop, ImageNet mean/std."""
        return cls(
            size={"shortest_edge": int(image_size / 0.875)},
            crop_size={"height": image_size, "width": image_size},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )

    @classmethod
    def aimv1(cls, image_size: int = 224) -> "ImageProcessor":
        """ml-aim's AIMv1 `val_transforms` on PIL images: torchvision's Resize(ceil(size / 0.875)) bicubic
        (Pillow resizes), CenterCrop(size), ToTensor, Normalize with ImageNet mean/std."""
        return cls(
            size={"shortest_edge": math.ceil(image_size / 0.875)},
            crop_size={"height": image_size, "width": image_size},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            crop_offset="round",
        )

    def validate(self) -> None:
        if self.crop_offset not in ("floor", "round"):
            raise ConfigError(f"crop_offset must be floor or round, got {self.crop_offset!r}")
        if not self.native:
            if self.do_resize:
                _size(self.size, "size")
            if self.do_center_crop:
                _size(self.crop_size, "crop_size")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(self.image_std):
            raise ConfigError(
                f"image_mean/image_std need three values with non-zero std, got "
                f"{self.image_mean} / {self.image_std}"
            )
        try:
            Image.Resampling(self.resample)
        except ValueError:
            raise ConfigError(f"unknown resample filter {self.resample} in preprocessor config") from None

    def to_dict(self) -> dict:
        """A transformers-style preprocessor_config.json."""
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": self.do_resize and not self.native,
            "size": self.size,
            "resample": int(self.resample),
            "do_center_crop": self.do_center_crop and not self.native,
            "crop_size": self.crop_size,
            "do_rescale": self.rescale_factor != 1.0,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }

    def resize(self, image: Image.Image) -> Image.Image:
        if self.native:
            size = native_size(*image.size)
        elif not self.do_resize:
            return image
        else:
            kind, value = _size(self.size, "size")
            if kind == "square":
                size = value[::-1]
            else:  # the short side to `value`, the long side truncated like transformers and torchvision
                width, height = image.size
                short, long = sorted((width, height))
                new_long = int(value * long / short)
                size = (value, new_long) if width <= height else (new_long, value)
        return image if size == image.size else image.resize(size, resample=Image.Resampling(self.resample))

    def center_crop(self, pixels: np.ndarray) -> np.ndarray:
        """transformers' crop of an (H, W, C) array, zero-padded when the image is smaller than the crop."""
        if self.native or not self.do_center_crop:
            return pixels
        _, (crop_h, crop_w) = _size(self.crop_size, "crop_size")
        height, width = pixels.shape[:2]
        if height < crop_h or width < crop_w:
            padded = np.zeros((max(height, crop_h), max(width, crop_w), pixels.shape[2]), pixels.dtype)
            top, left = math.ceil((padded.shape[0] - height) / 2), math.ceil((padded.shape[1] - width) / 2)
            padded[top : top + height, left : left + width] = pixels
            pixels, height, width = padded, *padded.shape[:2]
        if self.crop_offset == "round":
            top, left = round((height - crop_h) / 2), round((width - crop_w) / 2)
        else:
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return pixels[top : top + crop_h, left : left + crop_w]

    def preprocess_one(self, image: ImageLike) -> np.ndarray:
        """One image (path or PIL) to normalized (H, W, 3) float32 pixels."""
        pixels = np.asarray(self.resize(load_image(image)))
        pixels = self.center_crop(pixels)
        pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, np.float32)
        std = np.asarray(self.image_std, np.float32)
        return (pixels - mean) / std

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> mx.array:
        """Images (paths or PIL images, one or a list) to an NHWC float32 batch."""
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        arrays = [self.preprocess_one(image) for image in images]
        if len({a.shape for a in arrays}) > 1:
            raise ConfigError(
                "native-resolution images of different sizes cannot share a batch; process them one at a time"
            )
        return mx.array(np.stack(arrays))


class LiTProcessor:
    """`processor(images)` -> NHWC pixels, as for vision models; `processor.tokenize(texts)` -> token ids."""

    def __init__(self, image: ImageProcessor, tokenizer: ClipTokenizer):
        self.image = image
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return f"LiTProcessor(image={self.image!r}, tokenizer={self.tokenizer!r})"

    def __call__(self, images) -> mx.array:
        return self.image(images)

    def preprocess_one(self, image):
        return self.image.preprocess_one(image)

    def tokenize(self, texts: list[str]):
        return self.tokenizer(texts)

    def to_dict(self) -> dict:
        return self.image.to_dict()
