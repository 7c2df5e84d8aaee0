"""Labelled class folders and their probe features, for `aim-mlx train` (train.py) and `eval folder`.

- Data: an ImageFolder layout (one folder per class, images possibly nested), read with the usual readers;
  an unreadable image is skipped, named and counted. Validation: a stratified, seeded share of each class,
  or another folder with the same class names.
- Features are computed once per image and kept in aim-mlx's cache (AIM_MLX_CACHE/probe-features), keyed
  by the model's identity (ModelInfo.key), its preprocessing and the feature kind, and per file by the
  SHA-256 of its bytes: a second run with other settings costs no forward pass. Pooled embeddings are stored
  in float32, token grids in float16; `Features` holds them in memory when they fit a budget and otherwise
  reads them back from the cache batch by batch.
- Augmentation: random resized crops and flips, seeded per image and epoch.
"""

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..files import atomic_file, cache_dir
from ..inputs.images import find_images, load_image
from ..log import logger
from .embed import iter_embeddings


@dataclass
class Dataset:
    """Image paths and their class indices, classes in folder order."""

    labels: list[str]
    paths: list[Path]
    targets: list[int]

    def counts(self) -> list[int]:
        return np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.labels)).tolist()


def find_classes(root: Path, labels: list[str] | None = None, what: str = "DATA") -> Dataset:
    """An ImageFolder-layout set: one folder per class (hidden ones ignored), each holding images. With
    `labels`, the folders must be among those names (a validation or test set of a trained head)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{what} {root} is not a folder; give a folder with one subfolder per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConfigError(f"{root} has no class folders; put each class's images in a folder named after it")
    names = [f.name for f in folders]
    if labels is not None:
        unknown = [n for n in names if n not in labels]
        if unknown:
            raise ConfigError(
                f"class folder {unknown[0]!r} in {root} is not one of the head's classes: {', '.join(labels)}"
            )
    order = labels if labels is not None else names
    paths, targets = [], []
    for folder in folders:
        images = find_images([folder])
        if not images and labels is None:
            raise ConfigError(f"class folder {folder} holds no images; add some or remove it")
        paths += images
        targets += [order.index(folder.name)] * len(images)
    if labels is None and len(folders) < 2:
        raise ConfigError(f"{root} has one class folder ({names[0]}); a classifier needs two classes or more")
    if not paths:
        raise ConfigError(f"no images in the {len(folders)} class folders of {root}")
    return Dataset(list(order), paths, targets)


def split(data: Dataset, val_split: float, seed: int) -> tuple[Dataset, Dataset]:
    """A stratified, seeded split: round(val_split * n) images of each class (at least one when val_split >
    0) go to validation, the rest to training. A class needs two images to be in both."""
    if not 0 <= val_split < 1:
        raise ConfigError(f"--val-split must be at least 0 and below 1, got {val_split}")
    rng = np.random.default_rng(seed)
    targets = np.asarray(data.targets)
    train_idx, val_idx = [], []
    for c, label in enumerate(data.labels):
        members = np.flatnonzero(targets == c)
        if val_split > 0 and len(members) < 2:
            raise ConfigError(
                f"class {label!r} has one image: it cannot be both trained on and validated; add images, or "
                "give a validation folder with --val"
            )
        rng.shuffle(members)
        n_val = max(1, round(val_split * len(members))) if val_split > 0 else 0
        n_val = min(n_val, len(members) - 1)
        val_idx += members[:n_val].tolist()
        train_idx += members[n_val:].tolist()

    def subset(idx):
        idx = sorted(idx)
        return Dataset(data.labels, [data.paths[i] for i in idx], [data.targets[i] for i in idx])

    return subset(train_idx), subset(val_idx)


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def feature_kind(probe: str, blocks: list[int] | None) -> str:
    if probe == "linear":
        return "pooled"
    return "tokens-final" if blocks is None else "tokens-mean-" + "-".join(map(str, blocks))


def cache_folder(model, processor, kind: str) -> Path:
    """Where one model's features of one kind live: keyed by its identity, preprocessing and the kind."""
    identity = [model.info.key, processor.to_dict(), kind]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir("probe-features", digest)


class Features:
    """Cached feature rows by index: stacked in memory when they fit `budget` bytes, else read from their
    cache files batch by batch."""

    def __init__(self, files: list[Path], budget: int):
        self.files = files
        first = np.load(files[0], mmap_mode="r") if files else np.zeros((0,), np.float32)
        self.shape, self.nbytes = first.shape, first.nbytes * len(files)
        self.in_memory = self.nbytes <= budget
        self.rows = np.stack([np.load(f) for f in files]) if self.in_memory and files else None

    def __len__(self) -> int:
        return len(self.files)

    def take(self, idx) -> np.ndarray:
        if self.rows is not None:
            return self.rows[idx]
        return np.stack([np.load(self.files[i]) for i in idx])


