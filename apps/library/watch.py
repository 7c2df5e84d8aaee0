"""`aim-mlx index --watch`: keep a library current with folders by following their filesystem events.

The first batch is an ordinary run (index.update) over the folders. Then the events watchfiles reports
(inotify, FSEvents, ReadDirectoryChangesW) are gathered into batches:
- a burst (a camera import) is one batch: a batch starts once no event has come for `debounce` seconds, or
  `max_wait` seconds after its first event, so that a stream of events that never pauses is still indexed;
- a file joins a batch only once its size and mtime have held still for `settle` seconds, so that a file
  still being copied is read once, whole;
- each batch is a run of index.update over the folders holding the changes: renamed, moved and copied
  photos reuse their vectors, deleted ones leave the library, pairs and Live Photos group as in any run.
Hidden files and folders, bundles and files of other kinds are passed over, as the walk passes them over.
The model is loaded once, by the first batch that embeds. Each batch commits as a run does: a watcher
killed at any moment leaves a valid library, which the next run (or watcher) completes.
"""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aim_mlx.errors import ConfigError
from aim_mlx.extras import require
from aim_mlx.inputs.images import image_suffixes
from aim_mlx.inputs.video import VIDEO_SUFFIXES
from aim_mlx.loading import load as load_checkpoint
from aim_mlx.tasks import distributed

from . import index
from .scan import BUNDLES


@dataclass
class Totals:
    """What a watcher did, over all its batches (the first one, the whole folders' run, included)."""

    batches: int = 0
    new: int = 0
    changed: int = 0
    embedded: int = 0
    reused: int = 0
    removed: int = 0
    failed: int = 0

    def add(self, summary: index.Summary) -> None:
        self.batches += 1
        for name in ("new", "changed", "embedded", "reused", "removed"):
            setattr(self, name, getattr(self, name) + getattr(summary, name))
        self.failed += len(summary.failed)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C while watching: `totals` says what the finished batches did, `done` how many files the batch
    under way had finished (kept in the library)."""

    def __init__(self, totals: Totals, done: int):
        super().__init__(done)
        self.totals, self.done = totals, done


@dataclass
class _Pending:
    """A changed path waiting for its batch: its (size, mtime) when last looked at (None: not a file)."""

    key: tuple | None
    since: float  # when it last changed (an event, or a new size or mtime)
    first: float  # when its first event came


def watch(
    roots: list[str | os.PathLike],
    db_path: str | os.PathLike,
    model: str,
    revision: str | None = None,
    dtype: str | None = None,
    batch_size: int = 8,
    debounce: float = 1.0,
    settle: float = 1.0,
    max_wait: float = 30.0,
    on_batch: Callable[[index.Summary, list[Path]], None] | None = None,
    stop_event=None,
    load: Callable | None = None,
) -> Totals:
    """Index the folders `roots` into the library at `db_path` (as index.update, whose arguments the first
    six are), then follow their changes until `stop_event` (anything with `is_set()`) is set or a Ctrl-C.
    `on_batch(summary, folders)` is called after each batch with its index.Summary and the folders it
    re-ran (the roots for the first). Returns the Totals when stopped; a Ctrl-C raises Interrupted."""
    watchfiles = require("watchfiles")
    if distributed.world() is not None:
        raise ConfigError("--watch runs in one process; start it without mlx.launch")
    index.check_roots(roots)
    roots = [Path(r).expanduser().resolve() for r in roots]
    for root in roots:
        if not root.is_dir():
            raise ConfigError(f"{root}: --watch follows folders; name the folder that holds it")
    loaded: list = []
    load = load or load_checkpoint

    def load_once(*args, **kwargs):  # one model for every batch
        if not loaded:
            loaded.append(load(*args, **kwargs))
        return loaded[0]

    totals = Totals()
    ignored = {
        str(Path(f"{Path(db_path).expanduser().resolve()}{end}")) for end in ("", "-wal", "-shm", "-journal")
    }
    pending: dict[Path, _Pending] = {}
    last_event = 0.0
    poll = max(0.02, min(debounce, settle) / 4)

    def run(folders: list[Path]) -> None:
        try:
            summary = index.update(folders, db_path, model, revision, dtype, batch_size, load=load_once)
        except index.Interrupted as exc:
            raise Interrupted(totals, exc.done) from None
        totals.add(summary)
        if on_batch:
            on_batch(summary, folders)

    events = watchfiles.watch(
        *roots,
        watch_filter=None,
        debounce=int(poll * 1000),
        step=min(50, int(poll * 1000)),
        rust_timeout=int(poll * 1000),
        yield_on_timeout=True,
        stop_event=stop_event,
    )
    try:
        started = False
        for changes in events:  # the watcher is started by the first step: no change is missed after it
            if not started:
                run(roots)
                started = True
            now = time.monotonic()
            for _, name in changes:
                path = Path(name)
                if name in ignored or not _wanted(path, roots):
                    continue
                last_event = now
                entry = pending.setdefault(path, _Pending(None, now, now))
                entry.since = now
            ready = _settled(pending, now, settle)
            quiet = now - last_event >= debounce
            overdue = any(now - pending[p].first >= max_wait for p in ready)
            if ready and (quiet or overdue):
                for path in ready:
                    del pending[path]
                run(_folders(ready, roots))
            if stop_event is not None and stop_event.is_set():
                break
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(totals, 0) from None
    finally:
        events.close()
    return totals


def _wanted(path: Path, roots: list[Path]) -> bool:
    """Whether a change at `path` can matter to the library: under a root, outside hidden folders and
    bundles, and (if it is a file) a photo or video, or gone (a photo or a folder deleted or moved away)."""
    root = next((r for r in roots if path.is_relative_to(r)), None)
    if root is None or path == root:
        return False
    parts = path.relative_to(root).parts
    if any(p.startswith(".") or os.path.splitext(p)[1].lower() in BUNDLES for p in parts):
        return False
    suffix = path.suffix.lower()
    media = suffix in image_suffixes() or suffix in VIDEO_SUFFIXES
    if path.is_dir():
        return True
    return media or (not path.exists() and not suffix)  # a deletion: a photo's, or a folder's


def _settled(pending: dict[Path, _Pending], now: float, settle: float) -> list[Path]:
    """The pending paths whose size and mtime (or absence) have not changed for `settle` seconds."""
    ready = []
    for path, entry in pending.items():
        try:
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            key = None
        if key != entry.key:
            entry.key, entry.since = key, now
        elif now - entry.since >= settle:
            ready.append(path)
    return ready


def _folders(paths: list[Path], roots: list[Path]) -> list[Path]:
    """The folders a batch re-runs: each path's folder (a folder, itself), or the nearest one left of it
    once deleted; none inside another."""
    found = set()
    for path in paths:
        folder = path if path.is_dir() else path.parent
        root = next(r for r in roots if path.is_relative_to(r))
        while folder != root and not folder.is_dir():
            folder = folder.parent
        found.add(folder)
    return [f for f in sorted(found) if not any(f != g and f.is_relative_to(g) for g in found)]
