"""The models a server holds: their names, loading (at start, or on first use), turning an input into what
the model takes (on decoding threads) and batches into embeddings (on the one model thread).

All MLX work (loads and forward passes, for every model) runs on one thread, so MLX is never used from two
threads at once; images are decoded and texts tokenized on a small pool beside it while the model runs.
"""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from aim_mlx.checkpoints.variants import find_variant
from aim_mlx.errors import AimMlxError, ConfigError, ImageError
from aim_mlx.inputs.images import load_image_bytes
from aim_mlx.registry import require_text

from .batcher import Batcher
from .parse import ApiError, Item

CLASSIFIERS = 16  # zero-shot label sets kept in memory per model (and on disk, as the CLI keeps them)


def names(spec: str) -> tuple[str, str]:
    """(id, short name) of a --model: a hub id as the variant table spells it and the part after the
    owner, or a folder as given and its name."""
    if Path(spec).expanduser().is_dir():
        return spec, Path(spec).expanduser().resolve().name
    variant = find_variant(spec)
    model_id = variant.repo_id if variant else spec
    return model_id, model_id.rsplit("/", 1)[-1]


class Held:
    """One model: loaded (or not yet, with --lazy), and its batcher."""

    def __init__(self, spec: str, load, executor, batch_size: int, wait: float, capacity: int):
        self.spec, self.load = spec, load
        self.id, self.short = names(spec)
        self.folder = Path(spec).expanduser().is_dir()
        self.model = self.processor = None
        self.loading: asyncio.Future | None = None
        self.classifiers: dict[tuple, tuple[np.ndarray, float]] = {}  # (labels, templates) -> zero-shot set
        self.executor = executor
        self.batcher = Batcher(self.forward, executor, batch_size, wait, capacity)

    def load_now(self) -> None:
        """Load on the calling thread (at start, on the model thread)."""
        self.model, self.processor = self.load(self.spec)

    async def ready(self) -> None:
        """Loaded, on the model thread, once however many requests ask at the same time."""
        if self.model is not None:
            return
        if self.loading is None or (self.loading.done() and self.loading.exception() is not None):
            self.loading = asyncio.ensure_future(
                asyncio.get_running_loop().run_in_executor(self.executor, self.load_now)
            )
        try:
            await asyncio.shield(self.loading)
        except AimMlxError as exc:
            raise ApiError(
                500, f"{self.id} could not be loaded: {exc}", "model", "model_load_failed", "server_error"
            ) from None

    @property
    def dimensions(self) -> int:
        return self.model.dims["embed_dim"]

    def check_dimensions(self, wanted: int | None) -> None:
        if wanted is not None and wanted != self.dimensions:
            raise ApiError(
                400,
                f"dimensions={wanted} cannot be honoured: {self.id} gives {self.dimensions}-dimensional "
                f"embeddings, which it was not trained to shorten; leave dimensions out or pass "
                f"{self.dimensions}",
                "dimensions",
            )

    def check_texts(self, items: list[Item]) -> None:
        """A 400 naming the first text among `items` if the model has no text tower; before any decoding, so
        that the error is the same whichever input a decoding thread reaches first."""
        first = next((i for i, item in enumerate(items) if item.kind == "text"), None)
        if first is not None:
            try:
                require_text(self.model, "embed texts")
            except ConfigError as exc:
                raise ApiError(
                    400, f"input[{first}] is a text, but {exc}", "input", "text_not_supported"
                ) from None

    def prepare(self, item: Item, index: int, truncate: bool) -> tuple[np.ndarray, int]:
        """An item as the model takes it, and its token count (0 for an image). On a decoding thread."""
        where = f"input[{index}]"
        if item.kind == "image":
            try:
                return self.processor.preprocess_one(load_image_bytes(item.value, where)), 0
            except ImageError as exc:
                raise ApiError(400, str(exc), "input", "invalid_image") from None
        tokenizer = self.processor.tokenizer
        ids, truncated = tokenizer.encode([item.value])
        if truncated and not truncate:
            count = len(tokenizer.backend.encode(item.value, add_special_tokens=False).ids) + 2
            raise ApiError(
                400,
                f"{where} is {count} tokens; {self.id} reads at most {tokenizer.context_length}: shorten it, "
                'or leave out "truncate": false to have it cut as the CLI cuts it',
                "input",
                "context_length_exceeded",
            )
        return ids[0], int(np.argmax(ids[0] == tokenizer.eos_id)) + 1

    def zero_shot_set(self, labels: list[str], templates) -> tuple[list[str], list[str]]:
        """The labels and prompt templates of a zero-shot request, checked as the CLI checks them."""
        from aim_mlx.tasks.heads import has_head, labels_conflict
        from aim_mlx.tasks.zeroshot import DEFAULT_TEMPLATE, check_labels, check_templates, imagenet_templates

        if has_head(self.model):
            raise ApiError(400, labels_conflict(self.model, self.id, '"labels" and "templates"'), "labels")
        try:
            require_text(self.model, "classify zero-shot")
        except ConfigError as exc:
            raise ApiError(400, str(exc), "model", "text_not_supported") from None
        try:
            labels = check_labels(labels)
        except ConfigError as exc:
            raise ApiError(400, str(exc).replace("--labels", '"labels"'), "labels") from None
        try:
            chosen = imagenet_templates() if templates == "imagenet" else templates or [DEFAULT_TEMPLATE]
            return labels, check_templates(chosen)
        except ConfigError as exc:
            raise ApiError(400, str(exc), "templates") from None

    def head_labels(self) -> list[str]:
        """The classes of the model's trained head (an AIMv1 head, or one `aim-mlx train` made), or a 400."""
        from aim_mlx.tasks.heads import head_labels

        try:
            return head_labels(self.model)
        except ConfigError as exc:
            raise ApiError(400, f'{exc} ("labels")', "labels") from None

    def classifier(self, labels: list[str], templates: list[str]) -> tuple[np.ndarray, float]:
        """The labels' (L, P) text embeddings and the logit scale. On the model thread: kept in memory,
        else read from the disk cache `aim-mlx classify` fills, else encoded (and cached)."""
        from aim_mlx.tasks.zeroshot import text_classifier

        key = (tuple(labels), tuple(templates))
        if key not in self.classifiers:
            if len(self.classifiers) >= CLASSIFIERS:
                self.classifiers.pop(next(iter(self.classifiers)))
            embeddings = text_classifier(self.model, self.processor, labels, templates)
            self.classifiers[key] = embeddings, float(self.model.logit_scale)
        return self.classifiers[key]

    def forward(self, kind: str, arrays: list[np.ndarray]) -> np.ndarray:
        """(B, D) float32 rows, as encode_image / encode_text give them, or a head's logits (kind "head":
        classify). On the model thread."""
        import mlx.core as mx

        batch = np.stack(arrays)  # (B, H, W, 3) pixels or (B, L) token ids
        if kind == "text":
            out = self.model.encode_text(batch)
        else:
            out = (self.model.classify if kind == "head" else self.model.encode_image)(mx.array(batch))
        return np.asarray(out.astype(mx.float32))


