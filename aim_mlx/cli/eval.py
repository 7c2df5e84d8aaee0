"""`aim-mlx eval imagenet`: top-1 / top-5 on an ImageNet-layout folder; `aim-mlx eval folder`: a trained
head on class folders named by its labels; both over aim_mlx.tasks.evaluate."""

import json as json_module
from pathlib import Path
from typing import Annotated

import typer

from ..checkpoints.variants import DEFAULT_TEXT_MODEL
from ..errors import ConfigError
from ..files import atomic_file
from .common import (
    BatchSize,
    DTypeOpt,
    Json,
    ProbeOpt,
    Revision,
    Templates,
    all_failed,
    check_output,
    force_option,
    load,
    model_option,
    partial,
    progress,
    rate_column,
    say,
    value,
)

ReportFile = Annotated[
    Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write the JSON report to FILE.")
]
EXAMPLES = [
    "aim-mlx eval imagenet --data ~/imagenet/val -m apple/aim-600M",
    "aim-mlx eval imagenet --data val --templates imagenet --json",
    "aim-mlx eval imagenet --data val -m apple/aim-1B -o report.json",
]
FOLDER_EXAMPLES = [
    "aim-mlx eval folder --data ~/data/birds-test -m birds-head",
    "aim-mlx eval folder --data ~/data/birds-test -m birds-head --json",
]


def imagenet(
    data: Annotated[
        Path,
        typer.Option(
            metavar="DIR",
            help="The validation set: one folder per class, named by WordNet id (n01440764) or class "
            "index (0-999).",
        ),
    ],
    model: Annotated[
        str,
        model_option(
            "An AIMv1 classifier (apple/aim-600M, ...) or a zero-shot (LiT) checkpoint: hub id or local "
            "folder.",
            DEFAULT_TEXT_MODEL,
        ),
    ] = DEFAULT_TEXT_MODEL,
    templates: Annotated[
        Templates | None,
        typer.Option(help="LiT: imagenet for CLIP's 80 prompts per class. Default: 'a photo of a {}.'"),
    ] = None,
    revision: Revision = None,
    dtype: DTypeOpt = None,
    batch_size: BatchSize = 8,
    probe: ProbeOpt = None,
    json: Json = False,
    output: ReportFile = None,
    force: Annotated[bool, force_option("report")] = False,
):
    """Measure ImageNet-1k top-1 and top-5 accuracy.

    DIR (--data) holds labelled images, one folder per class.

    An AIMv1 model scores with its trained head; a LiT model classifies zero-shot among the 1000 class names.
    A folder with fewer than 1000 classes is evaluated as a subset (predictions still over all 1000) and
    says so. The published figure of a known checkpoint is shown beside ours (for a subset, marked as the
    full set's, not comparable). Unreadable images are named on stderr and skipped (exit code 3).
    """
    from ..checkpoints.variants import find_variant
    from ..tasks import evaluate as ev
    from ..tasks import zeroshot

    if output is not None:
        output = check_output(output, force, "-o")
    paths, labels = ev.find_samples(data)
    prompts = zeroshot.template_set(None, value(templates))
    variant = None if Path(model).expanduser().is_dir() else find_variant(model)
    if variant is not None:  # a known id: refuse one with neither head nor text tower before downloading it
        ev.check_family(variant.family, variant.repo_id)
    net, processor = load(model, revision, dtype, probe)
    if ev.method(net) == "head" and templates is not None:
        raise ConfigError(f"{model} scores with its trained head; --templates is for zero-shot (LiT) models")
    score = _scorer(net, processor, prompts)
    report = _run(net, processor, paths, labels, score, batch_size)
    for _, reason in report.failures:  # the reason names the file, as in classify
        say(f"skipped {reason}")
    if report.images == 0:
        raise all_failed(len(paths))
    text = json_module.dumps(report.to_dict(), indent=2)
    if output is not None:
        with atomic_file(output) as tmp:  # written whole or not at all
            tmp.write_text(text + "\n", encoding="utf-8")
    if json:
        typer.echo(text)
    else:
        typer.echo(summary(report))
    if report.failed:
        raise partial(report.failed, len(paths))


