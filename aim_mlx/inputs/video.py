"""Videos through PyAV (FFmpeg in the wheel; the `video` extra): a few frames that show what a video holds,
each with its time, and the container's creation time.

Frames are chosen cheaply. Encoders start a new keyframe at a scene cut, so the keyframes alone (decoded
without the frames between them) are the candidates; a stream with a single keyframe (some WebM, screen
recordings) is decoded once, through, and sampled every `min_gap` seconds instead. A scene that starts
between two keyframes is seen at the next one. A candidate is kept when it differs from every frame kept so
far (the mean absolute difference of 32x32 grey thumbnails, 0-1, over `threshold`) and comes `min_gap`
seconds or more after the last; past `max_frames`, the first frame and the biggest changes are kept, with no
more than that many frames held at once.

A chosen frame is named `clip.mp4#t=12.480` (the W3C media-fragment form): `load_image` reads such a name
back by seeking to that time, so frames travel through the embedding pipeline, its output files and its
ranks as paths do.
"""

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import AimMlxError, ImageError
from ..extras import require

VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".mkv", ".webm"}
MAX_FRAMES = 8
MIN_GAP = 1.0  # seconds between frames kept
THRESHOLD = 0.1  # the change that makes a new scene: mean absolute difference of grey thumbnails, 0-1
_FRAGMENT = re.compile(r"^(?P<file>.+)#t=(?P<time>\d+(?:\.\d+)?)$")


@dataclass
class Frame:
    time: float  # seconds from the start of the video stream
    image: Image.Image  # upright RGB


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def frame_name(path: str | os.PathLike, time: float) -> Path:
    """The name of the frame of `path` at `time` seconds: `clip.mp4#t=1.000`."""
    return Path(f"{path}#t={time:.3f}")


def parse_frame_name(path: str | os.PathLike) -> tuple[Path, float] | None:
    """(video, seconds) for a frame's name; None for anything else, including an existing file so named."""
    match = _FRAGMENT.match(str(path))
    if match is None or not is_video(match["file"]) or Path(path).exists():
        return None
    return Path(match["file"]), float(match["time"])


def av_module(name: str):
    """PyAV, or an ImageError naming the file and the extra (so that a batch skips the file and goes on)."""
    try:
        return require("av", "video")
    except AimMlxError as exc:
        raise ImageError(f"{name}: reading videos needs PyAV; {exc}") from None


def video_frames(
    path: str | os.PathLike,
    max_frames: int = MAX_FRAMES,
    min_gap: float = MIN_GAP,
    threshold: float = THRESHOLD,
) -> list[Frame]:
    """A few frames of the video at `path`, in time order, one per scene (see the module's docstring). Raises
    ImageError for a file FFmpeg cannot read, one without a video stream, or one with no decodable frame."""
    return [Frame(when, _upright(frame)) for when, frame in _chosen(path, max_frames, min_gap, threshold)]


def frame_times(path: str | os.PathLike, max_frames: int = MAX_FRAMES) -> list[float]:
    """The times of the frames video_frames chooses, without turning their pixels into images (for a caller
    that reads each frame later by its name); raises ImageError as video_frames does."""
    return [when for when, _ in _chosen(path, max_frames, MIN_GAP, THRESHOLD)]


def _chosen(path, max_frames: int, min_gap: float, threshold: float) -> list[tuple[float, object]]:
    if max_frames < 1:
        raise ImageError(f"max_frames must be at least 1, got {max_frames}")
    name = str(path)
    av = av_module(name)
    try:
        with av.open(name) as container:
            stream = _video_stream(container, name)
            keyframes = (c for c in _decoded(av, container, stream, keyframes_only=True) if c[1].key_frame)
            kept, seen = _choose(keyframes, max_frames, min_gap, threshold)
            if seen < 2 and _duration(container, stream) > 2 * min_gap:
                container.seek(0)
                kept, _ = _choose(_every(av, container, stream, min_gap), max_frames, min_gap, threshold)
    except av.FFmpegError as exc:
        raise ImageError(f"{name}: not a video FFmpeg can read ({exc})") from None
    if not kept:
        raise ImageError(f"{name}: no frame of the video could be decoded")
    return [(when, frame) for when, frame, _ in kept]


def read_frame(path: str | os.PathLike, time: float = 0.0) -> Image.Image:
    """The frame shown at `time` seconds (the first one at or after it), upright: a seek to the keyframe
    before it, then a decode up to it."""
    name = str(path)
    av = av_module(name)
    try:
        with av.open(name) as container:
            stream = _video_stream(container, name)
            start = stream.start_time or 0
            if time > 0:
                container.seek(start + int(time / stream.time_base), stream=stream, backward=True)
            last = None
            for when, frame in _decoded(av, container, stream):
                last = frame
                if when >= time - 1e-3:
                    return _upright(frame)
            if last is None:
                raise ImageError(f"{name}: no frame of the video could be decoded")
            return _upright(last)  # past the end: its last frame
    except av.FFmpegError as exc:
        raise ImageError(f"{name}: not a video FFmpeg can read ({exc})") from None


