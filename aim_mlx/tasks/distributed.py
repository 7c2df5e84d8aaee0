"""Data-parallel embedding across the ranks of an `mx.distributed` job (what `mlx.launch` starts).

One process, no launcher: `world()` is None, `follow` returns False and `embed_files` is embed_images.
Under a launcher with several ranks, rank 0 owns the input and the output; every other rank calls `follow`,
which does its part of rank 0's job; every rank, rank 0 included, embeds a share of the images:

1. Rank 0 takes the inputs a chunk at a time (CHUNK_BATCHES batches per rank) and sends the chunk's paths and
   sizes to every rank (`broadcast`: an all_sum to which the others add zeros).
2. Every rank computes the same assignment from the chunk alone (`assign`: whole batches, the biggest in bytes
   first, each to the rank with the fewest bytes so far), so a re-run of the same work gives each rank the
   same files, and a batch holds the same images as in one process (the same results, to the bit). Each rank
   embeds its share with `iter_embeddings` (decoding ahead, batches in flight).
3. In rounds of one batch per rank, each rank's results (input positions, vectors, error lines) are gathered
   (`all_gather`); rank 0 yields them in input order as they complete. Rank 0 alone writes anything.

Every rank reads the images itself from the same path: the files must be on a volume every host mounts at the
same place (a network share, or copies at the same path). A file another rank cannot read comes back as that
file's error, naming the rank and host. A rank that dies ends the job: the collectives of the others fail
(RankLost); `mlx.launch` also terminates the survivors, which SIGTERM turns into RankLost as well.
"""

import functools
import json
import os
import signal
import socket
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import AimMlxError, ConfigError
from .embed import NATIVE_TOKENS, Embedded, EmbedResult, collect, counting, iter_embeddings

CHUNK_BATCHES = 16  # batches per rank in a chunk: the unit of assignment
ERROR_BYTES = 512  # an error line's room in a gathered row (longer ones are cut)


class RankLost(AimMlxError):
    """Another rank of the job exited or lost its connection; this one cannot go on."""


def world():
    """The `mx.distributed` group of a job started with more than one rank, or None (one process). In a job,
    SIGTERM raises RankLost from then on."""
    launched = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_JACCL_COORDINATOR")
    if not any(name in os.environ for name in launched):  # not under a launcher: nothing to initialise
        return None
    return _joined()


@functools.cache
def _joined():
    """The job's group, initialised once per process (`follow` and rank 0's work both ask for it)."""
    group = mx.distributed.init()
    if group.size() == 1:
        return None
    _stop_on_sigterm(group)
    return group


def follow(load_model: Callable[[], tuple] | None) -> bool:
    """Whether this process is a rank other than 0 of a job, which has then done its part of rank 0's job:
    with `load_model` (-> (model, processor)), embedding the shares rank 0 hands out (`work`); without, none
    (rank 0 does that job alone). A command calls this first: the other ranks check, read and write
    nothing, so a file or folder only rank 0's host has is no error elsewhere."""
    group = world()
    if group is None or group.rank() == 0:
        return False
    if load_model is not None:
        work(group, load_model)
    return True


def embed_files(
    load_model: Callable[[], tuple],
    paths: list[Path],
    batch_size: int = 8,
    pool: str = "mean",
    progress: Callable[[int, int], None] | None = None,
    one_array: bool = False,
) -> EmbedResult:
    """embed.embed_images over `paths`, in one process or, under a launcher, shared with the other ranks
    (this being rank 0; they run `follow`). The others are told the job before `load_model()` (-> (model,
    processor)) runs here, so that every rank loads at once. `progress(images done, in all)` is called once
    the model is loaded, then as images are done. `one_array`: the result must stack into one array (.npy,
    .npz), which the native-resolution checkpoint's token grids cannot: refused once it is loaded."""
    group = world()
    if group is not None:
        start(group, {"batch_size": batch_size, "pool": pool})
    model, processor = load_model()
    if one_array and pool == "none" and model.dims["image_size"] is None:
        raise ConfigError(NATIVE_TOKENS)
    if progress is not None:
        progress(0, len(paths))
    if group is None:
        items = iter_embeddings(model, processor, paths, batch_size, pool)
    else:
        items = embeddings(group, model, processor, paths, batch_size, pool)
    return collect(items, counting(progress, len(paths)))


def where(group) -> str:
    return f"rank {group.rank()} on {socket.gethostname()}"


