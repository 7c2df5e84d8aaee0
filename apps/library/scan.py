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

from aim_mlx.inputs.images import image_suffixes

from .db import FileFacts

# Folders macOS shows as single files: their insides are not the user's photos.
BUNDLES = {".app", ".photoslibrary", ".aplibrary", ".bundle", ".framework", ".pkg", ".plugin", ".xcassets"}
_EXIF_IFD, _DATETIME_ORIGINAL, _DATETIME = 0x8769, 36867, 306


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
