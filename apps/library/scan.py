"""Finding photos and learning what they are without running the model: the walk, the hash, the header.

The walk skips hidden folders and macOS package bundles (an app's or a Photos library's insides) unless the
user names one explicitly, follows symlinks but never into a folder it has already been in (so a link loop
ends), and yields files in sorted order, so that runs are reproducible.
"""

import hashlib
import os
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from PIL import Image

from aim_mlx.images import image_suffixes

from .db import FileFacts

# Folders macOS shows as single files: their insides are not the user's photos.
BUNDLES = {".app", ".photoslibrary", ".aplibrary", ".bundle", ".framework", ".pkg", ".plugin", ".xcassets"}
_EXIF_IFD, _DATETIME_ORIGINAL, _DATETIME = 0x8769, 36867, 306


def walk(roots: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Image files under `roots` (absolute, symlinks resolved), each once, in sorted order per root. A root
    that is a file is yielded as it is, whatever its suffix."""
    suffixes = image_suffixes()
    seen_files: set[Path] = set()
    for root in map(Path, roots):
        root = root.expanduser().resolve()
        if not root.is_dir():
            if root not in seen_files:
                seen_files.add(root)
                yield root
            continue
        visited: set[tuple[int, int]] = set()
        for folder, dirs, files in os.walk(root, followlinks=True):
            stat = os.stat(folder)
            if (stat.st_dev, stat.st_ino) in visited:  # a symlink back into the tree
                dirs[:] = []
                continue
            visited.add((stat.st_dev, stat.st_ino))
            dirs[:] = sorted(d for d in dirs if not (d.startswith(".") or Path(d).suffix.lower() in BUNDLES))
            for name in sorted(files):
                path = Path(folder, name)
                if name.startswith(".") or path.suffix.lower() not in suffixes:
                    continue
                real = path.resolve()
                if real not in seen_files and real.is_file():
                    seen_files.add(real)
                    yield real


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def facts(path: Path, stat: os.stat_result) -> FileFacts:
    """The file's hash, upright pixel size and EXIF capture time (header only: no pixels are decoded).
    Unreadable headers leave the size and time empty; the model's reading of the file reports the error."""
    found = FileFacts(str(path), stat.st_size, stat.st_mtime_ns, sha256(path))
    try:
        with Image.open(path) as image:
            exif = image.getexif()
            width, height = image.size
            if exif.get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that rotate by 90 degrees
                width, height = height, width
            found.width, found.height = width, height
            found.taken = _capture_time(exif)
    except Exception:  # a header Pillow cannot parse: decoding the file will say why
        pass
    return found


def _capture_time(exif: Image.Exif) -> str | None:
    raw = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    try:
        return datetime.strptime(str(raw).strip("\x00 "), "%Y:%m:%d %H:%M:%S").isoformat()
    except ValueError:
        return None
