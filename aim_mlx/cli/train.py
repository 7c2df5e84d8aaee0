"""`aim-mlx train`: a probe head on a model's features from class folders, over aim_mlx.tasks.train."""

import json as json_module
from pathlib import Path
from typing import Annotated

import typer

from ..checkpoints.variants import DEFAULT_MODEL
from ..errors import ConfigError
from .common import (
    DTypeOpt,
    Json,
    Revision,
    check_output,
    choice,
    force_option,
    load,
    model_option,
    partial,
    plural,
    progress,
    rate_column,
    say,
    value,
)

EXAMPLES = [
    "aim-mlx train ~/data/birds -o birds-head",
    "aim-mlx train ~/data/birds -o birds-head --probe attentive --epochs 30",
    "aim-mlx train ~/data/birds -o birds-head --val ~/data/birds-val --json",
]
ProbeKind = choice("ProbeKind", "linear", "attentive")


def train(
    data: Annotated[Path | None, typer.Argument(metavar="DATA", hidden=True)] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="DIR", help="The head folder to write.")
    ] = None,
    probe: Annotated[
        ProbeKind, typer.Option(help="linear: on the pooled embedding; attentive: one query over tokens.")
    ] = ProbeKind.linear,
    model: Annotated[
        str, model_option("The base model: hub id or local folder.", DEFAULT_MODEL)
    ] = DEFAULT_MODEL,
    epochs: Annotated[int, typer.Option(min=1, metavar="N", help="At most N epochs (early stopping).")] = 20,
    lr: Annotated[
        float | None,
        typer.Option(metavar="LR", help="Peak learning rate. Default: 1e-3 linear, 1e-4 attentive."),
    ] = None,
    weight_decay: Annotated[float, typer.Option(min=0, metavar="WD", help="AdamW's weight decay.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1, metavar="N", help="Images per optimiser step.")] = 64,
    val_split: Annotated[
        float | None,
        typer.Option(metavar="SHARE", help="Share of each class held out for validation. Default: 0.1."),
    ] = None,
    val: Annotated[
        Path | None, typer.Option("--val", metavar="DIR", help="A validation set (same class folders).")
    ] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Seeds the split, the weights and the batches.")] = 0,
    blocks: Annotated[
        str | None,
        typer.Option(
            metavar="I,J,...",
            help="Attentive: the mean of these blocks' outputs (0-based, negative from the end). "
            "Default: the final tokens.",
        ),
    ] = None,
    augment: Annotated[
        bool,
        typer.Option(
            "--augment",
            help="Attentive: random resized crops and flips; every epoch then runs the model on every "
            "training image.",
        ),
    ] = False,
    memory: Annotated[
        float, typer.Option(metavar="GB", help="Attentive: token features held in memory up to GB.")
    ] = 2.0,
    revision: Revision = None,
    dtype: DTypeOpt = None,
    plot: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="The confusion matrix as a .png/.svg/.pdf (the plot extra)."),
    ] = None,
    json: Json = False,
    force: Annotated[bool, force_option("head folder")] = False,
):
    """Train a classifier head on a frozen model's features.

    DATA holds one folder per class (ImageFolder layout); a stratified share of each class (--val-split) is
    held out for validation, unless --val gives a set. Features are computed once per image and cached
    (AIM_MLX_CACHE), so training again with other settings runs no model. The head folder (a few MB:
    model.safetensors + config.json) then classifies: aim-mlx classify photo.jpg -m DIR. Unreadable images
    are named on stderr and skipped (exit code 3, the head written).
    """
    if data is None or output is None:
        raise ConfigError("give the class folders and the head folder to write: aim-mlx train DATA -o DIR")
    output = check_output(output, force, "-o", folder=True)
    if plot is not None:
        from ..tasks.metrics import check_plot

        plot = check_plot(check_output(plot, True, "--plot"))
    if val is not None and val_split is not None:
        raise ConfigError("give --val-split or --val, not both")
    from ..tasks.train import train as train_head

    net, processor = load(model, revision, dtype)
    with _bars() as (on_features, on_epoch):
        report = train_head(
            net,
            processor,
            data,
            output,
            probe=value(probe),
            blocks=_blocks(blocks),
            val_split=0.1 if val_split is None else val_split,
            val_dir=val,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            seed=seed,
            augment=augment,
            memory_budget=int(memory * 2**30),
            force=force,
            on_features=on_features,
            on_epoch=on_epoch,
        )
    for _, reason in report.failures:
        say(f"skipped {reason}")
    if plot is not None:
        from ..tasks.metrics import plot_confusion

        plot_confusion(
            report.confusion, report.labels, plot, f"{Path(report.output).name}: {report.evaluated_on}"
        )
    if json:
        typer.echo(json_module.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        typer.echo(summary(report))
    if report.failed:  # the head was trained on the others
        raise partial(report.failed, report.failed + report.train_images + report.val_images)


def _blocks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--blocks {text!r}: give block indices separated by commas, e.g. 18,19,20"
        ) from None


class _bars:
    """A bar over the images while their features are computed, then one over the epochs with the losses."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        self.bar = progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            rate_column("items"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        self.images = self.epochs = None

        def on_features(done: int, total: int) -> None:
            if self.images is None:
                self.images = self.bar.add_task("features", total=total, stats="")
            self.bar.update(self.images, completed=done)

        def on_epoch(epoch, total: int) -> None:
            if self.epochs is None:
                self.epochs = self.bar.add_task("epochs", total=total, stats="")
            self.bar.update(self.epochs, completed=epoch.epoch, stats=epoch_line(epoch))

        return on_features, on_epoch

    def __exit__(self, *exc):
        self.bar.stop()


def epoch_line(epoch) -> str:
    val = "" if epoch.val_loss is None else f", val loss {epoch.val_loss:.3f} acc {epoch.val_accuracy:.1f}%"
    return f"train loss {epoch.train_loss:.3f} acc {epoch.train_accuracy:.1f}%{val}"


def summary(report) -> str:
    stop = " (stopped early)" if report.stopped_early else ""
    lines = [
        f"{report.probe} probe on {report.base_model}: {len(report.labels)} classes, "
        f"{plural(report.train_images, 'training image')}, {report.val_images} for validation"
        + (f", {report.failed} unreadable" if report.failed else ""),
        f"features: {report.feature_seconds:.1f} s ({report.forward_images} images through the model, "
        f"the rest cached); training: {report.train_seconds:.1f} s, {len(report.epochs)} epochs{stop}",
    ]
    lines += [f"epoch {e.epoch:3d}: {epoch_line(e)}" for e in report.epochs]
    if report.val_accuracy is not None:
        lines.append(
            f"best epoch {report.best_epoch}: val loss {report.val_loss:.3f}, acc {report.val_accuracy:.1f}%"
        )
    lines.append(class_table(report.per_class, f"on the {report.evaluated_on} images"))
    if report.balanced_loss:
        lines.append("classes are unbalanced: the loss weighs each class by the inverse of its image count")
    if report.duplicates:
        lines.append(f"warning: {plural(report.duplicates, 'file')} found in more than one class")
    lines.append(f"wrote {report.output}")
    return "\n".join(lines)


def class_table(rows: list[dict], where: str) -> str:
    width = max([5, *(len(r["label"]) for r in rows)])
    out = [f"{'class':<{width}}  precision  recall  images  ({where})"]
    out += [
        f"{r['label']:<{width}}  {r['precision']:8.1f}%  {r['recall']:5.1f}%  {r['support']:6d}" for r in rows
    ]
    return "\n".join(out)