def assign(sizes: list[int], ranks: int, unit: int = 1) -> list[list[int]]:
    """Positions 0..len(sizes)-1 split into `ranks` shares of about equal bytes, each in input order. The work
    is dealt in units of `unit` consecutive positions (a batch: each batch then holds the same images as in
    one process, so the results are the same to the bit). Deterministic: biggest unit first (ties by
    position), each to the rank with the fewest bytes so far (ties by rank)."""
    units = [range(start, min(start + unit, len(sizes))) for start in range(0, len(sizes), unit)]
    weight = [sum(max(sizes[i], 1) for i in u) for u in units]
    loads = [0] * ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for k in sorted(range(len(units)), key=lambda k: (-weight[k], k)):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        shares[r].extend(units[k])
        loads[r] += weight[k]
    return [sorted(share) for share in shares]


def broadcast(group, message=None):
    """Rank 0's `message` (JSON-able) on every rank; the others pass None."""
    mine = group.rank() == 0
    data = np.frombuffer(json.dumps(message).encode(), np.uint8) if mine else np.zeros(0, np.uint8)
    size = int(_collective(mx.distributed.all_sum, mx.array([data.size if mine else 0]), group)[0])
    payload = mx.array(data.astype(np.int32) if mine else np.zeros(size, np.int32))
    received = np.asarray(_collective(mx.distributed.all_sum, payload, group)).astype(np.uint8)
    return json.loads(received.tobytes().decode())


def start(group, job: dict | None) -> dict | None:
    """Tell the other ranks (from rank 0) what to do: the job (`batch_size`, `pool`), or None when there is
    nothing to embed. On the other ranks, pass None and receive that."""
    return broadcast(group, job if group.rank() == 0 else None)


def work(group, load_model) -> bool:
    """What every rank but 0 runs: wait for rank 0's job; if there is one, load the model (`load_model()` ->
    (model, processor)) and embed the shares rank 0 hands out until it says it is done. Whether there was
    work."""
    job = start(group, None)
    if job is None:
        return False
    model, processor = load_model()
    for _ in embeddings(group, model, processor, None, job["batch_size"], job["pool"]):
        pass
    return True


def embeddings(
    group, model, processor, paths: Iterable[Path] | None, batch_size: int = 8, pool: str = "mean"
) -> Iterator[Embedded]:
    """`iter_embeddings` over all the ranks of `group`. Rank 0 passes the paths and receives one `Embedded`
    per path, in input order; the other ranks pass None, embed their shares and receive nothing. Raises
    RankLost when another rank goes away."""
    shape = _row_shape(model, pool)
    _check_same_model(group, model, shape)
    chunk_size = group.size() * batch_size * CHUNK_BATCHES
    paths = iter(paths) if paths is not None else None
    while True:
        chunk = _chunk(paths, chunk_size) if group.rank() == 0 else None
        chunk = broadcast(group, chunk)
        if not chunk:
            return
        yield from _embed_chunk(group, model, processor, chunk, batch_size, pool, shape)


def _check_same_model(group, model, shape: tuple[int, ...]) -> None:
    """Every rank must compute the same thing: the same family, widths and dtype (a Mac's GPU picks float16
    where a Linux CPU picks float32), hence the same row shape. Checked on all ranks at once, so all stop."""
    info = model.info
    mine = json.dumps([info.family, info.dims, info.dtype, info.quantization, shape], sort_keys=True)
    fingerprint = mx.array([zlib.crc32(mine.encode()) & 0x7FFFFFFF], mx.int32)
    every = np.asarray(_collective(mx.distributed.all_gather, fingerprint, group)).tolist()
    odd = [rank for rank, value in enumerate(every) if value != every[0]]
    if odd:
        raise ConfigError(
            f"rank {odd[0]} loaded a different model from rank 0 ({where(group)}: {info.family}, "
            f"{info.dtype}); give every rank the same model and the same --dtype"
        )


