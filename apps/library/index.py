"""`aim-mlx index`: bring a library database up to date with folders of photos.

`update` is the whole run (`dry_run` says what it would do); `plan` and `index` are its two steps. A run
walks the folders and compares each file with the database (path, size, mtime):
- unchanged: not opened, unless an older aim-mlx read its header: then the header alone is read again
  (capture time, place, camera), with no hash and no model;
- new or changed: hashed (and its header read) on worker threads; a hash the model has already embedded
  (a rename, a move, a copy, an edit undone) reuses that vector; any other is embedded through
  aim_mlx.tasks.embed.iter_embeddings, which decodes ahead on its own threads while the model runs;
- gone (under a folder walked, but not found): removed, with vectors no file uses any more.
A video (with the video extra) is a file as a photo is, whose vectors are a few frames' (inputs/video.py's
frame_times, MAX_FRAMES at most): the frames chosen are embedded by their names (`clip.mp4#t=1.000`), and
the video is recorded with all of them at once; a renamed or copied video reuses the frames already known.
Writes are committed a batch at a time, each file with its vector in one transaction: a run killed at any
moment leaves a valid database holding every batch committed, and the next run does the rest. Started by
`mlx.launch`, rank 0 alone reads and writes the library; the other ranks embed shares of its images.
"""

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from aim_mlx.errors import ConfigError, ImageError
from aim_mlx.inputs.video import MAX_FRAMES, frame_name, frame_times
from aim_mlx.loading import default_dtype, origin
from aim_mlx.loading import load as load_checkpoint
from aim_mlx.tasks import distributed
from aim_mlx.tasks.embed import iter_embeddings

from .db import FACTS_VERSION, FileFacts, Library, frame_hash
from .scan import facts, header, items


@dataclass
class Plan:
    """What a run would do, from the walk and the database alone (nothing opened)."""

    todo: list[tuple[Path, os.stat_result, str]] = field(default_factory=list)  # (path, stat, new|changed)
    videos: list[tuple[Path, os.stat_result, str]] = field(default_factory=list)  # ... of the videos
    unchanged: int = 0
    stale: list[Path] = field(default_factory=list)  # unchanged, their header read by an older aim-mlx
    gone: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): named but unreadable

    def counts(self) -> dict:
        kinds = [kind for _, _, kind in self.todo + self.videos]
        return {
            "new": kinds.count("new"),
            "changed": kinds.count("changed"),
            "unchanged": self.unchanged,
            "removed": len(self.gone),
            "refresh": len(self.stale),
        }


@dataclass
class Summary:
    model: str = ""  # the checkpoint's hub id or folder
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    embedded: int = 0  # of new + changed, how many ran through the model
    reused: int = 0  # ... and how many reused a known vector (same content)
    removed: int = 0
    refreshed: int = 0  # unchanged files whose header facts were read again
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def to_dict(self) -> dict:
        fields = ("new", "changed", "unchanged", "embedded", "reused", "removed", "refreshed")
        failed = [{"path": p, "error": e} for p, e in self.failed]
        return {**{k: getattr(self, k) for k in fields}, "failed": failed}


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C during `update`'s run: the library keeps the `done` files finished."""

    def __init__(self, done: int):
        super().__init__(done)
        self.done = done


