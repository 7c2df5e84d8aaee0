"""Embedding many images: streaming in input order, per-file error isolation, output files. The CLI's `embed`
wraps this; photo indexes build on `iter_embeddings`."""

import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import AimMlxError, ConfigError
from ..files import atomic_file
from ..log import logger

OUTPUT_FORMATS = (".npy", ".npz", ".jsonl")
POOLS = ("mean", "none")
NATIVE_TOKENS = (
    "--pool none on the native-resolution checkpoint gives each image its own token grid, which one array "
    "cannot hold; write .jsonl"
)


@dataclass
class Embedded:
    """One input's result: its embedding, or why it was skipped."""

    path: Path
    embedding: np.ndarray | None  # (D,) pooled (encode_image's), or the (N, D) final token grid
    error: str | None = None  # a one-line reason, when the input could not be used


def iter_embeddings(
    model,
    processor,
    paths: Iterable[Path],
    batch_size: int = 8,
    pool: str = "mean",
    encode: Callable[[mx.array], mx.array] | None = None,
) -> Iterator[Embedded]:
    """One `Embedded` per input path, in input order, batch by batch as the model finishes them.

    Images are decoded and preprocessed on worker threads a couple of batches ahead while the model runs,
    and batched `batch_size` inputs at a time (a batch with a failed input is short by one), split where the
    native-resolution checkpoint meets a new image size. Memory stays bounded by a few batches, however many
    paths there are (`paths` may be a generator). A file that cannot be read is yielded with its `error`
    and skipped.
    `pool`: "mean" gives `model.encode_image` (LiT: the image-text space), "none" the final token grid;
    `encode` (pixels (B, H, W, 3) -> (B, ...)), when given, is what is computed instead (a probe's features).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if pool not in POOLS:
        raise ConfigError(f"unknown pooling {pool!r}; choose mean or none")
    window: list[Embedded] = []  # the batch being gathered: its items, failures among them, in input order
    pixels: list[np.ndarray] = []
    in_flight: tuple[list[Embedded], mx.array | None] = ([], None)  # the last batch dispatched, its output

    def dispatch() -> Iterator[Embedded]:
        """Start the gathered batch, then finish the one before it. MLX evaluates asynchronously, so the
        device computes this batch while the previous one is copied out and yielded and the next gathered:
        no idle gap between batches on a GPU."""
        nonlocal in_flight
        out = None
        if pixels:
            x = mx.array(np.stack(pixels))  # (B, H, W, 3)
            if encode is not None:
                out = encode(x)
            elif pool == "mean":
                out = model.encode_image(x)  # (B, D)
            else:
                out = model.forward_intermediates(x, indices=[-1], norm=True)[0]  # (B, N, D)
            out = out.astype(mx.float32)
            mx.async_eval(out)
        (items, previous), in_flight = in_flight, (list(window), out)
        window.clear()
        pixels.clear()
        rows = iter(np.asarray(previous)) if previous is not None else None
        for item in items:
            if item.error is None:
                item.embedding = next(rows)
        yield from items

    for path, px, error in _read_ahead(processor, paths, lookahead=2 * batch_size):
        # A batch is cut every `batch_size` inputs, failed ones included, so an image's batch (and its result,
        # to the bit) depends on its position alone: not on whether a neighbour failed, nor on how the work
        # is shared (tasks/distributed.py deals whole batches). Native resolution also cuts on a new size.
        if len(window) == batch_size or (px is not None and pixels and pixels[0].shape != px.shape):
            yield from dispatch()
        if error is not None:
            logger.info("skipped %s", error)
            window.append(Embedded(path, None, str(error)))
            continue
        window.append(Embedded(path, None))
        pixels.append(px)
    yield from dispatch()  # the last batch gathered
    yield from dispatch()  # and its results


@dataclass
class EmbedResult:
    paths: list = field(default_factory=list)  # what was embedded, in input order: image paths, or texts
    embeddings: list[np.ndarray] = field(default_factory=list)  # (D,) pooled, or (N, D) token grids
    failures: list[tuple[Path, str]] = field(default_factory=list)  # (path, one-line reason)
    kind: str = "path"  # what `paths` holds, "path" or "text": the key save() writes them under


def embed_images(
    model,
    processor,
    paths: Iterable[Path],
    batch_size: int = 8,
    pool: str = "mean",
    on_done: Callable[[int], None] | None = None,
) -> EmbedResult:
    """`iter_embeddings` collected: the embedded files in order, and the failures. `on_done(n)` is called as
    files are done (embedded or skipped) with how many."""
    return collect(iter_embeddings(model, processor, paths, batch_size, pool), on_done)


def collect(items: Iterable[Embedded], on_done: Callable[[int], None] | None = None) -> EmbedResult:
    """An `Embedded` stream (iter_embeddings', or aim_mlx.tasks.distributed's on rank 0) as an EmbedResult."""
    result = EmbedResult()
    for item in items:
        if item.error is None:
            result.paths.append(item.path)
            result.embeddings.append(item.embedding)
        else:
            result.failures.append((item.path, item.error))
        if on_done:
            on_done(1)
    return result


def counting(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None] | None:
    """`collect`'s `on_done` for a `progress(done so far, in all)` callback (None: None)."""
    if progress is None:
        return None
    done = 0

    def on_done(count: int) -> None:
        nonlocal done
        done += count
        progress(done, total)

    return on_done


