"""What a photo or video says about itself: when it was taken, where, and with which camera.

Headers only, never pixels. Pillow reads the EXIF of JPEG, HEIC (pillow-heif), PNG, TIFF and WebP; RAW files
are read by exifread (the `raw` extra; TIFF-based RAWs: DNG, CR2, NEF, ARW, ORF, RW2), else from the EXIF
of their embedded preview (CR3, RAF), else LibRaw's capture time; videos by their container's tags (PyAV,
the `video` extra). A header that cannot be read, or an extra that is missing, gives empty fields, never an
error: decoding the file is what reports a broken one.

`taken` is the wall-clock time where the photo was taken, without a timezone: EXIF's DateTimeOriginal (else
DateTimeDigitized) as the camera wrote it, and `offset` its OffsetTime tag (+HH:MM) where the file has one.
IFD0's DateTime is when the file was last changed, not when it was taken: it is not used. A video's
container usually holds UTC: Apple's local creation date is preferred where it is there, else the UTC time
is given in this machine's timezone. A file's mtime is never passed off as a capture time.
"""

import math
import os
import re
from dataclasses import dataclass, replace
from datetime import datetime
from io import BytesIO
from pathlib import Path

from PIL import Image

from ..extras import optional
from .images import heif_available
from .raw import RAW_SUFFIXES
from .video import VIDEO_SUFFIXES, container_tags, creation_time

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL = 0x010F, 0x0110
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED, _OFFSET_ORIGINAL, _OFFSET_DIGITIZED = 0x9003, 0x9004, 0x9011, 0x9012
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 1, 2, 3, 4
_OFFSET = re.compile(r"[+-]\d\d:\d\d")


@dataclass(frozen=True)
class Metadata:
    taken: datetime | None = None  # naive: the local time where it was taken
    latitude: float | None = None  # degrees, north positive
    longitude: float | None = None  # degrees, east positive
    camera: str | None = None  # "Make Model", e.g. "Canon EOS R5" (the make once)
    offset: str | None = None  # the EXIF OffsetTime of `taken`, "+02:00", where the file says

    def taken_iso(self) -> str | None:
        """`taken` in ISO 8601, with its offset where there is one: "2023-06-14T10:00:00+02:00"."""
        return None if self.taken is None else self.taken.isoformat() + (self.offset or "")


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
            return from_exif(image.getexif())
    except Exception:  # an unreadable header: decoding the file will say why
        return Metadata()


TIMES = (
    (_DATETIME_ORIGINAL, _OFFSET_ORIGINAL),
    (_DATETIME_DIGITIZED, _OFFSET_DIGITIZED),
)  # in preference order


def from_exif(exif: Image.Exif) -> Metadata:
    """From Pillow's EXIF: IFD0 (make, model), its EXIF IFD (times and their offsets) and its GPS IFD."""
    tags, gps = exif.get_ifd(_EXIF_IFD), exif.get_ifd(_GPS_IFD)
    found = _build(
        None,
        exif.get(_MAKE),
        exif.get(_MODEL),
        (gps.get(_GPS_LAT), gps.get(_GPS_LAT_REF)),
        (gps.get(_GPS_LON), gps.get(_GPS_LON_REF)),
    )
    for time_tag, offset_tag in TIMES:
        when = _exif_time(tags.get(time_tag) or exif.get(time_tag))  # some writers put it in IFD0
        if when is not None:
            zone = _text(tags.get(offset_tag))
            return replace(found, taken=when, offset=zone if _OFFSET.fullmatch(zone) else None)
    return found


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
                    found = from_exif(jpeg.getexif())
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
    if latitude is None or longitude is None or not (abs(latitude) <= 90 and abs(longitude) <= 180):
        latitude = longitude = None
    return Metadata(_exif_time(when), latitude, longitude, _camera(make, model))


def _exif_time(value) -> datetime | None:
    try:
        return datetime.strptime(_text(value)[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:  # absent (None), blank or malformed ("0000:00:00 00:00:00")
        return None


def _degrees(dms, ref, negative: str) -> float | None:
    """EXIF's (degrees, minutes, seconds) rationals (some writers give fewer) and its N/S or E/W reference as
    signed degrees."""
    try:
        parts = [float(v) for v in (dms if isinstance(dms, tuple | list) else (dms,))]
        value = sum(part / 60**i for i, part in enumerate(parts[:3]))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not parts or not math.isfinite(value):
        return None
    return -value if _text(ref).upper() == negative else value


def _camera(make, model) -> str | None:
    make, model = _text(make), _text(model)
    if make and model.lower().startswith(make.split()[0].lower()):  # "Canon" + "Canon EOS R5"
        make = ""
    return " ".join(part for part in (make, model) if part) or None


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return "" if value is None else str(value).strip("\x00 ")
