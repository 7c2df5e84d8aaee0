"""Zero-shot classification with a LiT model: label sets, prompt templates, a cached text classifier.

A label's text embedding is the mean of its normalised prompt embeddings (one per template), normalised
again: CLIP's prompt ensemble. The (labels x dim) matrix is cached on disk under aim-mlx's cache directory
(files.cache_dir), keyed by the model's identity (`model.info.key`: source, revision or weight files, dtype,
quantization), the labels and the templates, so a repeated label set costs one image forward.
"""

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ConfigError
from ..files import atomic_file, cache_dir
from ..log import logger
from ..registry import require_text
from .embed import collect, counting, iter_embeddings

DEFAULT_TEMPLATE = "a photo of a {}."
Progress = Callable[[int, int], None]  # (prompts done, prompts in all)
CACHE_VERSION = 1


@cache
def _data(name: str) -> tuple[str, ...]:
    return tuple(json.loads(resources.files("aim_mlx").joinpath("data", name).read_text(encoding="utf-8")))


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names as CLIP's prompt-engineering notebook wrote them (two repeat)."""
    return list(_data("imagenet_classes.json"))


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted, as torchvision's ImageFolder orders
    the training folders, which is the order the published heads were trained with)."""
    return list(_data("imagenet_wnids.json"))


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates, `{}` standing for the class name."""
    return list(_data("imagenet_templates.json"))


def check_labels(labels: Sequence[str], allow_duplicates: bool = False) -> list[str]:
    labels = [label.strip() for label in labels]
    if not labels:
        raise ConfigError("no labels given; pass some, e.g. --labels 'cat,dog'")
    if empty := [i + 1 for i, label in enumerate(labels) if not label]:
        raise ConfigError(f"label {empty[0]} is empty; remove the stray comma or blank line")
    if not allow_duplicates:
        seen = set()
        for label in labels:
            if label.lower() in seen:
                raise ConfigError(f"label {label!r} is given twice; each label must be distinct")
            seen.add(label.lower())
    return labels


def check_templates(templates: Sequence[str]) -> list[str]:
    templates = list(templates)
    if not templates:
        raise ConfigError("no prompt templates given; use e.g. 'a photo of a {}.'")
    for template in templates:
        if template.count("{}") != 1:
            raise ConfigError(
                f"template {template!r} must contain exactly one {{}} where the label goes, "
                "e.g. 'a photo of a {}.'"
            )
    return templates


def label_set(labels: str | None, labels_file: Path | None, imagenet: bool) -> list[str]:
    """The labels of exactly one source: comma-separated, a file with one per line, or ImageNet-1k's."""
    if (labels is not None) + (labels_file is not None) + imagenet != 1:
        raise ConfigError("give exactly one of --labels, --labels-file or --imagenet")
    if imagenet:
        return check_labels(imagenet_classes(), allow_duplicates=True)  # CLIP's names repeat two
    if labels_file is not None:
        try:
            names = Path(labels_file).read_text(encoding="utf-8-sig").splitlines()  # an editor's BOM goes
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --labels-file {labels_file} ({exc})") from None
        while names and not names[-1].strip():  # a trailing newline is not an empty label
            names.pop()
        return check_labels(names)
    return check_labels(labels.split(","))


def template_set(template: str | None, ensemble: str | None) -> list[str]:
    """One template (default 'a photo of a {}.') or a named ensemble ('imagenet': CLIP's 80)."""
    if template is not None and ensemble is not None:
        raise ConfigError("give --template or --templates, not both")
    if ensemble not in (None, "imagenet"):
        raise ConfigError(f"unknown template set {ensemble!r}; the one available is imagenet")
    return check_templates(imagenet_templates() if ensemble else [template or DEFAULT_TEMPLATE])


