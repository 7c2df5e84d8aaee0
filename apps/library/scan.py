"""Finding photos and learning what they are without running the model: the walk, the hash, the header.

The walk skips hidden folders and macOS package bundles (an app's or a Photos library's insides) unless the
user names one explicitly, follows symlinks but never into a folder it has already been in (so a link loop
ends), and yields files in sorted order, so that runs are reproducible.
"""

import hashlib
import math
import os
import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from PIL import Image

from aim_mlx.inputs.images import image_suffixes

from .db import FileFacts

# Folders macOS shows as single files: their insides are not the user's photos.
BUNDLES = {".app", ".photoslibrary", ".aplibrary", ".bundle", ".framework", ".pkg", ".plugin", ".xcassets"}
# EXIF tags: IFD0's orientation, make, model and the two sub-IFDs; the Exif IFD's times; the GPS IFD's
# position (1 LatitudeRef, 2 Latitude, 3 LongitudeRef, 4 Longitude).
_ORIENTATION, _MAKE, _MODEL, _EXIF_IFD, _GPS_IFD = 0x0112, 0x010F, 0x0110, 0x8769, 0x8825
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED, _OFFSET_ORIGINAL, _OFFSET_DIGITIZED = 0x9003, 0x9004, 0x9011, 0x9012
_OFFSET = re.compile(r"[+-]\d\d:\d\d")


def walk(roots: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Image files under `roots` (absolute, symlinks resolved), each once, in sorted order per root. A root
    that is a file is yielded as it is, whatever its suffix."""
    suffixes = image_suffixes()
    seen: set[str] = set()
    for root in map(Path, roots):
        root = root.expanduser().resolve()
        if root.is_dir():
            yield from _walk_folder(str(root), suffixes, seen, set())
        elif str(root) not in seen:
            seen.add(str(root))
            yield root


def _walk_folder(folder: str, suffixes: set[str], seen: set[str], visited: set) -> Iterator[Path]:
    """One folder's image files, then its subfolders'. Paths are real: only symlinks are resolved (resolving
    every path cost two thirds of a re-run's walk)."""
    stat = os.stat(folder)
    if (stat.st_dev, stat.st_ino) in visited:  # a symlink back into the tree
        return
    visited.add((stat.st_dev, stat.st_ino))
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:  # a folder we may not list: its files cannot be read either
        return
    folders = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                if os.path.splitext(entry.name)[1].lower() not in BUNDLES:
                    folders.append(entry)
                continue
            if not entry.is_file() or os.path.splitext(entry.name)[1].lower() not in suffixes:
                continue
        except OSError:
            continue
        path = os.path.realpath(entry.path) if entry.is_symlink() else entry.path
        if path not in seen:
            seen.add(path)
            yield Path(path)
    for entry in folders:
        yield from _walk_folder(
            os.path.realpath(entry.path) if entry.is_symlink() else entry.path, suffixes, seen, visited
        )


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def facts(path: Path, stat: os.stat_result) -> FileFacts:
    """The file's hash and what its header says (see `header`)."""
    found = FileFacts(str(path), stat.st_size, stat.st_mtime_ns, sha256(path))
    return header(found)


def header(found: FileFacts) -> FileFacts:
    """`found` with the file's upright pixel size, EXIF capture time, GPS position and camera filled in
    (header only: no pixels are decoded). What the file does not say stays None: the capture time is never
    the file's mtime. Unreadable headers leave everything empty; the model's reading of the file reports
    the error."""
    try:
        with Image.open(found.path) as image:
            exif = image.getexif()
            width, height = image.size
            if exif.get(_ORIENTATION) in (5, 6, 7, 8):  # EXIF orientations that rotate by 90 degrees
                width, height = height, width
            found.width, found.height = width, height
            found.taken = capture_time(exif)
            found.lat, found.lon = position(exif)
            found.camera = camera(exif)
    except Exception:  # a header Pillow cannot parse: decoding the file will say why
        pass
    return found


def capture_time(exif: Image.Exif) -> str | None:
    """DateTimeOriginal, else DateTimeDigitized, as ISO 8601 local time, with the matching OffsetTime tag's
    +HH:MM when there is one. (IFD0's DateTime is when the file was last changed, not when it was taken.)"""
    tags = exif.get_ifd(_EXIF_IFD)
    for when, offset in ((_DATETIME_ORIGINAL, _OFFSET_ORIGINAL), (_DATETIME_DIGITIZED, _OFFSET_DIGITIZED)):
        try:
            taken = datetime.strptime(_text(tags.get(when))[:19], "%Y:%m:%d %H:%M:%S").isoformat()
        except ValueError:  # absent, blank ("    :  :  ") or zero ("0000:00:00 ...")
            continue
        zone = _text(tags.get(offset))
        return taken + zone if _OFFSET.fullmatch(zone) else taken
    return None


def position(exif: Image.Exif) -> tuple[float | None, float | None]:
    """The GPS IFD's latitude and longitude in decimal degrees (south and west negative), or (None, None)."""
    gps = exif.get_ifd(_GPS_IFD)
    try:
        lat = _degrees(gps[2]) * (-1 if _text(gps.get(1)).upper() == "S" else 1)
        lon = _degrees(gps[4]) * (-1 if _text(gps.get(3)).upper() == "W" else 1)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None, None
    if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
        return None, None
    return lat, lon


def camera(exif: Image.Exif) -> str | None:
    """Make and Model, the make left out when the model already starts with it ("Canon Canon EOS R5")."""
    make, model = _text(exif.get(_MAKE)), _text(exif.get(_MODEL))
    if make and model.lower().startswith(make.lower()):
        make = ""
    return " ".join(part for part in (make, model) if part) or None


def _degrees(value) -> float:
    """Degrees from EXIF's (degrees, minutes, seconds) rationals (some writers give one number)."""
    parts = [float(v) for v in (value if isinstance(value, tuple | list) else (value,))]
    return sum(part / 60**i for i, part in enumerate(parts[:3]))


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return "" if value is None else str(value).strip("\x00 ")