def update(
    roots: list[str | os.PathLike],
    db_path: str | os.PathLike,
    model: str,
    revision: str | None = None,
    dtype: str | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    load: Callable | None = None,
) -> Summary | None:
    """Bring the library at `db_path` up to date with `roots` (folders or image files) for the checkpoint
    `model` (hub id or folder) in `dtype` (default: loading.default_dtype()).

    A run with nothing to do loads no model: the checkpoint is recognised from its files and config. Else it
    is loaded with `load` (aim_mlx.load's signature; default aim_mlx.load), and the files are sorted again
    should its identity not be the one expected. `progress(files done, in all)` is called once the run
    starts (the unchanged files count as done), then after each file read. Returns the Summary, or None on
    a rank other than 0 of an `mlx.launch` job, which embeds shares of rank 0's images and touches no file.
    A Ctrl-C in the run raises Interrupted, a lost rank RankLost, each saying how many files were kept."""
    load = load or load_checkpoint

    def load_model():
        return load(model, revision=revision, dtype=dtype)

    if distributed.follow(load_model):
        return None
    check_roots(roots)
    found = origin(model, revision)
    with Library(db_path) as library:  # a re-run with nothing to do loads no model
        known = known_model(library, found, dtype or default_dtype())
        todo = plan(library, known, roots) if known is not None else None
    nothing = todo is not None and not (todo.todo or todo.videos or todo.gone or todo.missing)
    group = distributed.world()
    if group is not None:
        distributed.start(group, None if nothing else {"batch_size": batch_size, "pool": "mean"})
    if nothing:
        summary = Summary(model=found.source, unchanged=todo.unchanged)
        if todo.stale:
            with Library(db_path) as library:
                summary.refreshed = refresh(library, known, todo.stale)
        return summary
    net, processor = load_model()
    with Library(db_path) as library:
        model_id = library.model_id(net.info)
        if model_id != known:
            todo = plan(library, model_id, roots)
        total = len(todo.todo) + len(todo.videos) + todo.unchanged + len(todo.missing)
        done = 0

        def on_file(kind: str) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(todo.unchanged + done, total)

        if progress:
            progress(todo.unchanged, total)
        try:
            summary = index(library, net, processor, roots, batch_size, on_file, todo, group)
        except KeyboardInterrupt:
            raise Interrupted(done) from None
        except distributed.RankLost as exc:
            raise distributed.RankLost(
                f"{exc}; the library keeps the {_files(done)} finished; run the command again to finish"
            ) from None
    summary.model = net.info.source
    return summary


def dry_run(roots: list[str | os.PathLike], db_path: str | os.PathLike, model: str) -> Plan | None:
    """What `update` would do, without loading the model or creating the library: files are compared with
    the library's index for `model` (matched by hub id or folder alone: recognising the exact checkpoint
    could mean downloading it), or all new when it has none. None on a rank other than 0 of a job."""
    if distributed.follow(None):
        return None
    check_roots(roots)
    if Path(db_path).exists():
        with Library.reader(db_path, migrate=False) as library:  # a dry run writes nothing
            folder = Path(model).expanduser()
            source = str(folder.resolve()) if folder.is_dir() else model
            ids = [m["id"] for m in library.models() if m["info"]["source"] == source]
            if ids:
                return plan(library, ids[-1], roots)
    found = list(items(roots))  # no index for this model yet
    return Plan(
        todo=[(i.path, None, "new") for i in found if i.kind == "photo"],
        videos=[(i.path, None, "new") for i in found if i.kind == "video"],
    )


def check_roots(roots) -> None:
    if not roots:
        raise ConfigError("no folders given; pass the folders (or image files) to index")
    for root in roots:
        if not Path(root).expanduser().exists():
            raise ConfigError(f"{root}: no such file or folder")


def _files(count: int) -> str:
    return f"{count} file" + ("" if count == 1 else "s")


def plan(library: Library, model_id: int, roots: Iterable[str | os.PathLike]) -> Plan:
    """Walk `roots` and sort every photo and video into unchanged, new or changed; list indexed files gone
    (a video's frames are not files: they come and go with it)."""
    roots = [Path(r).expanduser().resolve() for r in roots]
    known = library.known_files(model_id)
    hashes = library.known_hashes(model_id)
    result = Plan()
    seen = set()
    for item in items(roots):
        path = item.path
        seen.add(str(path))
        try:
            stat = path.stat()
        except OSError as exc:
            result.missing.append((str(path), f"{path}: {exc.strerror or exc}"))
            continue
        row = known.get(str(path))
        todo = result.videos if item.kind == "video" else result.todo
        if row is None:
            todo.append((path, stat, "new"))
        # a video's row has no vector of its own, and exists only with its frames'
        elif row[:2] == (stat.st_size, stat.st_mtime_ns) and (row[2] in hashes or item.kind == "video"):
            result.unchanged += 1
            if row[3] < FACTS_VERSION:
                result.stale.append(path)
        else:
            todo.append((path, stat, "changed"))
    for path in known:
        if path not in seen and _under(path, roots):
            result.gone.append(path)
    return result