def _chunk(paths: Iterator[Path], size: int) -> list[tuple[str, int]]:
    return [(str(p), _size(p)) for p in islice(paths, size)]


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _embed_chunk(group, model, processor, chunk, batch_size, pool, shape) -> Iterator[Embedded]:
    rank, ranks = group.rank(), group.size()
    shares = assign([size for _, size in chunk], ranks, batch_size)
    mine = shares[rank]
    results = iter_embeddings(model, processor, (Path(chunk[i][0]) for i in mine), batch_size, pool)
    positions = iter(mine)
    done: dict[int, Embedded] = {}
    next_out = 0
    for _ in range(max(-(-len(share) // batch_size) for share in shares)):
        rows = [(next(positions), item) for item in islice(results, batch_size)]
        index, vectors, errors = _gather(group, _pack(group, rows, batch_size, shape), shape)
        if rank != 0:
            continue
        for i, vector, error in zip(index, vectors, errors, strict=True):
            if i >= 0:
                path = Path(chunk[i][0])
                done[i] = Embedded(path, None, error) if error else Embedded(path, vector.copy())
        while next_out in done:  # in input order, as soon as the next one is in
            yield done.pop(next_out)
            next_out += 1


def _pack(group, rows, batch_size: int, shape: tuple[int, ...]) -> np.ndarray:
    """One round's rows of this rank as bytes, one row per slot: the input position (int32, -1 for an empty
    slot), the float32 vector, the error line (UTF-8, zero-padded)."""
    width = int(np.prod(shape))
    packed = np.zeros((batch_size, 4 + 4 * width + ERROR_BYTES), np.uint8)
    index = np.full(batch_size, -1, np.int32)
    vectors = np.zeros((batch_size, width), np.float32)
    for j, (i, item) in enumerate(rows):
        index[j] = i
        if item.error is None:
            vectors[j] = item.embedding.reshape(-1)
        else:
            line = _located(group, item).encode()[:ERROR_BYTES]
            packed[j, 4 + 4 * width : 4 + 4 * width + len(line)] = np.frombuffer(line, np.uint8)
    packed[:, :4] = index.view(np.uint8).reshape(batch_size, 4)
    packed[:, 4 : 4 + 4 * width] = vectors.view(np.uint8)
    return packed


def _located(group, item: Embedded) -> str:
    """An error line as rank 0 reports it. A file this rank cannot see (where rank 0 found it) is named with
    the rank and host, and what to do; any other error reads as it would in one process."""
    if group.rank() == 0 or os.access(item.path, os.R_OK):
        return item.error
    return (
        f"{item.error} ({where(group)}: every rank reads the files itself, so each host must see them at the "
        "same path, e.g. on a shared volume)"
    )


def _gather(group, packed: np.ndarray, shape: tuple[int, ...]):
    """Every rank's packed rows, in rank order (one all_gather): positions, vectors, error lines or None."""
    rows = np.asarray(_collective(mx.distributed.all_gather, mx.array(packed), group))
    width = int(np.prod(shape))
    index = rows[:, :4].copy().view(np.int32).reshape(-1)
    vectors = rows[:, 4 : 4 + 4 * width].copy().view(np.float32).reshape(-1, *shape)
    lines = [row.tobytes().rstrip(b"\0").decode(errors="replace") or None for row in rows[:, 4 + 4 * width :]]
    return index, vectors, lines


def _row_shape(model, pool: str) -> tuple[int, ...]:
    """One embedding's shape: `encode_image`'s width from the model's dims; for token grids, from MLX's
    shape inference on a forward never evaluated (one image's forward where a backend runs eagerly)."""
    if pool == "mean":
        return (model.dims["embed_dim"],)
    size = model.dims.get("image_size")
    if size is None:
        raise ConfigError(
            "--pool none on the native-resolution checkpoint gives token grids of different sizes, which "
            "the ranks cannot exchange; use --pool mean, or run in one process"
        )
    grid = model.forward_intermediates(mx.zeros((1, size, size, 3)), indices=[-1], norm=True)[0]
    return tuple(grid.shape[1:])


def _collective(op, x, group):
    try:
        out = op(x, group=group)
        mx.eval(out)
        return out
    except RuntimeError as exc:
        _lost.set()
        raise RankLost(f"{where(group)}: another rank of the job stopped ({exc})") from None


def _stop_on_sigterm(group) -> None:
    """From now on SIGTERM (what mlx.launch sends the others when one rank exits) raises RankLost, once:
    rank 0 keeps what it finished and says what happened, and a second SIGTERM, or one on the heels of a
    lost connection, does not interrupt that."""

    def stop(signum, frame):
        if not _lost.is_set():
            _lost.set()
            raise RankLost(f"{where(group)}: stopped by SIGTERM (mlx.launch sends it when a rank exits)")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


_lost = threading.Event()  # set once a rank is found gone: the job is over for this process