@dataclass
class Extracted:
    kept: list[int] = field(default_factory=list)  # indices into the dataset's paths that have features
    files: list[Path] = field(default_factory=list)  # their cache files, in the same order
    hashes: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    computed: int = 0  # images that went through the model (not found in the cache)
    seconds: float = 0.0


def extract(
    classifier, processor, paths: list[Path], batch_size: int, folder: Path, progress=None
) -> Extracted:
    """Each image's features, from the cache or computed (and cached); unreadable images are skipped."""
    start = time.perf_counter()
    out = Extracted()
    hashes, missing = [], []
    for i, path in enumerate(paths):
        try:
            hashes.append(file_hash(path))
        except OSError as exc:
            hashes.append(None)
            out.failures.append((str(path), f"{path}: cannot be read ({exc.strerror or exc})"))
            continue
        if not (folder / f"{hashes[i]}.npy").is_file():
            missing.append(i)
    done = len(paths) - len(missing)
    if progress is not None:
        progress(done, len(paths))
    dtype = np.float32 if classifier.config.probe == "linear" else np.float16
    items = iter_embeddings(
        None, processor, [paths[i] for i in missing], batch_size, encode=classifier.features
    )
    for i, item in zip(missing, items, strict=True):
        if item.error is not None:
            out.failures.append((str(item.path), item.error))
            hashes[i] = None
        else:
            with atomic_file(folder / f"{hashes[i]}.npy") as tmp:
                np.save(tmp, item.embedding.astype(dtype))
            out.computed += 1
        done += 1
        if progress is not None:
            progress(done, len(paths))
    for i, digest in enumerate(hashes):
        if digest is not None:
            out.kept.append(i)
            out.files.append(folder / f"{digest}.npy")
            out.hashes.append(digest)
    out.failures.sort()
    out.seconds = time.perf_counter() - start
    return out


def warn_duplicates(data: Dataset, extracted: Extracted) -> int:
    """Warn about identical files in different classes; returns how many such files there are."""
    classes: dict[str, set[int]] = {}
    for i, digest in zip(extracted.kept, extracted.hashes, strict=True):
        classes.setdefault(digest, set()).add(data.targets[i])
    shared = [d for d, c in classes.items() if len(c) > 1]
    for digest in shared[:5]:
        names = [
            str(data.paths[i]) for i, d in zip(extracted.kept, extracted.hashes, strict=True) if d == digest
        ]
        logger.warning("the same image is in several classes: %s", ", ".join(names))
    return len(shared)


def augment_image(
    path: Path, rng: np.random.Generator, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """A random resized crop (torchvision's RandomResizedCrop sampling: area share and aspect ratio) and a
    random horizontal flip; the processor resizes and crops the result as usual."""
    image = load_image(path)
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = image.crop((left, top, left + cw, top + ch))
            break
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


class Augmenting:
    """A processor whose images are augmented first, each by a generator seeded from (seed, epoch, path), so
    that a run repeats whatever order the decoding threads take."""

    def __init__(self, processor, seed: int, epoch: int):
        self.processor, self.seed, self.epoch = processor, seed, epoch

    def preprocess_one(self, path):
        key = int.from_bytes(
            hashlib.sha256(f"{self.seed}/{self.epoch}/{path}".encode()).digest()[:8], "little"
        )
        return self.processor.preprocess_one(augment_image(path, np.random.default_rng(key)))


def chunks(order, size: int):
    return (list(order[i : i + size]) for i in range(0, len(order), size))


def channel_stats(store: Features, rows: list[int], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of the training features (over images, and tokens for token grids)."""
    total = total_sq = None
    n = 0
    for idx in chunks(np.asarray(rows), batch_size):
        x = store.take(idx).astype(np.float64).reshape(-1, store.shape[-1])
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        n += len(x)
    mean = total / n
    return mean.astype(np.float32), np.maximum(total_sq / n - mean * mean, 0).astype(np.float32)


def batched(items, targets: np.ndarray, batch_size: int):
    """iter_embeddings' results as (features, targets) batches, unreadable images left out."""
    xs, ys = [], []
    for item, target in zip(items, targets, strict=True):
        if item.error is None:
            xs.append(item.embedding)
            ys.append(target)
        if len(xs) == batch_size:
            yield np.stack(xs), np.asarray(ys)
            xs, ys = [], []
    if xs:
        yield np.stack(xs), np.asarray(ys)
