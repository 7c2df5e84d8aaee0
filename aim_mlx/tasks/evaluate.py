"""ImageNet-1k accuracy over an ImageFolder-layout validation set: top-1 and top-5 for AIMv1 heads and LiT;
and any trained head's accuracy on class folders named by its labels (`evaluate_folder`).

The set is one folder per class, named by WordNet id (n01440764) or by class index (0-999); images inside
may be nested. Fewer than 1000 class folders is a subset: predictions are still over all classes, and the
report says so. The scores are the head's logits (AIMv1) or logit_scale * cosine similarity to the classes'
prompt embeddings (LiT, zeroshot.text_classifier); an unreadable image is skipped and counted.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..checkpoints.variants import AIMV1_TOP1, aimv1_probe_layers, aimv1_size, find_variant
from ..errors import ConfigError
from ..inputs.images import find_images
from ..registry import FAMILIES, OWN_LABELS
from .embed import collect, counting, iter_embeddings
from .features import find_classes
from .heads import has_head, head_labels
from .metrics import confusion_matrix, per_class, top_k_accuracy
from .zeroshot import imagenet_classes, imagenet_wnids, text_classifier

Progress = Callable[[int, int], None]  # (items done, items in all)
CLASSES = 1000


def class_index(name: str, wnids: dict[str, int]) -> int | None:
    """A class folder's index: its WordNet id's (`wnids`: id -> index), or the index it is named by; None if
    neither."""
    if name.isdigit() and int(name) < len(wnids) and str(int(name)) == name:
        return int(name)
    return wnids.get(name)


def find_samples(root: Path) -> tuple[list[Path], list[int]]:
    """The images of an ImageFolder-layout set and their class indices, classes in folder order."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--data {root} is not a folder; give the validation set's folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConfigError(
            f"{root} has no class folders; expected one folder per class, named by WordNet id (n01440764) "
            "or class index (0-999)"
        )
    wnids = {wnid: index for index, wnid in enumerate(imagenet_wnids())}
    seen: dict[int, str] = {}
    paths, labels = [], []
    for folder in folders:
        index = class_index(folder.name, wnids)
        if index is None:
            raise ConfigError(
                f"class folder {folder.name!r} in {root} is neither an ImageNet-1k WordNet id (e.g. "
                "n01440764) nor a class index 0-999"
            )
        if index in seen:
            raise ConfigError(f"class folders {seen[index]!r} and {folder.name!r} are both class {index}")
        seen[index] = folder.name
        images = find_images([folder])
        paths += images
        labels += [index] * len(images)
    if not paths:
        raise ConfigError(f"no images in the {len(folders)} class folders of {root}")
    return paths, labels


@dataclass
class Report:
    model: str
    revision: str | None
    method: str  # "head" (AIMv1) or "zero-shot" (LiT)
    images: int  # evaluated, the failed ones not included
    classes: int  # class folders with images
    top1: float  # percent
    top5: float
    failed: int
    seconds: float
    images_per_s: float
    subset: bool  # fewer than 1000 classes
    published_top1: float | None  # the published figure for this checkpoint, if known
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["failures"] = [{"path": path, "error": error} for path, error in self.failures]
        return out


def method(model) -> str:
    """How `model` classifies ImageNet: "head" or "zero-shot"; a model with neither is refused in one line."""
    return check_family(model.family, model.info.source if model.info is not None else "this model")


def check_family(family: str, source: str) -> str:
    """How a model `family` classifies ImageNet: "head" or "zero-shot"; neither is a ConfigError."""
    if FAMILIES[family].classes == OWN_LABELS:
        raise ConfigError(
            f"{source} is a head trained on its own classes, not ImageNet's; measure it with "
            "aim-mlx eval folder"
        )
    if FAMILIES[family].classes is not None:
        return "head"
    if FAMILIES[family].text:
        return "zero-shot"
    raise ConfigError(
        f"{source} has neither a classification head nor a text tower to classify with; evaluate an AIMv1 "
        "classifier (apple/aim-600M) or the LiT model (apple/aimv2-large-patch14-224-lit)"
    )


def published_top1(model) -> float | None:
    """The published ImageNet-1k top-1 of a known checkpoint: AIMv1's head (best or last layers; a converted
    folder is known by its published size) or LiT's zero-shot figure."""
    variant = find_variant(model.info.source) if model.info is not None else None
    if model.family == "aimv1":
        dims = model.dims
        size = aimv1_size(dims["hidden_size"], dims["num_hidden_layers"]) if variant is None else variant.size
        if size is None:
            return None
        best = dims["probe_layers"] == list(aimv1_probe_layers(size, "best"))
        return AIMV1_TOP1[size][0 if best else 1]
    return variant.published_top1 if variant is not None and variant.lit else None