def known_model(library: Library, found, dtype: str) -> int | None:
    """The library's id for the checkpoint `found` (a loading.Origin) in `dtype`, recognised without loading
    its weights (same source, revision, files and config), or None. A re-run with nothing to do needs no
    model at all."""
    for entry in library.models():
        info = entry["info"]
        same = (info["source"], info["revision"], info["dtype"]) == (found.source, found.revision, dtype)
        if same and found.info(info["dims"], dtype).key == entry["key"]:
            return entry["id"]
    return None


def _under(path: str, roots: list[Path]) -> bool:
    return any(path == str(r) or path.startswith(str(r).rstrip(os.sep) + os.sep) for r in roots)


def index(
    library: Library,
    model,
    processor,
    roots: Iterable[str | os.PathLike],
    batch_size: int = 8,
    on_file: Callable[[str], None] | None = None,
    todo: Plan | None = None,
    group=None,
) -> Summary:
    """Index `roots` with `model` (loaded by aim_mlx.load) into `library`. `on_file(kind)` is called once per
    file read: "embedded", "reused" or "failed" (unchanged files are not read). `todo`: a plan made already
    (see `plan`). `group`: an `mx.distributed` group whose other ranks embed shares of the images
    (aim_mlx.tasks.distributed.work); this process (rank 0) alone reads the library, hashes and writes."""
    model_id = library.model_id(model.info)
    todo = todo or plan(library, model_id, roots)
    counts = todo.counts()
    summary = Summary(new=counts["new"], changed=counts["changed"], unchanged=todo.unchanged)
    hashes = library.known_hashes(model_id)
    writes: list[tuple[FileFacts, object]] = []  # (facts, vector or None: reuse) waiting for a commit
    videos: list[tuple[FileFacts, list]] = []  # (facts, [(seconds, vector or None)]) waiting for a commit
    frame_of: dict[str, dict] = {}  # a frame's name -> its video being embedded (see to_embed)
    failures: list[tuple[str, str, int | None, int | None]] = []
    waiting: dict[str, list[FileFacts]] = {}  # a hash being embedded -> files with the same content
    facts_of: dict[str, FileFacts] = {}

    def done(kind: str) -> None:
        if on_file:
            on_file(kind)

    def commit() -> None:
        with library.transaction():
            for item, vector in writes:
                library.put(model_id, item, vector)
            for item, frames in videos:
                library.put_video(model_id, item, frames)
            for path, reason, size, mtime in failures:
                library.fail(path, reason, size, mtime)
        writes.clear()
        videos.clear()
        failures.clear()

    def fail(path: str, reason: str, size=None, mtime=None) -> None:
        failures.append((path, reason, size, mtime))
        summary.failed.append((path, reason))
        done("failed")

    def to_embed() -> Iterator[Path]:
        """The files the model must see, hashed ahead on threads; the others are recorded on the way."""
        for (path, stat, _), found in _hashed(todo.todo):
            if isinstance(found, str):
                fail(str(path), found, stat.st_size, stat.st_mtime_ns)
            elif found.hash in hashes:
                writes.append((found, None))
                summary.reused += 1
                done("reused")
            elif found.hash in waiting:
                waiting[found.hash].append(found)
            else:
                waiting[found.hash] = []
                facts_of[str(path)] = found
                yield path
        for (path, stat, _), found in _hashed(todo.videos):
            if isinstance(found, str):
                fail(str(path), found, stat.st_size, stat.st_mtime_ns)
                continue
            known = library.frames(model_id, found.hash)  # a copy or a rename of a video indexed already
            if known and all(frame_hash(found.hash, t) in hashes for t in known):
                videos.append((found, [(t, None) for t in known]))
                summary.reused += 1
                done("reused")
                continue
            try:
                times = sorted({round(t, 3) for t in frame_times(path, MAX_FRAMES)})
            except ImageError as exc:
                fail(str(path), str(exc), stat.st_size, stat.st_mtime_ns)
                continue
            entry = {"facts": found, "frames": [], "left": len(times), "error": None}
            for t in times:
                name = frame_name(path, t)
                frame_of[str(name)] = entry
                yield name

    def frame_done(item) -> None:
        """A frame embedded: its video is recorded once all its frames are."""
        entry = frame_of.pop(str(item.path))
        if item.error is not None:
            entry["error"] = entry["error"] or item.error
        else:
            entry["frames"].append((float(str(item.path).rsplit("#t=", 1)[1]), item.embedding))
        entry["left"] -= 1
        if entry["left"]:
            return
        found = entry["facts"]
        if entry["error"] is not None:
            fail(found.path, entry["error"], found.size, found.mtime_ns)
            return
        videos.append((found, entry["frames"]))
        hashes.update(frame_hash(found.hash, t) for t, _ in entry["frames"])
        summary.embedded += 1
        done("embedded")

    try:
        for path, reason in todo.missing:
            fail(path, reason)
        if group is None:
            results = iter_embeddings(model, processor, to_embed(), batch_size)
        else:
            results = distributed.embeddings(group, model, processor, to_embed(), batch_size)
        for item in results:
            if str(item.path) in frame_of:
                frame_done(item)
                if len(writes) + len(videos) >= batch_size:
                    commit()
                continue
            found = facts_of.pop(str(item.path))
            same = waiting.pop(found.hash)
            if item.error is not None:
                for f in (found, *same):
                    fail(f.path, item.error if f is found else f"{f.path}: {item.error}", f.size, f.mtime_ns)
                continue
            writes.append((found, item.embedding))
            hashes.add(found.hash)
            summary.embedded += 1
            done("embedded")
            for f in same:
                writes.append((f, None))
                summary.reused += 1
                done("reused")
            if len(writes) + len(videos) >= batch_size:
                commit()
        commit()
    except (KeyboardInterrupt, distributed.RankLost):
        commit()  # what is finished is kept; the next run does the rest
        raise
    if todo.gone:
        library.remove(model_id, todo.gone)
        summary.removed = len(todo.gone)
    library.prune(model_id)
    summary.refreshed = refresh(library, model_id, todo.stale)
    return summary


