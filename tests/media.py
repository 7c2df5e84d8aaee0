"""RAW photos and videos written at test time by well-kept libraries, from real photos (never committed).

`write_dng`: a Bayer-mosaic DNG (tifffile, with the DNG tags LibRaw needs) made from an sRGB photo: the photo
is linearised and each pixel keeps the one channel its RGGB cell samples, so that LibRaw's demosaic should
give the photo back. With `preview`, IFD 0 holds that image, a baseline JPEG (Pillow's bytes, embedded as
they are) or uncompressed RGB pixels, and the mosaic moves to a SubIFD, as cameras and Adobe's converter lay
DNGs out.

`write_video`: photos shown one after another (`seconds` each) by PyAV, with a creation time.
"""

from fractions import Fraction
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

WHITE = 4095  # a 12-bit sensor
# ColorMatrix1 maps XYZ to the camera's RGB; with sRGB's own matrix the "camera" sees linear sRGB (D65)
XYZ_TO_SRGB = [[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]


def mosaic(photo: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> (H, W) uint16 RGGB Bayer samples of its linear light, 0..WHITE."""
    linear = (photo / 255.0) ** 2.2
    cfa = np.empty(photo.shape[:2], np.float64)
    cfa[0::2, 0::2] = linear[0::2, 0::2, 0]  # R
    cfa[0::2, 1::2] = linear[0::2, 1::2, 1]  # G
    cfa[1::2, 0::2] = linear[1::2, 0::2, 1]  # G
    cfa[1::2, 1::2] = linear[1::2, 1::2, 2]  # B
    return np.rint(cfa * WHITE).astype(np.uint16)


def jpeg_bytes(photo: np.ndarray, quality: int = 90) -> bytes:
    out = BytesIO()
    Image.fromarray(photo).save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_dng(
    path: Path,
    photo: np.ndarray,
    preview: bytes | np.ndarray | None = None,
    orientation: int = 1,
    taken: str = "2021:07:04 09:30:15",
    make: str = "Acme",
    model: str = "Acme R1",
) -> Path:
    import tifffile

    def srational(values):
        return [part for v in np.ravel(values) for part in (int(round(v * 10000)), 10000)]

    ascii_ = [(271, "s", 0, make, True), (272, "s", 0, model, True)]
    ascii_ += [(306, "s", 0, taken, True), (36867, "s", 0, taken, True)]  # DNG readers look in IFD 0 too
    ifd0 = ascii_ + [
        (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
        (50707, "B", 4, (1, 1, 0, 0), True),  # DNGBackwardVersion
        (50708, "s", 0, f"{make} {model}", True),  # UniqueCameraModel
        (274, "H", 1, orientation, True),
        (50721, "2i", 9, srational(XYZ_TO_SRGB), True),  # ColorMatrix1
        (50778, "H", 1, 21, True),  # CalibrationIlluminant1: D65
        (50728, "2I", 3, (1, 1, 1, 1, 1, 1), True),  # AsShotNeutral: no white-balance change
    ]
    raw = [
        (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
        (33422, "B", 4, (0, 1, 1, 2), True),  # CFAPattern: RGGB
        (50714, "H", 1, 0, True),  # BlackLevel
        (50717, "I", 1, WHITE, True),  # WhiteLevel
    ]
    cfa = mosaic(photo)
    with tifffile.TiffWriter(path) as tif:
        if preview is None:
            tif.write(cfa, photometric=32803, subfiletype=0, extratags=ifd0 + raw, metadata=None)
        elif isinstance(preview, np.ndarray):  # an uncompressed RGB preview: LibRaw's "bitmap" thumbnail
            tif.write(preview, photometric="rgb", subfiletype=1, subifds=1, extratags=ifd0, metadata=None)
            tif.write(cfa, photometric=32803, subfiletype=0, extratags=raw, metadata=None)
        else:
            with Image.open(BytesIO(preview)) as image:
                width, height = image.size
            # compression 7 with bytes: tifffile writes them as the one strip, untouched (it only asks
            # imagecodecs for a JPEG codec by name)
            tif.write(
                iter([preview]),
                shape=(height, width, 3),
                dtype=np.uint8,
                photometric="ycbcr",
                compression=7,
                rowsperstrip=height,
                subfiletype=1,  # a reduced-resolution image: the preview
                subifds=1,
                extratags=ifd0,
                metadata=None,
            )
            tif.write(cfa, photometric=32803, subfiletype=0, extratags=raw, metadata=None)
    return path


def write_video(
    path: Path,
    photos: list[np.ndarray],
    seconds: float = 1.0,
    fps: int = 10,
    size: tuple[int, int] = (320, 240),
    codec: str = "libx264",
    creation_time: str | None = "2023-06-14T16:30:00.000000Z",
    options: dict | None = None,
    rotation: int = 0,
) -> Path:
    """Each photo (resized to `size`) for `seconds` at `fps`: photo k fills [k * seconds, (k+1) * seconds).
    `rotation`: the display matrix's, in FFmpeg's sense (-90: shown turned a quarter clockwise, as a phone
    held upright records)."""
    import av

    with av.open(str(path), "w") as out:
        if creation_time is not None:
            out.metadata["creation_time"] = creation_time
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.options = options or {}
        if rotation:
            stream.set_display_rotation(rotation)
        index = 0
        for photo in photos:
            image = Image.fromarray(photo).resize(size)
            for _ in range(round(seconds * fps)):
                frame = av.VideoFrame.from_image(image)
                frame.pts, frame.time_base = index, Fraction(1, fps)
                index += 1
                out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path
