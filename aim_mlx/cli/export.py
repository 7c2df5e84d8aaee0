"""`aim-mlx export coreml`: a Core ML package, over aim_mlx.convert.coreml.export.export_coreml."""

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from ..checkpoints.variants import DEFAULT_MODEL
from .common import (
    Compress,
    InputKind,
    Outputs,
    Precision,
    Revision,
    Target,
    check_output,
    force_option,
    model_option,
    spinner,
)

EXAMPLES = [
    "aim-mlx export coreml --check  # writes AIMv2LargePatch14_224.mlpackage",
    "aim-mlx export coreml -m apple/aimv2-large-patch14-224-lit --labels cat,dog",
    "aim-mlx export coreml -m ./aim-600M  # AIMv1: an ImageNet-1k classifier",
    "aim-mlx export coreml -m aimv2-large-patch14-native --image-size 336 \\",
    "    -o native336.mlpackage",
    "aim-mlx export coreml -o l8.mlpackage --compress int8 \\",
    "    --outputs pooled,tokens",
    "aim-mlx export coreml -o l4.mlpackage --compress int4 \\",
    "    --min-deployment-target iOS18",
]


def coreml(
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="The .mlpackage to write (LiT: a folder). Default: named after the model, here.",
        ),
    ] = None,
    model: Annotated[str, model_option("Hub id or local folder.", DEFAULT_MODEL)] = DEFAULT_MODEL,
    revision: Revision = None,
    precision: Annotated[
        Precision, typer.Option(help="Compute precision of the package.")
    ] = Precision.float16,
    compress: Annotated[
        Compress, typer.Option(help="Weight compression; int4 needs macOS15 or iOS18.")
    ] = Compress.none,
    image_size: Annotated[
        int | None, typer.Option(metavar="SIZE", help="Input size (native checkpoint only). Default: 224.")
    ] = None,
    min_deployment_target: Annotated[Target, typer.Option(help="The oldest OS to run on.")] = Target.iOS17,
    input: Annotated[
        InputKind, typer.Option("--input", help="image: RGB 0-255; tensor: normalised pixel_values.")
    ] = InputKind.image,
    outputs: Annotated[
        Outputs, typer.Option(help="pooled,tokens adds last_hidden_state to the pooled embedding.")
    ] = Outputs.pooled,
    check: Annotated[
        bool, typer.Option("--check", help="Verify the package against MLX on real photos before writing it.")
    ] = False,
    force: Annotated[bool, force_option("output")] = False,
    labels: Annotated[
        str | None,
        typer.Option(
            metavar="LABELS",
            help="LiT: comma-separated labels whose text embeddings to precompute (none may hold a comma).",
        ),
    ] = None,
):
    """Build a Core ML package from a checkpoint, without torch.

    The package is an ML program made from aim-mlx's weights, named after the model (Xcode names its Swift
    class after the file). The LiT checkpoint gives a folder: NAMEImageEncoder.mlpackage,
    NAMETextEncoder.mlpackage (input_ids (1, 77) -> text_embeds), with --labels NAMEClassifier.mlpackage,
    tokenizer/ and lit.json (package names, logit scale, token ids), for zero-shot in an app. An AIMv1
    model (an MLX folder from `aim-mlx convert`) gives NAMEClassifier.mlpackage: a Core ML classifier over
    its head's ImageNet-1k labels.
    """
    if output is not None:
        output = check_output(output, force, "-o", folder=True)
    if not os.environ.get("AIM_MLX_DEBUG"):  # coremltools' progress bars and platform notes
        os.environ.setdefault("TQDM_DISABLE", "1")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
    from aim_mlx.convert.coreml.export import export_coreml

    with spinner(f"exporting {model}"):
        done = export_coreml(
            model,
            output,
            revision=revision,
            precision=precision.value,
            compress=compress.value,
            image_size=image_size,
            target=min_deployment_target.value,
            input_kind=input.value,
            outputs=outputs.value,
            check=check,
            force=force,
            labels=None if labels is None else labels.split(","),
        )
    meta = done.metadata
    typer.echo(f"source:     {meta['source_model']} @ {meta['source_revision']}")
    size = meta["image_size"]
    typer.echo(f"package:    {precision.value}, compression {compress.value}, {size} px, {input.value} input")
    if done.check is not None:
        typer.echo(f"check:      {done.check['summary']} (numpy evaluator); predict {done.check['predict']}")
    typer.echo(f"wrote {done.path} ({done.size_bytes / 1e6:.1f} MB) in {done.seconds:.1f} s")