def refresh(library: Library, model_id: int, paths: list[Path], batch: int = 256) -> int:
    """Read the headers of unchanged files again (their hash and vector stay) and record what they say,
    `batch` files a transaction, so that a run killed here keeps what it did. Returns how many were read."""

    def read(path: Path) -> FileFacts:
        return header(FileFacts(str(path), 0, 0, ""))  # only the path is read; refresh writes no size or hash

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), batch):
            found = list(pool.map(read, paths[start : start + batch]))
            with library.transaction():
                for item in found:
                    library.refresh(model_id, item)
    return len(paths)


def _hashed(todo: list, workers: int = 4, lookahead: int = 32):
    """((path, stat, kind), FileFacts or a one-line error) in order, hashed on threads ahead of the
    consumer."""
    items = iter(todo)
    with ThreadPoolExecutor(max_workers=min(workers, os.cpu_count() or 1)) as pool:
        pending = deque((item, pool.submit(_facts, item)) for item in islice(items, lookahead))
        try:
            while pending:
                item, future = pending.popleft()
                for nxt in islice(items, 1):
                    pending.append((nxt, pool.submit(_facts, nxt)))
                yield item, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _facts(item) -> FileFacts | str:
    path, stat, _ = item
    try:
        return facts(path, stat)
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror or exc})"
