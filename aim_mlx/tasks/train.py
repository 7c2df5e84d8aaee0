"""`train`: a linear or attentive probe fitted on a frozen model's features from labelled class folders, saved
as a small head folder that `aim_mlx.load` turns into a classifier (models/probe.py).

The images and their cached features are features.py's. Fitting: mlx.optimizers.AdamW with weight decay on
a cosine schedule (mlx.optimizers.cosine_decay), mlx.nn's cross-entropy (weighted per class when the classes
are unbalanced), early stopping on the validation loss with the best epoch's weights kept, a seed for
everything random. `augment` (attentive only: random resized crops and flips) computes the training images'
tokens afresh every epoch, a forward pass per image each.
"""

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
from safetensors.numpy import save_file

from .. import __version__
from ..errors import AimMlxError, ConfigError
from ..files import atomic_folder
from ..registry import FAMILIES, PROBE_TYPE
from .embed import iter_embeddings
from .features import (
    Augmenting,
    Dataset,
    Features,
    batched,
    cache_folder,
    channel_stats,
    chunks,
    extract,
    feature_kind,
    find_classes,
    split,
    warn_duplicates,
)
from .metrics import confusion_matrix, per_class

PROBES = ("linear", "attentive")
PATIENCE = 5  # epochs without a better validation loss before training stops
UNBALANCED = 1.2  # largest class / smallest class above which the loss is weighted per class


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
    output = Path(output).expanduser()
    check_options(model, output, probe, blocks, augment, epochs, batch_size, lr, force)
    lr = lr if lr is not None else (1e-3 if probe == "linear" else 1e-4)
    data = find_classes(data_dir)
    if val_dir is not None:
        train_set, val_set = data, find_classes(val_dir, data.labels, "--val")
    else:
        train_set, val_set = split(data, val_split, seed)

    mx.random.seed(seed)  # the probe's initial weights
    classifier = new_classifier(model, probe, blocks, data.labels)
    folder = cache_folder(model, processor, feature_kind(probe, classifier.config.blocks))
    both = Dataset(data.labels, train_set.paths + val_set.paths, train_set.targets + val_set.targets)
    extracted = extract(classifier, processor, both.paths, image_batch_size, folder, on_features)
    duplicates = warn_duplicates(both, extracted)
    store = Features(extracted.files, memory_budget)
    # rows of `store` (and of the targets) for training and for validation
    tr = [k for k, i in enumerate(extracted.kept) if i < len(train_set.paths)]
    va = [k for k, i in enumerate(extracted.kept) if i >= len(train_set.paths)]
    targets = np.asarray(both.targets, dtype=np.int64)[extracted.kept]
    counts = np.bincount(targets[tr], minlength=len(data.labels))
    if not tr:
        raise AimMlxError("none of the training images could be read")
    if (counts == 0).any():
        raise ConfigError(f"class {data.labels[int(np.argmin(counts))]!r} has no readable training image")

    head = classifier.head
    mean, var = channel_stats(store, tr, batch_size)
    head.bn.running_mean, head.bn.running_var = mx.array(mean), mx.array(var)
    balanced = bool(counts.max() / counts.min() > UNBALANCED)
    weight = len(tr) / (len(counts) * counts) if balanced else np.ones(len(counts))  # per class
    rng = np.random.default_rng(seed)

    def epoch_batches(epoch: int):
        """The epoch's (features, targets) batches in a new order: cached, or augmented crops computed now."""
        order = [tr[k] for k in rng.permutation(len(tr))]
        if not augment:
            return ((store.take(idx), targets[idx]) for idx in chunks(order, batch_size))
        paths = [both.paths[extracted.kept[k]] for k in order]
        crops = iter_embeddings(
            None, Augmenting(processor, seed, epoch), paths, image_batch_size, encode=classifier.features
        )
        return batched(crops, targets[order], batch_size)

    def score(rows):
        return evaluate_rows(head, store, rows, targets[rows], weight, batch_size)

    fitted = fit(
        head,
        epoch_batches,
        score,
        va,
        epochs=epochs,
        steps=epochs * math.ceil(len(tr) / batch_size),
        lr=lr,
        weight_decay=weight_decay,
        weight=weight,
        on_epoch=on_epoch,
    )
    on, rows = ("validation", va) if va else ("training", tr)
    loss, accuracy, predicted = score(rows)
    matrix = confusion_matrix(targets[rows], predicted, len(data.labels))
    facts = {
        "epochs_run": len(fitted.history),
        "best_epoch": fitted.best_epoch,
        "learning_rate": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "seed": seed,
        "val_split": None if val_dir is not None else val_split,
        "val_dir": None if val_dir is None else str(Path(val_dir).expanduser().resolve()),
        "augment": augment,
        "balanced_loss": balanced,
        "class_counts": counts.tolist(),
        "train_images": len(tr),
        "val_images": len(va),
        f"{on}_loss": loss,
        f"{on}_accuracy": accuracy,
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
        balanced_loss=balanced,
        epochs=fitted.history,
        best_epoch=fitted.best_epoch,
        stopped_early=fitted.stopped_early,
        val_loss=loss if va else None,
        val_accuracy=accuracy if va else None,
        per_class=per_class(matrix, data.labels),
        confusion=matrix.tolist(),
        evaluated_on=on,
        forward_images=extracted.computed + (fitted.rows if augment else 0),  # augmented: each row a crop
        feature_seconds=extracted.seconds,
        train_seconds=fitted.seconds,
        token_cache={} if probe == "linear" else {"bytes": store.nbytes, "in_memory": store.in_memory},
        failures=extracted.failures,
    )


