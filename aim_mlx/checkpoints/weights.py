"""Checkpoint files: safe reading and strict loading.

Only safetensors files are read, each checked against its header before MLX maps it; pickles are refused
(AIMv1's are converted once by `aim-mlx convert`, convert/pickles.py). `load_into` is strict: a mismatch
names the missing, unexpected and mis-shaped keys. Foreign key names are layouts.py's.
"""

import json
import struct
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import WeightsError
from .folder import INDEX_FILE, PICKLE_SUFFIXES, SAFETENSORS_FILES


def check_safetensors(path: Path) -> None:
    """Validate the header and that the file holds every byte it promises, before anything is loaded."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if not isinstance(end, int):
            raise ValueError(f"data offset {end!r} is not an integer")
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise WeightsError(f"{path} is not a valid safetensors file ({exc}); download it again") from exc
    if 8 + n + end > size:
        raise WeightsError(
            f"{path} is truncated ({size} bytes, its header needs {8 + n + end}); download it again"
        )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint in `folder`. Pickled checkpoints are refused."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if not all(isinstance(s, str) and s == Path(s).name for s in shards):
                raise TypeError("its weight_map values must be file names in the same folder")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{index} is not a valid safetensors index ({exc})") from exc
        return [folder / s for s in shards]
    for name in SAFETENSORS_FILES:
        if (folder / name).exists():
            return [folder / name]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{folder} has only pickled weights ({', '.join(pickles)}); aim-mlx never unpickles checkpoints. "
            "Use a safetensors checkpoint (the hub repos have model.safetensors)"
        )
    raise WeightsError(f"{folder} has no model.safetensors; pass a folder with an AIMv2 checkpoint")


def load_file(path: Path) -> dict[str, mx.array]:
    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: aim-mlx never unpickles checkpoints; use a .safetensors file")
    check_safetensors(path)
    try:
        return mx.load(str(path))
    except Exception as exc:
        raise WeightsError(f"{path} could not be read ({exc}); download it again") from exc


def read_folder(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a checkpoint folder (one file or the shards of its index), as stored."""
    weights = {}
    for path in weight_files(folder):
        if not path.exists():
            raise WeightsError(f"{path} is listed in {INDEX_FILE} but missing; download the checkpoint again")
        weights.update(load_file(path))
    return weights


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def load_into(model, weights: dict[str, mx.array], source: str = "checkpoint") -> None:
    """Strict load: every parameter present with its exact shape, nothing extra. Errors list what differs."""
    expected = dict(tree_flatten(model.parameters()))
    missing = expected.keys() - weights.keys()
    unexpected = weights.keys() - expected.keys()
    misshaped = [
        f"{k} {tuple(weights[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected.keys() & weights.keys()
        if weights[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        parts = [
            f"{label}: {_first(names)}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if names
        ]
        raise WeightsError(f"{source} does not match config.json; " + "; ".join(parts))
    model.update(tree_unflatten(list(weights.items())))
