"""Finding photos and videos and learning what they are without running the model: the walk, the hash, the
header.

The walk skips hidden folders and macOS package bundles (an app's or a Photos library's insides) unless the
user names one explicitly, follows symlinks but never into a folder it has already been in (so a link loop
ends), and yields files in sorted order, so that runs are reproducible.

Files that belong together are one item, named by the file that is indexed: within one folder, a RAW and a
JPEG or HEIC of the same stem (a camera's RAW+JPEG) are one photo, the JPEG indexed, the RAW its companion;
a .mov beside a HEIC or JPEG of the same stem is that Live Photo's motion, a companion, not a video of its
own. RAW files need the raw extra and videos the video extra: without them, they are passed over with one
warning naming the extra (a companion needs nothing: it is never decoded).
"""

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from aim_mlx.extras import missing, optional
from aim_mlx.inputs.images import image_suffixes
from aim_mlx.inputs.metadata import from_exif, read_metadata
from aim_mlx.inputs.raw import RAW_SUFFIXES, raw_size
from aim_mlx.inputs.video import VIDEO_SUFFIXES, video_size
from aim_mlx.log import logger

from .db import FileFacts

# Folders macOS shows as single files: their insides are not the user's photos.
BUNDLES = {".app", ".photoslibrary", ".aplibrary", ".bundle", ".framework", ".pkg", ".plugin", ".xcassets"}
# The developed image a RAW is paired with, and the still a Live Photo's .mov belongs to, in preference order
PAIRED = (".jpg", ".jpeg", ".heic", ".heif", ".hif")
LIVE_PHOTOS = (".heic", ".heif", ".jpg", ".jpeg")
_ORIENTATION = 0x0112  # EXIF, IFD0


@dataclass(frozen=True)
class Item:
    """One thing to index: a photo or a video, and the files that belong to it without being indexed."""

    path: Path
    kind: str  # "photo" or "video"
    companions: tuple[Path, ...] = ()  # a RAW+JPEG pair's RAW, a Live Photo's .mov


def items(roots: Iterable[str | os.PathLike]) -> Iterator[Item]:
    """Photos and videos under `roots` (absolute, symlinks resolved), each once, in sorted order per folder,
    pairs and Live Photos as one item (see the module's docstring). A root that is a file is an item as it is,
    whatever its suffix (a video if it has a video's suffix)."""
    suffixes = image_suffixes() | VIDEO_SUFFIXES
    skipped = {"rawpy": 0, "av": 0}  # files passed over for a missing extra
    seen: set[str] = set()
    for root in map(Path, roots):
        root = root.expanduser().resolve()
        if root.is_dir():
            for folder in _walk_folder(str(root), suffixes, seen, set()):
                yield from _group(folder, skipped)
        elif str(root) not in seen:
            seen.add(str(root))
            yield Item(root, "video" if root.suffix.lower() in VIDEO_SUFFIXES else "photo")
    for module, count in skipped.items():
        if count:
            kind = "RAW photo" if module == "rawpy" else "video"
            logger.warning("passed over %d %s%s: %s", count, kind, "" if count == 1 else "s", missing(module))


def walk(roots: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """The photos `items` finds (their indexed files), for the photo index; videos are left out."""
    return (item.path for item in items(roots) if item.kind == "photo")


def _group(files: list[Path], skipped: dict[str, int]) -> Iterator[Item]:
    """One folder's files (sorted) as items: pairs and Live Photos joined, files whose extra is missing
    counted in `skipped` and left out."""
    stems: dict[str, dict[str, Path]] = {}
    for path in files:
        stems.setdefault(path.stem.lower(), {})[path.suffix.lower()] = path
    belongs: dict[Path, list[Path]] = {}  # indexed file -> its companions
    for group in stems.values():
        raws = [p for suffix, p in group.items() if suffix in RAW_SUFFIXES]
        developed = next((group[s] for s in PAIRED if s in group), None)
        if raws and developed is not None:
            belongs.setdefault(developed, []).extend(raws)
        still = next((group[s] for s in LIVE_PHOTOS if s in group), None)
        if ".mov" in group and still is not None:
            belongs.setdefault(still, []).append(group[".mov"])
    companions = {p for found in belongs.values() for p in found}
    available = {module: optional(module) is not None for module in skipped if _needs(files, module)}
    for path in files:
        if path in companions:
            continue
        suffix = path.suffix.lower()
        kind = "video" if suffix in VIDEO_SUFFIXES else "photo"
        module = "av" if kind == "video" else "rawpy" if suffix in RAW_SUFFIXES else None
        if module is not None and not available[module]:
            skipped[module] += 1
            continue
        yield Item(path, kind, tuple(belongs.get(path, ())))


def _needs(files: list[Path], module: str) -> bool:
    suffixes = RAW_SUFFIXES if module == "rawpy" else VIDEO_SUFFIXES
    return any(p.suffix.lower() in suffixes for p in files)


def _walk_folder(folder: str, suffixes: set[str], seen: set[str], visited: set) -> Iterator[list[Path]]:
    """One folder's media files (a list, sorted), then its subfolders'. Paths are real: only symlinks are
    resolved (resolving every path cost two thirds of a re-run's walk)."""
    stat = os.stat(folder)
    if (stat.st_dev, stat.st_ino) in visited:  # a symlink back into the tree
        return
    visited.add((stat.st_dev, stat.st_ino))
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:  # a folder we may not list: its files cannot be read either
        return
    folders, files = [], []
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
            files.append(Path(path))
    if files:
        yield files
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
    return header(FileFacts(str(path), stat.st_size, stat.st_mtime_ns, sha256(path)))


def header(found: FileFacts) -> FileFacts:
    """`found` with the file's upright pixel size, capture time, GPS position and camera filled in (headers
    only: no pixels are decoded, but for a video's size, from its first frame; a RAW's and a video's through
    LibRaw or FFmpeg). The facts are inputs.metadata's: what the file does not say stays None, and the
    capture time is never the file's mtime. Unreadable headers leave everything empty; the model's reading
    of the file reports the error."""
    path = Path(found.path)
    suffix = path.suffix.lower()
    if suffix in RAW_SUFFIXES or suffix in VIDEO_SUFFIXES:  # not Pillow's
        size = raw_size(path) if suffix in RAW_SUFFIXES else video_size(path)
        meta = read_metadata(path)
    else:
        try:
            with Image.open(path) as image:
                exif = image.getexif()
                width, height = image.size
                if exif.get(_ORIENTATION) in (5, 6, 7, 8):  # EXIF orientations that rotate by 90 degrees
                    width, height = height, width
                size, meta = (width, height), from_exif(exif)
        except Exception:  # a header Pillow cannot parse: decoding the file will say why
            return found
    found.width, found.height = size or (None, None)
    found.taken, found.camera = meta.taken_iso(), meta.camera
    found.lat, found.lon = meta.latitude, meta.longitude
    return found
