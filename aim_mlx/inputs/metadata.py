"""What a photo or video says about itself: when it was taken, where, and with which camera.

Headers only, never pixels. Pillow reads the EXIF of JPEG, HEIC (pillow-heif), PNG, TIFF and WebP; RAW files
are read by exifread (the `raw` extra; TIFF-based RAWs: DNG, CR2, NEF, ARW, ORF, RW2), else from the EXIF
of their embedded preview (CR3, RAF), else LibRaw's capture time; videos by their container's tags (PyAV,
the `video` extra). A header that cannot be read, or an extra that is missing, gives empty fields, never an
error: decoding the file is what reports a broken one.

`taken` is the wall-clock time where the photo was taken, without a timezone: EXIF's DateTimeOriginal (else
DateTime) as the camera wrote it. A video's container usually holds UTC: Apple's local creation date is
preferred where it is there, else the UTC time is given in this machine's timezone. A file's mtime is never
passed off as a capture time.
"""

import os
import re
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path

from PIL import Image

from ..extras import optional
from .images import heif_available
from .raw import RAW_SUFFIXES
from .video import VIDEO_SUFFIXES, container_tags, creation_time

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL, _DATETIME, _DATETIME_ORIGINAL = 271, 272, 306, 36867
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 1, 2, 3, 4


@dataclass(frozen=True)
class Metadata:
    taken: datetime | None = None  # naive: the local time where it was taken
    latitude: float | None = None  # degrees, north positive
    longitude: float | None = None  # degrees, east positive
    camera: str | None = None  # "Make Model", e.g. "Canon EOS R5" (the make once)


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The capture time, GPS position and camera of the photo or video at `path` (empty fields where the
    file does not say, or its header cannot be read)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in VIDEO_SUFFIXES:
            return _from_video(path)
        if suffix in RAW_SUFFIXES:
            return _from_raw(path)
        heif_available()
        with Image.open(path) as image:
            return _from_exif(image.getexif())
    except Exception:  # an unreadable header: decoding the file will say why
        return Metadata()


def _from_exif(exif: Image.Exif) -> Metadata:
    """From Pillow's EXIF: IFD0, its EXIF IFD and its GPS IFD."""
    gps = exif.get_ifd(_GPS_IFD)
    when = (
        exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    )
    return _build(
        when,
        exif.get(_MAKE),
        exif.get(_MODEL),
        (gps.get(_GPS_LAT), gps.get(_GPS_LAT_REF)),
        (gps.get(_GPS_LON), gps.get(_GPS_LON_REF)),
    )


def _from_raw(path: Path) -> Metadata:
    exifread, tags = optional("exifread"), {}
    if exifread is not None:
        with open(path, "rb") as f:
            if f.read(2) in (b"II", b"MM"):  # TIFF-based; not CR3 or RAF, which exifread would log about
                f.seek(0)
                tags = exifread.process_file(f, details=False)
    if tags:

        def get(*names):
            found = next((tags[n] for n in names if n in tags), None)
            if found is None:
                return None
            values = found.values
            return values if isinstance(values, list) and len(values) > 1 else str(found)

        found = _build(
            get("EXIF DateTimeOriginal", "Image DateTimeOriginal", "Image DateTime"),
            get("Image Make"),
            get("Image Model"),
            (get("GPS GPSLatitude"), get("GPS GPSLatitudeRef")),
            (get("GPS GPSLongitude"), get("GPS GPSLongitudeRef")),
        )
        if found != Metadata():
            return found
    rawpy = optional("rawpy")
    if rawpy is None:
        return Metadata()
    with rawpy.imread(str(path)) as raw:  # CR3, RAF: no TIFF header; their preview JPEG has the EXIF
        try:
            thumb = raw.extract_thumb()
            if thumb.format == rawpy.ThumbFormat.JPEG:
                with Image.open(BytesIO(thumb.data)) as jpeg:
                    found = _from_exif(jpeg.getexif())
                    if found.taken is not None:
                        return found
        except rawpy.LibRawError:
            found = Metadata()
        stamp = raw.other.timestamp  # LibRaw's parse of the same EXIF time, in local time; 0 when absent
    return Metadata(stamp if stamp.year > 1970 else None, found.latitude, found.longitude, found.camera)


def _from_video(path: Path) -> Metadata:
    tags = container_tags(path)
    when = creation_time(tags)
    if when is not None and when.tzinfo is not None:
        local = tags.get("com.apple.quicktime.creationdate")  # the phone's local time and offset
        when = when.replace(tzinfo=None) if local else when.astimezone().replace(tzinfo=None)
    place = tags.get("com.apple.quicktime.location.ISO6709") or tags.get("location") or ""
    # ISO 6709, as phones write it: "+37.3349-122.0090+012.000/"
    match = re.match(r"([+-]\d+(?:\.\d+)?)([+-]\d+(?:\.\d+)?)", place)
    lat, lon = (float(match[1]), float(match[2])) if match else (None, None)
    make = tags.get("com.apple.quicktime.make") or tags.get("make")
    model = tags.get("com.apple.quicktime.model") or tags.get("model")
    return Metadata(when, lat, lon, _camera(make, model))


def _build(when, make, model, lat, lon) -> Metadata:
    latitude, longitude = _degrees(*lat, negative="S"), _degrees(*lon, negative="W")
    if latitude is None or longitude is None:
        latitude = longitude = None
    return Metadata(_exif_time(when), latitude, longitude, _camera(make, model))


def _exif_time(value) -> datetime | None:
    try:
        return datetime.strptime(str(value).strip("\x00 "), "%Y:%m:%d %H:%M:%S")
    except ValueError:  # absent (None), blank or malformed ("0000:00:00 00:00:00")
        return None


def _degrees(dms, ref, negative: str) -> float | None:
    """EXIF's (degrees, minutes, seconds) rationals and its N/S or E/W reference as signed degrees."""
    try:
        degrees, minutes, seconds = (float(v) for v in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = degrees + minutes / 60 + seconds / 3600
    return -value if str(ref).strip("\x00 ").upper() == negative else value


def _camera(make, model) -> str | None:
    make, model = (str(v).strip("\x00 ") if v is not None else "" for v in (make, model))
    if make and model.lower().startswith(make.split()[0].lower()):  # "Canon" + "Canon EOS R5"
        make = ""
    return " ".join(part for part in (make, model) if part) or None