class Models:
    """The --model list: each answers to its id and its short name (case aside)."""

    def __init__(self, specs, load=None, batch_size=8, wait=0.005, capacity=512, lazy=False):
        if load is None:
            from aim_mlx import load
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.decoders = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="decode")
        self.held = [Held(spec, load, self.executor, batch_size, wait, capacity) for spec in specs]
        seen = {}
        for held in self.held:
            for name in {held.id.lower(), held.short.lower()}:
                if name in seen:
                    raise ConfigError(
                        f"--model {held.spec} and {seen[name]} share the name {name!r}; serve one of them"
                    )
                seen[name] = held.spec
        self.by_name = {name: held for held in self.held for name in (held.id.lower(), held.short.lower())}
        if not lazy:
            try:
                for held in self.held:
                    self.executor.submit(held.load_now).result()
            except BaseException:
                self.close()
                raise

    def find(self, name: str) -> Held:
        held = self.by_name.get(name.lower())
        if held is None:
            known = ", ".join(h.id for h in self.held)
            raise ApiError(
                404, f"no model {name!r} here; this server has: {known}", "model", "model_not_found"
            )
        return held

    def close(self) -> None:
        for held in self.held:
            held.batcher.stop()
        self.decoders.shutdown(wait=False, cancel_futures=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
