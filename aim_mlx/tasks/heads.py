"""Classification with a trained head (AIMv1's ImageNet-1k attention probe, or a probe `aim-mlx train` fitted,
which carries its own labels): labels, top-k over image files.

Zero-shot classification (a LiT model scoring text labels) is zeroshot.py; both give `Prediction`s.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ConfigError
from ..registry import FAMILIES, OWN_LABELS
from .embed import collect, counting, iter_embeddings
from .zeroshot import Prediction, imagenet_classes, imagenet_wnids, top_k_softmax

LABEL_SETS = {"imagenet-1k": imagenet_classes}
LABEL_IDS = {"imagenet-1k": imagenet_wnids}  # each label set's class ids, in the same order


def has_head(model) -> bool:
    """Whether `model` classifies with a trained head (its family's `classes`)."""
    return FAMILIES[model.family].classes is not None


def head_labels(model) -> list[str]:
    """The labels of the head's outputs, in output order."""
    name = FAMILIES[model.family].classes
    if name is None:
        source = model.info.source if model.info is not None else "this model"
        raise ConfigError(f"{source} has no classification head; give labels to classify zero-shot")
    labels = list(model.labels) if name == OWN_LABELS else LABEL_SETS[name]()
    if len(labels) != model.dims["num_classes"]:
        raise ConfigError(
            f"the head scores {model.dims['num_classes']} classes, but its label set {name} has {len(labels)}"
        )
    return labels


def distinct_head_labels(model) -> list[str]:
    """`head_labels` with every name distinct, for a label -> probability table (a Core ML classifier): a
    name that repeats (CLIP's ImageNet names hold 'missile' and 'sunglasses' twice) carries its class id in
    each place, e.g. 'missile (n03773504)'."""
    if FAMILIES[model.family].classes == OWN_LABELS:  # folder names: distinct already (tasks/train.py)
        return head_labels(model)
    labels, ids = head_labels(model), LABEL_IDS[FAMILIES[model.family].classes]()
    repeated = {label for label in labels if labels.count(label) > 1}
    return [f"{label} ({i})" if label in repeated else label for label, i in zip(labels, ids, strict=True)]


CLI_LABEL_OPTIONS = "--labels, --labels-file, --imagenet and --template(s)"
IMAGENET_HEAD_AND_LABELS = (
    "{model} classifies into the ImageNet-1k classes of its trained head; drop {options}, which are for "
    "zero-shot (LiT) models"
)


def labels_conflict(model, name: str, options: str = CLI_LABEL_OPTIONS) -> str:
    """The error for zero-shot labels given with a head: what each of the two ways classifies, and how.
    `options`: what the caller calls the zero-shot inputs (the CLI's flags, or an API's fields)."""
    if FAMILIES[model.family].classes != OWN_LABELS:
        return IMAGENET_HEAD_AND_LABELS.format(model=name, options=options)
    labels = head_labels(model)
    shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
    base = model.base.info.source if model.base.info is not None else "its base model"
    zero_shot = (
        f"classify zero-shot with its base model: -m {base} --labels ..."
        if FAMILIES[model.base.family].text
        else "zero-shot labels need a LiT model (apple/aimv2-large-patch14-224-lit)"
    )
    return (
        f"{name} is a trained head over its {len(labels)} classes ({shown}): drop {options} to classify "
        f"into them, or {zero_shot}"
    )


def classify(model, pixels: mx.array, top_k: int = 5) -> list[Prediction]:
    """Top-k labels with softmax probabilities for a batch of preprocessed (B, H, W, 3) pixels."""
    labels = head_labels(model)
    logits = np.asarray(model.classify(pixels).astype(mx.float32))  # (B, classes)
    return top_k_softmax(logits, labels, top_k)


def classify_files(
    model, processor, paths, top_k: int = 5, batch_size: int = 8, progress=None
) -> tuple[list[tuple[Path, Prediction]], list[tuple[Path, str]]]:
    """`classify` over image files, each unreadable image skipped:
    ([(path, prediction)], [(path, reason)]). `progress(images done, images in all)` is called after each
    image, a failed one too."""
    labels = head_labels(model)
    paths = list(paths)
    items = iter_embeddings(model, processor, paths, batch_size)  # encode_image: the head's features
    result = collect(items, counting(progress, len(paths)))
    if not result.paths:
        return [], result.failures
    features = mx.array(np.stack(result.embeddings))  # (B, D)
    logits = np.asarray(model.logits(features).astype(mx.float32))  # (B, classes)
    preds = top_k_softmax(logits, labels, top_k)
    return list(zip(result.paths, preds, strict=True)), result.failures
