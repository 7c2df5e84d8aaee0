"""`train`: a linear or attentive probe fitted on a frozen model's features from labelled class folders, saved
as a small head folder that `aim_mlx.load` turns into a classifier (models/probe.py).

- Data: an ImageFolder layout (one folder per class, images possibly nested), read with the usual readers;
  an unreadable image is skipped, named and counted. Validation: a stratified, seeded share of each class
  (`val_split`), or another folder with the same class names (`val_dir`).
- Features are computed once per image and kept in aim-mlx's cache (AIM_MLX_CACHE/probe-features), keyed
  by the model's identity (ModelInfo.key), its preprocessing and the feature kind, and per file by the
  SHA-256 of its bytes: a second run with other settings costs no forward pass. Pooled embeddings are stored
  in float32, token grids in float16; token grids are held in memory when they fit `memory_budget` bytes and
  otherwise read back from the cache batch by batch each epoch. `augment` (attentive only: random resized
  crops and flips) computes the training images' tokens afresh every epoch, a forward pass per image each.
- Fitting: mlx.optimizers.AdamW with weight decay on a cosine schedule (mlx.optimizers.cosine_decay),
  mlx.nn's cross-entropy (weighted per class when the classes are unbalanced), early stopping on the
  validation loss with the best epoch's weights kept, a seed for everything random.
"""

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from PIL import Image
from safetensors.numpy import save_file

from .. import __version__
from ..errors import AimMlxError, ConfigError
from ..files import atomic_file, atomic_folder, cache_dir
from ..inputs.images import find_images, load_image
from ..log import logger
from ..registry import FAMILIES, PROBE_TYPE
from .embed import iter_embeddings
from .metrics import confusion_matrix, per_class

PROBES = ("linear", "attentive")
PATIENCE = 5  # epochs without a better validation loss before training stops
UNBALANCED = 1.2  # largest class / smallest class above which the loss is weighted per class


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


@dataclass
class Epoch:
    epoch: int
    train_loss: float
    train_accuracy: float  # percent
    val_loss: float | None
    val_accuracy: float | None
    learning_rate: float
    seconds: float


@dataclass
class TrainReport:
    output: str
    probe: str
    labels: list[str]
    base_model: str
    train_images: int
    val_images: int
    failed: int
    duplicates: int  # files found in more than one class
    class_counts: list[int]  # training images per class
    balanced_loss: bool
    epochs: list[Epoch]
    best_epoch: int
    stopped_early: bool
    val_loss: float | None
    val_accuracy: float | None
    per_class: list[dict]  # precision, recall, support on the validation set (the training set without one)
    confusion: list[list[int]]  # rows: true class, columns: predicted
    evaluated_on: str  # "validation" or "training"
    forward_images: int  # images that went through the model (cache misses, augmented crops)
    feature_seconds: float
    train_seconds: float
    token_cache: dict = field(default_factory=dict)  # attentive: bytes, in memory or streamed
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["failures"] = [{"path": p, "error": e} for p, e in self.failures]
        return out


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