def _read_ahead(processor, paths: Iterable[Path], lookahead: int):
    """(path, pixels, None) or (path, None, error) in input order, decoding up to `lookahead` images ahead
    on worker threads (Pillow and numpy release the GIL) while the model runs on the current batch. When the
    consumer stops early (an interrupt, a closed generator), decodes not yet started are cancelled."""
    paths = iter(paths)
    workers = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        pending = deque((p, workers.submit(processor.preprocess_one, p)) for p in islice(paths, lookahead))
        while pending:
            path, future = pending.popleft()
            for nxt in islice(paths, 1):
                pending.append((nxt, workers.submit(processor.preprocess_one, nxt)))
            try:
                yield path, future.result(), None  # (H, W, 3) float32
            except AimMlxError as exc:
                yield path, None, exc
    finally:
        workers.shutdown(wait=True, cancel_futures=True)


def save(result: EmbedResult, output: Path) -> None:
    """Write embeddings as .npy (rows in order), .npz (`embeddings` + `paths`, or `texts`) or .jsonl (one
    object per input, `path` or `text` and `embedding`), whole or not at all."""
    suffix = check_output(output)
    names = [str(p) for p in result.paths]
    if suffix == ".jsonl":
        with atomic_file(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for name, emb in zip(names, result.embeddings, strict=True):
                f.write(json.dumps({result.kind: name, "embedding": emb.tolist()}, ensure_ascii=False) + "\n")
        return
    shapes = {e.shape for e in result.embeddings}
    if len(shapes) > 1:
        raise ConfigError(
            f"cannot write {output}: token grids differ in size; write .jsonl or use --pool mean"
        )
    dim = next(iter(shapes), (0,))
    stacked = np.stack(result.embeddings) if result.embeddings else np.zeros((0, *dim), np.float32)
    with atomic_file(output) as tmp:
        if suffix == ".npy":
            np.save(tmp, stacked)
        else:
            np.savez(tmp, embeddings=stacked, **{f"{result.kind}s": np.array(names, dtype=str)})


def check_output(output: Path) -> str:
    """The output's format (its suffix), or a one-line error for a name `save` cannot write."""
    suffix = Path(output).suffix.lower()
    if Path(output).is_dir():
        raise ConfigError(f"{output} is a directory; give a file name ending in {', '.join(OUTPUT_FORMATS)}")
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"cannot write {output}: use a .npy, .npz or .jsonl file name")
    return suffix


def embed_texts(model, texts: list[str], batch_size: int = 64) -> EmbedResult:
    """Texts -> (P,) L2-normalised LiT embeddings, in `EmbedResult` form (the texts stand where paths do)."""
    if any(not t.strip() for t in texts):
        raise ConfigError("an empty --text was given; pass the text to embed")
    result = EmbedResult(kind="text")
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        emb = model.encode_text(chunk)  # (b, P)
        result.paths.extend(chunk)
        result.embeddings.extend(np.asarray(emb.astype(mx.float32)))
    return result
