"""Embedding many images: batching, per-file error isolation, output files. The CLI's `embed` wraps this."""

import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import AimMlxError, ConfigError

logger = logging.getLogger("aim_mlx")

OUTPUT_FORMATS = (".npy", ".npz", ".jsonl")


@dataclass
class EmbedResult:
    paths: list[Path] = field(default_factory=list)  # the images that were embedded, in input order
    embeddings: list[np.ndarray] = field(default_factory=list)  # (D,) pooled, or (N, D) token grids
    failures: list[tuple[Path, str]] = field(default_factory=list)  # (path, one-line reason)


def embed_images(
    model,
    processor,
    paths: Iterable[Path],
    batch_size: int = 8,
    pool: str = "mean",
    on_done: Callable[[int], None] | None = None,
) -> EmbedResult:
    """Embed image files in order. A file that cannot be read is recorded in `failures` and skipped.

    Images are batched while they share a shape (always, for fixed-resolution checkpoints; for the native one,
    consecutive images of equal size). `on_done(n)` is called after each batch with the number of files done.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if pool not in ("mean", "none"):
        raise ConfigError(f"unknown pooling {pool!r}; choose mean or none")
    result = EmbedResult()
    batch: list[tuple[Path, np.ndarray]] = []

    def flush():
        pixels = mx.array(np.stack([px for _, px in batch]))  # (B, H, W, 3)
        out = model(pixels)
        emb = out.pooler_output if pool == "mean" else out.last_hidden_state
        emb = np.asarray(emb.astype(mx.float32))
        result.paths.extend(p for p, _ in batch)
        result.embeddings.extend(emb)
        if on_done:
            on_done(len(batch))
        batch.clear()

    for path, pixels, error in _read_ahead(processor, paths, lookahead=2 * batch_size):
        if error is not None:
            result.failures.append((path, str(error)))
            logger.info("skipped %s", error)
            if on_done:
                on_done(1)
            continue
        if batch and (len(batch) == batch_size or batch[0][1].shape != pixels.shape):
            flush()
        batch.append((path, pixels))
    if batch:
        flush()
    return result


def _read_ahead(processor, paths: Iterable[Path], lookahead: int):
    """(path, pixels, None) or (path, None, error) in input order, decoding up to `lookahead` images ahead
    on worker threads (Pillow and numpy release the GIL) while the model runs on the current batch."""
    paths = iter(paths)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as workers:
        pending = deque((p, workers.submit(processor.preprocess_one, p)) for p in islice(paths, lookahead))
        while pending:
            path, future = pending.popleft()
            for nxt in islice(paths, 1):
                pending.append((nxt, workers.submit(processor.preprocess_one, nxt)))
            try:
                yield path, future.result(), None  # (H, W, 3) float32
            except AimMlxError as exc:
                yield path, None, exc


def save(result: EmbedResult, output: Path) -> None:
    """Write embeddings as .npy (rows in order), .npz (`embeddings` + `paths`) or .jsonl (one per image)."""
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"cannot write {output}: use a .npy, .npz or .jsonl file name")
    if output.is_dir():
        raise ConfigError(f"{output} is a directory; give a file name ending in {', '.join(OUTPUT_FORMATS)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in result.paths]
    if suffix == ".jsonl":
        tmp = output.with_name(output.name + ".tmp")
        with open(tmp, "w") as f:
            for path, emb in zip(paths, result.embeddings, strict=True):
                f.write(json.dumps({"path": path, "embedding": emb.tolist()}) + "\n")
        tmp.replace(output)
        return
    shapes = {e.shape for e in result.embeddings}
    if len(shapes) > 1:
        raise ConfigError(
            f"cannot write {output}: token grids differ in size; write .jsonl or use --pool mean"
        )
    dim = next(iter(shapes), (0,))
    stacked = np.stack(result.embeddings) if result.embeddings else np.zeros((0, *dim), np.float32)
    tmp = output.with_name(output.name + ".tmp" + suffix)  # numpy appends the suffix when it is missing
    if suffix == ".npy":
        np.save(tmp, stacked)
    else:
        np.savez(tmp, embeddings=stacked, paths=np.array(paths, dtype=str))
    tmp.replace(output)