def video_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """The video's upright (width, height), from its first frame (one decode); None when PyAV is missing or
    no frame can be read."""
    try:
        image = read_frame(path)
    except ImageError:
        return None
    return image.size


def expand_videos(paths: Iterable[Path], max_frames: int = MAX_FRAMES) -> Iterator[Path]:
    """`paths` with each video replaced by its chosen frames' names (`clip.mp4#t=1.000`, ...). A video that
    cannot be read stays as it is, so that reading it reports why next to the other files' failures."""
    for path in paths:
        if not is_video(path):
            yield path
            continue
        try:
            times = frame_times(path, max_frames)
        except ImageError:
            yield path
            continue
        yield from (frame_name(path, when) for when in times)


def container_tags(path: str | os.PathLike) -> dict[str, str]:
    """The container's metadata tags, with the video stream's under them (creation_time, Apple's
    com.apple.quicktime.* keys, ...); empty when the file cannot be opened or PyAV is missing."""
    try:
        av = require("av", "video")
        with av.open(str(path)) as container:
            streams = container.streams.video
            return {**(streams[0].metadata if streams else {}), **container.metadata}
    except Exception:  # an unreadable header: decoding the file will say why
        return {}


def creation_time(tags: dict[str, str] | str | os.PathLike) -> datetime | None:
    """When the video was recorded, timezone-aware, from its tags (or its file's): Apple's local
    com.apple.quicktime.creationdate where there is one, else the container's creation_time (UTC). None when
    neither is there or the value is a muxer's zero date."""
    if not isinstance(tags, dict):
        tags = container_tags(tags)
    for key in ("com.apple.quicktime.creationdate", "creation_time"):
        try:
            when = datetime.fromisoformat(tags[key].strip())
        except (KeyError, ValueError):
            continue
        if when.year > 1970:  # muxers write 1970 or 1904 for "unknown"
            return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)  # FFmpeg's is UTC
    return None


def _video_stream(container, name: str):
    if not container.streams.video:
        raise ImageError(f"{name}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _duration(container, stream) -> float:
    if stream.duration is not None:
        return float(stream.duration * stream.time_base)
    return (container.duration or 0) / 1_000_000  # AV_TIME_BASE


def _decoded(av, container, stream, keyframes_only: bool = False):
    """(seconds from the stream's start, frame) for each frame decoded; packets FFmpeg cannot decode are
    passed over (a damaged stretch loses its frames, not the video)."""
    start = stream.start_time or 0
    for packet in container.demux(stream):
        if keyframes_only and not packet.is_keyframe and packet.size:
            continue
        try:
            frames = packet.decode()
        except av.FFmpegError:
            continue
        for frame in frames:
            if frame.pts is not None:
                yield float((frame.pts - start) * stream.time_base), frame


def _every(av, container, stream, step: float) -> Iterator[tuple[float, object]]:
    """One decoded frame every `step` seconds, the first at or after each multiple."""
    due = 0.0
    for when, frame in _decoded(av, container, stream):
        if when >= due - 1e-3:
            yield when, frame
            due = when + step


def _choose(candidates, max_frames: int, min_gap: float, threshold: float) -> tuple[list, int]:
    """The candidates (seconds, frame) kept, as (seconds, frame, change), and how many there were. A
    candidate's change is its distance to the nearest frame kept before it, so a scene that comes back (a
    cut back and forth) is not kept twice. Holds at most `max_frames` + 1 frames however long the video:
    past the cap, the smallest change goes."""
    kept: list[tuple[float, object, float]] = []
    signatures: list[np.ndarray] = []  # of every candidate kept so far, dropped ones too: 4 KB each
    last = -float("inf")  # when the last one was kept
    seen = 0
    for when, frame in candidates:
        seen += 1
        signature = frame.to_ndarray(format="gray", width=32, height=32).astype(np.float32) / 255  # (32, 32)
        change = min((float(np.abs(signature - s).mean()) for s in signatures), default=float("inf"))
        if change <= threshold or when - last < min_gap - 1e-3:
            continue
        signatures.append(signature)
        last = when
        kept.append((when, frame, change))
        if len(kept) > max_frames:  # the first frame stays (its change is infinite)
            del kept[min(range(len(kept)), key=lambda i: kept[i][2])]
    return kept, seen


def _upright(frame) -> Image.Image:
    """The frame in RGB, turned as its display matrix says (a phone's portrait video is stored sideways)."""
    image = frame.to_image()  # RGB
    rotation = getattr(frame, "rotation", 0) or 0  # degrees counter-clockwise, as Pillow's rotate takes them
    return image.rotate(rotation, expand=True) if rotation % 360 else image
