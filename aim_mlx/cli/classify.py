"""`aim-mlx classify`: labels per image, over tasks.heads (a trained head) or tasks.zeroshot (LiT)."""

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from ..checkpoints.variants import DEFAULT_TEXT_MODEL
from ..errors import ConfigError
from .common import (
    BatchSize,
    DTypeOpt,
    Images,
    Json,
    ProbeOpt,
    Revision,
    Templates,
    all_failed,
    image_paths,
    load,
    model_option,
    partial,
    progress,
    rate_column,
    say,
    value,
    warn,
)

EXAMPLES = [
    "aim-mlx classify photo.jpg --labels 'cat,dog,horse'",
    "aim-mlx classify photo.jpg -m apple/aim-600M",
    "aim-mlx classify photo.jpg -m birds-head  # a head from aim-mlx train",
    "aim-mlx classify ~/Pictures --imagenet --top-k 3 --json",
    "aim-mlx classify a.jpg --labels-file labels.txt --template 'a {} drawing'",
]


def classify(
    images: Images = None,
    labels: Annotated[
        str | None,
        typer.Option(
            metavar="LABELS",
            help="Comma-separated labels, e.g. 'cat,dog,horse'. For labels that contain commas, use "
            "--labels-file.",
        ),
    ] = None,
    labels_file: Annotated[
        Path | None, typer.Option(metavar="FILE", help="A UTF-8 text file, one label per line.")
    ] = None,
    imagenet: Annotated[bool, typer.Option("--imagenet", help="The 1000 ImageNet-1k classes.")] = False,
    template: Annotated[
        str | None,
        typer.Option(
            metavar="TEMPLATE", help="Prompt with {} where the label goes. Default: 'a photo of a {}.'"
        ),
    ] = None,
    templates: Annotated[
        Templates | None, typer.Option(help="imagenet: CLIP's 80 ImageNet prompts, averaged per label.")
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, metavar="K", help="Labels shown per image.")] = 5,
    model: Annotated[
        str,
        model_option(
            "A zero-shot (LiT) checkpoint, an AIMv1 classifier (apple/aim-600M, ...) or a head folder "
            "from aim-mlx train: hub id or local folder.",
            DEFAULT_TEXT_MODEL,
        ),
    ] = DEFAULT_TEXT_MODEL,
    revision: Revision = None,
    dtype: DTypeOpt = None,
    batch_size: BatchSize = 8,
    json: Json = False,
    probe: ProbeOpt = None,
):
    """Classify images zero-shot (LiT) or with a trained head.

    IMAGES are image files and folders (walked recursively); each gets its top-k labels with their
    probabilities. Zero-shot label embeddings are cached on disk (AIM_MLX_CACHE, default ~/.cache/aim-mlx),
    so a repeated label set costs about one image forward. An AIMv1 model (-m apple/aim-600M) scores the
    1000 ImageNet-1k classes of its attention-probe head and takes no labels; so does a head folder from
    `aim-mlx train`, over its own classes. Unreadable images are named on
    stderr and skipped; the others are still classified (exit code 3), and --json lists them with their error.
    """
    from ..checkpoints.variants import find_variant
    from ..registry import FAMILIES
    from ..tasks.heads import CLI_LABEL_OPTIONS, IMAGENET_HEAD_AND_LABELS, has_head

    label_options = (labels, labels_file, imagenet or None, template, templates)
    zero_shot = any(option is not None for option in label_options)
    variant = None if Path(model).expanduser().is_dir() else find_variant(model)
    head = variant is not None and FAMILIES[variant.family].classes is not None
    if head and zero_shot:
        raise ConfigError(IMAGENET_HEAD_AND_LABELS.format(model=model, options=CLI_LABEL_OPTIONS))
    # Known to be zero-shot (labels given, or a known id without a head): check the labels before loading.
    asked = _labels(*label_options) if not head and (zero_shot or variant) else None
    paths = image_paths(images)
    net, processor = load(model, revision, dtype, probe)
    if has_head(net):
        from ..tasks.heads import classify_files, labels_conflict

        if zero_shot:
            raise ConfigError(labels_conflict(net, model))

        with _image_bar(len(paths)) as advance:
            predictions, failures = classify_files(net, processor, paths, top_k, batch_size, advance)
    else:
        names, prompts = asked or _labels(*label_options)
        predictions, failures = _zero_shot(net, processor, paths, names, prompts, top_k, batch_size)
    for _, reason in failures:
        say(f"skipped {reason}")
    if not predictions:
        raise all_failed(len(paths))
    rows = in_input_order(paths, predictions, failures)
    if json:
        import json as json_module

        typer.echo(json_module.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            if "predictions" in row:  # the failed ones were named on stderr
                typer.echo(row["path"])
                for pred in row["predictions"]:
                    typer.echo(f"  {pred['prob']:7.2%}  {pred['label']}")
    if failures:
        raise partial(len(failures), len(paths))


def in_input_order(paths, predictions, failures) -> list[dict]:
    """One row per input image: {"path", "predictions"} or {"path", "error"}. Both lists follow the input
    order, so they are merged by walking the inputs."""
    done, failed = iter(predictions), iter(failures)
    next_done, next_failed = next(done, None), next(failed, None)
    rows = []
    for path in paths:
        if next_failed is not None and next_failed[0] == path:
            rows.append({"path": str(path), "error": next_failed[1]})
            next_failed = next(failed, None)
        else:
            rows.append({"path": str(path), "predictions": next_done[1].to_list()})
            next_done = next(done, None)
    return rows


def _labels(labels, labels_file, imagenet, template, templates) -> tuple[list[str], list[str]]:
    """The zero-shot label set and prompts, checked."""
    from ..tasks import zeroshot

    names = zeroshot.label_set(labels, labels_file, bool(imagenet))
    prompts = zeroshot.template_set(template, value(templates))
    if len(names) == 1:
        warn("with one label every probability is 100%; give two or more labels to compare")
    return names, prompts


def _zero_shot(net, processor, paths, names, prompts, top_k, batch_size):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ..registry import require_text
    from ..tasks import zeroshot

    require_text(net, "classify zero-shot")
    columns = (TextColumn("encoding prompts"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with progress(*columns) as bar:  # shows only while prompts are encoded
        task = bar.add_task("prompts", total=len(names) * len(prompts), visible=False)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, visible=total > 256)  # more than one batch

        classifier = zeroshot.text_classifier(net, processor, names, prompts, progress=advance)
    with _image_bar(len(paths)) as advance:
        return zeroshot.classify_files(
            net, processor, paths, names, classifier, top_k, batch_size, progress=advance
        )


@contextmanager
def _image_bar(total: int):
    """A per-image progress bar (images done / in all, rate, time left); yields its `progress` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    columns = (TextColumn("classifying"), BarColumn(), MofNCompleteColumn(), rate_column("images"))
    with progress(*columns, TimeRemainingColumn()) as bar:
        task = bar.add_task("images", total=total)
        yield lambda done, _: bar.update(task, completed=done)