def _scorer(net, processor, prompts):
    """evaluate.scorer with a progress bar while the classes' prompts are encoded (LiT, not cached); a head,
    or cached class embeddings, show none."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ..tasks import evaluate as ev

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), rate_column("prompts"))
    with progress(*columns, TimeRemainingColumn()) as bar:
        task = bar.add_task("", total=None, visible=False)  # shown once encoding starts

        def advance(done: int, total: int) -> None:
            # Prompts are encoded in batches of similar length, across classes: the bar counts prompts
            # (with one template, the default, one per class).
            times = "" if len(prompts) == 1 else f" x {len(prompts)}"
            what = f"encoding {total // len(prompts)}{times} class prompts"
            bar.update(task, completed=done, total=total, visible=True, description=what)

        return ev.scorer(net, processor, prompts, progress=advance)


def _run(net, processor, paths, labels, score, batch_size):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ..tasks.evaluate import evaluate

    columns = (
        TextColumn("evaluating"),
        BarColumn(),
        MofNCompleteColumn(),
        rate_column("images"),
        TimeRemainingColumn(),
    )
    with progress(*columns) as bar:
        task = bar.add_task("images", total=len(paths))
        return evaluate(
            net, processor, paths, labels, score, batch_size, lambda done, _: bar.update(task, completed=done)
        )


def summary(report) -> str:
    from ..tasks.evaluate import CLASSES

    published = ""
    if report.published_top1 is not None:  # measured on all 1000 classes: a subset's top-1 is another number
        published = (
            f" (published {report.published_top1:.1f} is on all {CLASSES} classes: not comparable with "
            "this subset)"
            if report.subset
            else f" (published: {report.published_top1:.1f})"
        )
    scope = f"subset of {report.classes} classes" if report.subset else f"{report.classes} classes"
    return "\n".join(
        [
            f"{report.model}: {report.images} images, {scope}, {report.method}",
            f"top-1 {report.top1:.2f}%{published}",
            f"top-5 {report.top5:.2f}%",
            f"{report.seconds:.1f} s, {report.images_per_s:.1f} images/s",
        ]
    )


def folder(
    data: Annotated[
        Path,
        typer.Option(metavar="DIR", help="The test set: one folder per class, named by the head's labels."),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            metavar="MODEL",
            help="A head folder from aim-mlx train (or an AIMv1 classifier).",
        ),
    ],
    batch_size: BatchSize = 8,
    dtype: DTypeOpt = None,
    json: Json = False,
    output: ReportFile = None,
    force: Annotated[bool, force_option("report")] = False,
    plot: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="The confusion matrix as a .png/.svg/.pdf (the plot extra)."),
    ] = None,
):
    """Measure a trained head on labelled class folders.

    DIR (--data) holds one folder per class, each named by one of the head's labels (a subset of them is
    fine). The report gives top-1 and top-5 accuracy, each class's precision and recall, and the confusion
    matrix (rows: true class, columns: predicted, in the head's label order). Unreadable images are named on
    stderr and skipped (exit code 3).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ..tasks.evaluate import evaluate_folder
    from ..tasks.metrics import check_plot, plot_confusion
    from .train import class_table

    if output is not None:
        output = check_output(output, force, "-o")
    if plot is not None:
        plot = check_plot(check_output(plot, True, "--plot"))
    net, processor = load(model, None, dtype)
    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), rate_column("images"))
    with progress(*columns, TimeRemainingColumn()) as bar:
        task = bar.add_task("images", total=None)
        report = evaluate_folder(
            net,
            processor,
            data,
            batch_size,
            lambda done, total: bar.update(task, completed=done, total=total),
        )
    for _, reason in report.failures:
        say(f"skipped {reason}")
    total = report.images + report.failed
    if report.images == 0:
        raise all_failed(total)
    text = json_module.dumps(report.to_dict(), indent=2, ensure_ascii=False)
    if output is not None:
        with atomic_file(output) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
    if plot is not None:
        plot_confusion(report.confusion, report.labels, plot, f"{Path(model).name} on {data}")
    if json:
        typer.echo(text)
    else:
        typer.echo(f"{report.model}: {report.images} images, {len(report.labels)} classes")
        typer.echo(f"top-1 {report.top1:.2f}%\ntop-5 {report.top5:.2f}%")
        typer.echo(class_table(report.per_class, f"on {data}"))
    if report.failed:
        raise partial(report.failed, total)