def scorer(model, processor, templates: Sequence[str], progress: Progress | None = None):
    """A function from image embeddings (B, D) to logits over all classes (B, classes). LiT: the classes'
    prompts are encoded first (or read from the cache), `progress(prompts done, prompts in all)` called
    after each batch of them; a head needs nothing, and `progress` is not called."""
    if method(model) == "head":
        return lambda emb: np.asarray(model.logits(mx.array(emb)).astype(mx.float32))  # (B, classes)
    classes = imagenet_classes()
    classifier = text_classifier(model, processor, classes, templates, progress=progress)  # (L, P)
    scale = float(model.logit_scale)
    return lambda emb: scale * emb @ classifier.T  # (B, L)


def evaluate(
    model,
    processor,
    paths: Sequence[Path],
    labels: Sequence[int],
    score: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 8,
    progress: Progress | None = None,
) -> Report:
    """Top-1 and top-5 accuracy (percent) of `model` on `paths` with true class indices `labels`, `score`
    (`scorer`'s) turning image embeddings into logits."""
    truth = dict(zip(paths, labels, strict=True))
    start = time.perf_counter()
    hits1 = hits5 = 0
    failures = []
    batch_emb, batch_labels = [], []

    def flush() -> None:
        nonlocal hits1, hits5
        logits = score(np.stack(batch_emb))  # (B, classes)
        top5 = np.argsort(-logits, axis=-1, kind="stable")[:, :5]  # (B, 5), best first
        target = np.asarray(batch_labels)[:, None]
        hits1 += int((top5[:, :1] == target).sum())
        hits5 += int((top5 == target).any(axis=-1).sum())
        batch_emb.clear()
        batch_labels.clear()

    for done, item in enumerate(iter_embeddings(model, processor, paths, batch_size), start=1):
        if item.error is not None:
            failures.append((str(item.path), item.error))
        else:
            batch_emb.append(item.embedding)
            batch_labels.append(truth[item.path])
            if len(batch_emb) == batch_size:
                flush()
        if progress is not None:
            progress(done, len(paths))
    if batch_emb:
        flush()
    seconds = time.perf_counter() - start
    evaluated = len(paths) - len(failures)
    classes = len(set(labels))
    return Report(
        model=model.info.source if model.info is not None else "",
        revision=model.info.revision if model.info is not None else None,
        method=method(model),
        images=evaluated,
        classes=classes,
        top1=100 * hits1 / evaluated if evaluated else 0.0,
        top5=100 * hits5 / evaluated if evaluated else 0.0,
        failed=len(failures),
        seconds=seconds,
        images_per_s=len(paths) / seconds if seconds else 0.0,
        subset=classes < CLASSES,
        published_top1=published_top1(model),
        failures=failures,
    )


@dataclass
class FolderReport:
    model: str
    labels: list[str]
    images: int  # evaluated, the failed ones not included
    top1: float  # percent
    top5: float
    per_class: list[dict]  # label, precision, recall (percent), support
    confusion: list[list[int]]  # rows: true class (the head's label order), columns: predicted
    failed: int
    seconds: float
    images_per_s: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["failures"] = [{"path": path, "error": error} for path, error in self.failures]
        return out


def evaluate_folder(model, processor, root: Path, batch_size: int = 8, progress: Progress | None = None):
    """A trained head (`aim-mlx train`'s, or AIMv1's) on class folders named by its labels: top-1, top-5,
    per-class precision and recall, and the confusion matrix. A folder may hold a subset of the classes."""
    if not has_head(model):
        source = model.info.source if model.info is not None else "this model"
        raise ConfigError(f"{source} has no trained head; eval folder takes a head folder from aim-mlx train")
    labels = head_labels(model)
    data = find_classes(root, labels, "--data")
    truth = dict(zip(data.paths, data.targets, strict=True))
    start = time.perf_counter()
    items = iter_embeddings(model, processor, data.paths, batch_size)
    result = collect(items, counting(progress, len(data.paths)))
    seconds = time.perf_counter() - start
    logits = np.zeros((0, len(labels)), np.float32)
    if result.paths:
        logits = np.asarray(model.logits(mx.array(np.stack(result.embeddings))).astype(mx.float32))
    y = np.asarray([truth[p] for p in result.paths], dtype=np.int64)
    matrix = confusion_matrix(y, logits.argmax(axis=1), len(labels))
    return FolderReport(
        model=model.info.source if model.info is not None else "",
        labels=labels,
        images=len(result.paths),
        top1=top_k_accuracy(logits, y, 1),
        top5=top_k_accuracy(logits, y, 5),
        per_class=per_class(matrix, labels),
        confusion=matrix.tolist(),
        failed=len(result.failures),
        seconds=seconds,
        images_per_s=len(data.paths) / seconds if seconds else 0.0,
        failures=[(str(p), e) for p, e in result.failures],
    )