def cache_key(model_key: str, labels: Sequence[str], templates: Sequence[str], dtype: str) -> str:
    payload = json.dumps([CACHE_VERSION, model_key, dtype, list(labels), list(templates)])
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_cache(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            emb = f["embeddings"]
    except FileNotFoundError:
        return None
    except Exception as exc:  # truncated, not an npz, wrong keys: rebuild it
        logger.warning("ignoring unreadable text-embedding cache %s (%s); rebuilding it", path, exc)
        return None
    if emb.shape != shape or not np.isfinite(emb).all():
        logger.warning("ignoring text-embedding cache %s of shape %s; rebuilding it", path, emb.shape)
        return None
    return emb


def _write_cache(path: Path, emb: np.ndarray) -> None:
    """Written whole or not at all (atomic_file): a reader never sees half a file."""
    try:
        with atomic_file(path) as tmp:
            np.savez(tmp, embeddings=emb)
    except OSError as exc:  # a read-only or full cache costs speed, not correctness
        logger.warning("could not write the text-embedding cache %s (%s)", path, exc)


def encode_prompts(
    model, processor, labels, templates, batch_size: int = 256, progress: Progress | None = None
) -> np.ndarray:
    """(labels, dim) float32: per label, the renormalised mean of its normalised template embeddings.
    `progress(done, total)` is called after each batch of prompts."""
    prompts = [template.format(label) for label in labels for template in templates]
    ids, _ = processor.tokenizer.encode(prompts)  # (N, 77); warns about any truncated prompt
    # Batches of similar length: encode_text computes only up to a batch's longest prompt.
    order = np.argsort((ids == processor.tokenizer.eos_id).argmax(axis=-1), kind="stable")
    emb = np.empty((len(prompts), model.config.projection_dim), np.float32)
    for start in range(0, len(ids), batch_size):
        rows = order[start : start + batch_size]
        emb[rows] = np.asarray(model.encode_text(ids[rows]).astype(mx.float32))  # (b, P), normalised
        if progress is not None:
            progress(start + len(rows), len(prompts))
    emb = emb.reshape(len(labels), len(templates), -1).mean(axis=1)  # (L, P)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def text_classifier(
    model, processor, labels, templates, cache: bool = True, progress: Progress | None = None
) -> np.ndarray:
    """The labels' embeddings (L, P). With `cache`, read from (or written to) the disk cache, keyed by the
    model's identity (`model.info.key`, which `aim_mlx.load` sets; a model built otherwise is not cached).
    `progress(done, total)` follows the prompts when they have to be encoded."""
    if not (cache and model.info is not None):
        return encode_prompts(model, processor, labels, templates, progress=progress)
    dtype = str(model.log_logit_scale.dtype)  # the compute dtype (a quantized projector stores uint32)
    path = cache_dir("text-embeddings") / f"{cache_key(model.info.key, labels, templates, dtype)}.npz"
    emb = _read_cache(path, (len(labels), model.config.projection_dim))
    if emb is None:
        emb = encode_prompts(model, processor, labels, templates, progress=progress)
        _write_cache(path, emb)
    else:
        logger.info("text embeddings of %d labels from %s", len(labels), path)
    return emb


@dataclass
class Prediction:
    labels: list[str]  # top-k, best first
    probs: list[float]

    def to_list(self) -> list[dict]:
        return [{"label": label, "prob": p} for label, p in zip(self.labels, self.probs, strict=True)]


def zero_shot(
    model,
    processor,
    images,
    labels: Sequence[str],
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    top_k: int = 5,
    cache: bool = True,
    allow_duplicate_labels: bool = False,
) -> list[Prediction]:
    """Classify each image among `labels`: softmax over logit_scale * cosine similarity, top-k per image.

    `images`: paths, PIL images or arrays (see ImageProcessor), or an (B, H, W, 3) pixel array already
    preprocessed. `templates`: prompts with `{}` for the label, averaged per label (imagenet_templates()
    gives CLIP's 80). `cache`: keep the labels' text embeddings on disk (aim-mlx's cache directory, keyed by
    the model's identity, the labels and the templates), so that the same labels cost nothing next time.
    """
    require_text(model, "classify zero-shot")
    labels = check_labels(labels, allow_duplicates=allow_duplicate_labels)
    templates = check_templates(templates)
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    classifier = text_classifier(model, processor, labels, templates, cache)  # (L, P)
    pixels = images if isinstance(images, mx.array) else processor(images)
    image = np.asarray(model.encode_image(pixels).astype(mx.float32))  # (B, P)
    return predict(image, classifier, labels, float(model.logit_scale), top_k)


def predict(image: np.ndarray, classifier: np.ndarray, labels, logit_scale: float, top_k: int) -> list:
    """Top-k labels per image from normalised image (B, P) and label (L, P) embeddings."""
    return top_k_softmax(logit_scale * image @ classifier.T, labels, top_k)  # logits (B, L)


def top_k_softmax(logits: np.ndarray, labels, top_k: int) -> list[Prediction]:
    """Per row of (B, L) logits: the top-k labels with their softmax probabilities, best first."""
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    k = min(top_k, len(labels))
    out = []
    for row in probs:
        best = np.argsort(-row, kind="stable")[:k]
        out.append(Prediction([labels[i] for i in best], [float(row[i]) for i in best]))
    return out


def classify_files(
    model,
    processor,
    paths,
    labels,
    classifier: np.ndarray,
    top_k: int = 5,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[list[tuple[Path, Prediction]], list[tuple[Path, str]]]:
    """`zero_shot` over image files against the labels' `text_classifier` (L, P), each unreadable image
    skipped: ([(path, prediction)], [(path, reason)]). `progress(images done, images in all)` is called
    after each image, a failed one too."""
    require_text(model, "classify zero-shot")
    paths = list(paths)
    result = collect(iter_embeddings(model, processor, paths, batch_size), counting(progress, len(paths)))
    if not result.paths:
        return [], result.failures
    image = np.stack(result.embeddings)  # (B, P), normalised
    preds = predict(image, classifier, labels, float(model.logit_scale), top_k)
    return list(zip(result.paths, preds, strict=True)), result.failures