def train(
    model,
    processor,
    data_dir: str | Path,
    output: str | Path,
    *,
    probe: str = "linear",
    blocks: list[int] | None = None,
    val_split: float = 0.1,
    val_dir: str | Path | None = None,
    epochs: int = 20,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    augment: bool = False,
    memory_budget: int = 2 << 30,
    image_batch_size: int = 8,
    force: bool = False,
    on_features: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[Epoch, int], None] | None = None,
) -> TrainReport:
    """Fit a `probe` ("linear" or "attentive") on `model`'s features of the class folders in `data_dir` and
    write the head folder `output` (model.safetensors + config.json), whole or not at all.

    `lr` defaults to 1e-3 (linear) or 1e-4 (attentive). `blocks` (attentive): the block indices whose mean
    the probe reads (negative from the end); None, the final token grid. `on_features(done, in all)` is
    called as images' features are found or computed, `on_epoch(epoch, epochs)` after each epoch."""
    if probe not in PROBES:
        raise ConfigError(f"unknown probe {probe!r}; choose linear or attentive")
    if blocks is not None and probe != "attentive":
        raise ConfigError("--blocks chooses the attentive probe's tokens; add --probe attentive")
    if augment and probe != "attentive":
        raise ConfigError(
            "--augment is for the attentive probe (it computes every training image anew each epoch); the "
            "linear probe trains on cached embeddings: add --probe attentive, or drop --augment"
        )
    if epochs < 1 or batch_size < 1:
        raise ConfigError("--epochs and --batch-size must be at least 1")
    if lr is not None and lr <= 0:
        raise ConfigError(f"--lr must be positive, got {lr}")
    output = Path(output).expanduser()
    if (output.exists() or output.is_symlink()) and not force:
        raise ConfigError(f"{output} already exists; pass --force to replace it")
    if model.dims.get("image_size") is None and probe == "attentive":
        raise ConfigError(
            "the attentive probe needs one token grid for every image; the native-resolution checkpoint "
            "gives each image its own: use --probe linear, or a fixed-size checkpoint"
        )
    lr = lr if lr is not None else (1e-3 if probe == "linear" else 1e-4)
    data = find_classes(data_dir)
    if val_dir is not None:
        train_set, val_set = data, find_classes(val_dir, data.labels, "--val")
    else:
        train_set, val_set = split(data, val_split, seed)

    family = FAMILIES["aimv2-probe"]
    dims = model.dims
    width = dims["embed_dim"] if probe == "linear" else dims["hidden_size"]
    raw = {
        "probe": probe,
        "hidden_size": width,
        "labels": data.labels,
        "num_heads": dims["num_attention_heads"],
        "blocks": blocks,
        "base_model": base_record(model),
    }
    mx.random.seed(seed)  # the probe's initial weights
    classifier = family.model(family.config(raw, {}, None), base=model)
    blocks = classifier.config.blocks  # normalised: sorted, non-negative
    folder = cache_folder(model, processor, feature_kind(probe, blocks))
    everything = train_set.paths + val_set.paths
    extracted = extract(classifier, processor, everything, image_batch_size, folder, on_features)
    duplicates = warn_duplicates(
        Dataset(data.labels, everything, train_set.targets + val_set.targets), extracted
    )
    n_train = len(train_set.paths)
    tr = [k for k, i in enumerate(extracted.kept) if i < n_train]
    va = [k for k, i in enumerate(extracted.kept) if i >= n_train]
    targets = np.asarray((train_set.targets + val_set.targets), dtype=np.int64)[extracted.kept]
    y_train, y_val = targets[tr], targets[va]
    store = Features(extracted.files, memory_budget)
    if len(tr) == 0:
        raise AimMlxError("none of the training images could be read")
    counts = np.bincount(y_train, minlength=len(data.labels))
    empty = [data.labels[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise ConfigError(f"class {empty[0]!r} has no readable training image")

    rng = np.random.default_rng(seed)
    head = classifier.head
    mean, var = channel_stats(store, tr, batch_size)
    head.bn.running_mean, head.bn.running_var = mx.array(mean), mx.array(var)
    balanced = counts.max() / counts.min() > UNBALANCED
    class_weight = len(y_train) / (len(counts) * counts) if balanced else np.ones(len(counts))
    steps = epochs * math.ceil(len(tr) / batch_size)
    optimizer = optim.AdamW(learning_rate=optim.cosine_decay(lr, steps), weight_decay=weight_decay)

    def loss_fn(x, y, w):
        return nn.losses.cross_entropy(head(x), y, weights=w, reduction="mean")

    step = nn.value_and_grad(head, loss_fn)
    history: list[Epoch] = []
    best = (math.inf, 0, dict(tree_flatten(head.parameters())))
    forward = extracted.computed
    start = time.perf_counter()
    stopped_early = False
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        rate = float(optimizer.learning_rate)
        order = rng.permutation(len(tr))
        if augment:
            batches, computed = _augmented_batches(
                classifier,
                processor,
                train_set,
                extracted,
                order,
                tr,
                batch_size,
                image_batch_size,
                seed,
                epoch,
            )
        else:
            batches, computed = (
                ((store.take([tr[k] for k in idx]), y_train[idx]) for idx in _chunks(order, batch_size)),
                0,
            )
        loss_sum = seen = 0.0
        for x, y in batches:
            x, y = mx.array(x, dtype=mx.float32), mx.array(y)
            loss, grads = step(x, y, mx.array(class_weight[np.asarray(y)], dtype=mx.float32))
            optimizer.update(head, grads)
            mx.eval(head.parameters(), optimizer.state, loss)
            loss_sum += float(loss) * len(y)
            seen += len(y)
        forward += computed() if callable(computed) else computed
        train_loss, train_acc = _score(head, store, tr, y_train, class_weight, batch_size)[:2]
        if augment:
            train_loss = loss_sum / seen  # the augmented crops' loss, as trained on
        val_loss = val_acc = None
        if va:
            val_loss, val_acc, _ = _score(head, store, va, y_val, class_weight, batch_size)
        stats = Epoch(epoch, train_loss, train_acc, val_loss, val_acc, rate, time.perf_counter() - t0)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats, epochs)
        watched = val_loss if va else train_loss
        if watched < best[0]:
            best = (watched, epoch, dict(tree_flatten(head.parameters())))
        elif va and epoch - best[1] >= PATIENCE:
            stopped_early = True
            break
    train_seconds = time.perf_counter() - start
    head.update(tree_unflatten(list(best[2].items())))
    on, idx, y = ("validation", va, y_val) if va else ("training", tr, y_train)
    val_loss, val_acc, predicted = _score(head, store, idx, y, class_weight, batch_size)
    matrix = confusion_matrix(y, predicted, len(data.labels))
    facts = {
        "epochs_run": len(history),
        "best_epoch": best[1],
        "learning_rate": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "seed": seed,
        "val_split": None if val_dir is not None else val_split,
        "val_dir": None if val_dir is None else str(Path(val_dir).expanduser().resolve()),
        "augment": augment,
        "balanced_loss": bool(balanced),
        "class_counts": counts.tolist(),
        "train_images": len(tr),
        "val_images": len(va),
        f"{on}_loss": val_loss,
        f"{on}_accuracy": val_acc,
        "aim_mlx_version": __version__,
    }
    write_head(output, head, classifier.config, processor, facts, force)
    return TrainReport(
        output=str(output),
        probe=probe,
        labels=data.labels,
        base_model=model.info.source,
        train_images=len(tr),
        val_images=len(va),
        failed=len(extracted.failures),
        duplicates=duplicates,
        class_counts=counts.tolist(),
        balanced_loss=bool(balanced),
        epochs=history,
        best_epoch=best[1],
        stopped_early=stopped_early,
        val_loss=val_loss if va else None,
        val_accuracy=val_acc if va else None,
        per_class=per_class(matrix, data.labels),
        confusion=matrix.tolist(),
        evaluated_on=on,
        forward_images=forward,
        feature_seconds=extracted.seconds,
        train_seconds=train_seconds,
        token_cache={} if probe == "linear" else {"bytes": store.nbytes, "in_memory": store.in_memory},
        failures=extracted.failures,
    )


def base_record(model) -> dict:
    """What a head folder says of its base: enough to load it again and to know it is the same model."""
    info = model.info
    return {
        "source": info.source,
        "revision": info.revision,
        "family": info.family,
        "dtype": info.dtype,
        "key": info.key,
        "quantization": info.quantization,
    }


def _chunks(order: np.ndarray, size: int):
    return (order[i : i + size] for i in range(0, len(order), size))


def channel_stats(store: Features, rows: list[int], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of the training features (over images, and tokens for token grids)."""
    total = total_sq = None
    n = 0
    for idx in _chunks(np.asarray(rows), batch_size):
        x = store.take(idx).astype(np.float64).reshape(-1, store.shape[-1])
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        n += len(x)
    mean = total / n
    return mean.astype(np.float32), np.maximum(total_sq / n - mean * mean, 0).astype(np.float32)


def _score(head, store: Features, rows: list[int], y: np.ndarray, class_weight, batch_size: int):
    """(loss, accuracy in percent, predicted classes) of `head` on the cached rows."""
    logits = []
    for idx in _chunks(np.asarray(rows), batch_size):
        out = head(mx.array(store.take(idx), dtype=mx.float32))
        logits.append(np.asarray(out))
    logits = np.concatenate(logits) if logits else np.zeros((0, len(class_weight)), np.float32)
    loss = nn.losses.cross_entropy(
        mx.array(logits), mx.array(y), weights=mx.array(class_weight[y], dtype=mx.float32), reduction="mean"
    )
    predicted = logits.argmax(axis=1)
    return float(loss), float(100 * (predicted == y).mean()) if len(y) else 0.0, predicted


def _augmented_batches(
    classifier, processor, data, extracted, order, tr, batch_size, image_batch, seed, epoch
):
    """Training batches of augmented crops computed now, streamed in the epoch's order, and a function that
    says how many images went through the model."""
    paths = [data.paths[extracted.kept[tr[k]]] for k in order]
    y = [data.targets[extracted.kept[tr[k]]] for k in order]
    count = [0]

    def batches():
        xs, ys = [], []
        items = iter_embeddings(
            None, Augmenting(processor, seed, epoch), paths, image_batch, encode=classifier.features
        )
        for item, target in zip(items, y, strict=True):
            if item.error is not None:
                continue
            count[0] += 1
            xs.append(item.embedding)
            ys.append(target)
            if len(xs) == batch_size:
                yield np.stack(xs), np.asarray(ys)
                xs, ys = [], []
        if xs:
            yield np.stack(xs), np.asarray(ys)

    return batches(), lambda: count[0]


def write_head(output: Path, head, config, processor, facts: dict, force: bool) -> None:
    """The head folder: model.safetensors (the probe's float32 weights) and config.json."""
    state = {k: np.asarray(v, dtype=np.float32) for k, v in tree_flatten(head.parameters())}
    document = {
        "model_type": PROBE_TYPE,
        **config.to_dict(),
        "preprocessing": processor.to_dict(),
        "training": facts,
    }
    with atomic_folder(output, replace=force) as staging:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