def check_options(model, output: Path, probe, blocks, augment, epochs, batch_size, lr, force) -> None:
    """The options, checked before any image is read."""
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
    if (output.exists() or output.is_symlink()) and not force:
        raise ConfigError(f"{output} already exists; pass --force to replace it")
    if model.dims.get("image_size") is None and probe == "attentive":
        raise ConfigError(
            "the attentive probe needs one token grid for every image; the native-resolution checkpoint "
            "gives each image its own: use --probe linear, or a fixed-size checkpoint"
        )


def new_classifier(model, probe: str, blocks, labels: list[str]):
    """A freshly initialised probe on `model` (registry's aimv2-probe family: models/probe.py)."""
    family = FAMILIES["aimv2-probe"]
    dims = model.dims
    raw = {
        "probe": probe,
        "hidden_size": dims["embed_dim"] if probe == "linear" else dims["hidden_size"],
        "labels": labels,
        "num_heads": dims["num_attention_heads"],
        "blocks": blocks,  # normalised by the model: sorted, non-negative
        "base_model": base_record(model),
    }
    return family.model(family.config(raw, {}, None), base=model)


@dataclass
class Fitted:
    history: list[Epoch]
    best_epoch: int
    stopped_early: bool
    rows: int  # feature rows trained on, all epochs together
    seconds: float


def fit(head, epoch_batches, score, va, *, epochs, steps, lr, weight_decay, weight, on_epoch) -> Fitted:
    """AdamW with weight decay on a cosine schedule over `steps` steps, the class-weighted cross-entropy, each
    epoch's batches from `epoch_batches(epoch)`. The training loss and accuracy are those of the epoch's
    batches as they were trained on; after each epoch `score(va)` (loss, accuracy, predictions) scores the
    validation rows. Stops when the validation loss has not improved for PATIENCE epochs, and leaves `head`
    with the best epoch's weights (by training loss without validation)."""
    optimizer = optim.AdamW(learning_rate=optim.cosine_decay(lr, steps), weight_decay=weight_decay)

    def loss_fn(x, y, w):
        logits = head(x)
        return nn.losses.cross_entropy(logits, y, weights=w, reduction="mean"), logits

    step = nn.value_and_grad(head, loss_fn)
    history: list[Epoch] = []
    best = (math.inf, 0, dict(tree_flatten(head.parameters())))
    rows, stopped_early, start = 0, False, time.perf_counter()
    for epoch in range(1, epochs + 1):
        t0, rate = time.perf_counter(), float(optimizer.learning_rate)
        loss_sum = hits = seen = 0
        for x, y in epoch_batches(epoch):
            target = mx.array(y)
            (loss, logits), grads = step(
                mx.array(x, dtype=mx.float32), target, mx.array(weight[y], dtype=mx.float32)
            )
            optimizer.update(head, grads)
            mx.eval(head.parameters(), optimizer.state, loss, logits)
            loss_sum += float(loss) * len(y)
            hits += int((logits.argmax(axis=1) == target).sum())
            seen += len(y)
        rows += seen
        train_loss, train_accuracy = loss_sum / seen, 100 * hits / seen
        val_loss, val_accuracy, _ = score(va) if va else (None, None, None)
        stats = Epoch(
            epoch, train_loss, train_accuracy, val_loss, val_accuracy, rate, time.perf_counter() - t0
        )
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats, epochs)
        watched = val_loss if va else train_loss
        if watched < best[0]:
            best = (watched, epoch, dict(tree_flatten(head.parameters())))
        elif va and epoch - best[1] >= PATIENCE:
            stopped_early = True
            break
    head.update(tree_unflatten(list(best[2].items())))
    return Fitted(history, best[1], stopped_early, rows, time.perf_counter() - start)


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


def evaluate_rows(head, store: Features, rows: list[int], y: np.ndarray, weight, batch_size: int):
    """(loss, accuracy in percent, predicted classes) of `head` on the cached `rows` with targets `y`."""
    logits = [
        np.asarray(head(mx.array(store.take(idx), dtype=mx.float32))) for idx in chunks(rows, batch_size)
    ]
    logits = np.concatenate(logits) if logits else np.zeros((0, len(weight)), np.float32)
    loss = nn.losses.cross_entropy(
        mx.array(logits), mx.array(y), weights=mx.array(weight[y], dtype=mx.float32), reduction="mean"
    )
    predicted = logits.argmax(axis=1)
    return float(loss), float(100 * (predicted == y).mean()) if len(y) else 0.0, predicted


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
