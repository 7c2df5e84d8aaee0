"""`aim-mlx convert`: a converted (optionally quantized) MLX folder, over aim_mlx.convert.convert.convert."""

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DType,
    Probe,
    QBits,
    QGroupSize,
    QuantRecipe,
    Revision,
    check_output,
    force_option,
    spinner,
    value,
)

EXAMPLES = [
    "aim-mlx convert --hf-path apple/aimv2-large-patch14-224 --mlx-path aimv2-l",
    "aim-mlx convert --hf-path aimv2-large-patch14-224 --mlx-path aimv2-l-4bit -q",
    "aim-mlx convert --hf-path ./checkpoint --mlx-path out -q \\",
    "    --quant-predicate mixed_4_8",
    "aim-mlx convert --hf-path apple/aim-600M --mlx-path aim-600M",
    "aim-mlx convert --hf-path aim-1B-5B-imgs --probe last --mlx-path aim-1b -q",
]


def convert(
    hf_path: Annotated[
        str, typer.Option(metavar="MODEL", help="Hub id or local folder of the checkpoint to convert.")
    ],
    mlx_path: Annotated[Path, typer.Option(metavar="DIR", help="The folder to write.")] = Path("mlx_model"),
    revision: Revision = None,
    dtype: Annotated[DType | None, typer.Option(help="Weight dtype. Default: the source's.")] = None,
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="Quantize the Linear layers.")] = False,
    q_bits: Annotated[QBits | None, typer.Option(help="Bits per weight (with -q). Default: 4.")] = None,
    q_group_size: Annotated[
        QGroupSize | None, typer.Option(help="Weights per quantization group (with -q). Default: 64.")
    ] = None,
    quant_predicate: Annotated[
        QuantRecipe | None, typer.Option(help="A mixed-precision recipe (with -q); see docs/convert.md.")
    ] = None,
    force: Annotated[bool, force_option("--mlx-path folder")] = False,
    probe: Annotated[
        Probe | None,
        typer.Option(help="AIMv1: the attention-probe head, best or last layers. Default: best."),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            help="AIMv1 .pth files: check the SHA-256 ml-aim publishes (--no-verify for your own files)."
        ),
    ] = True,
):
    """Convert a checkpoint to an MLX folder, optionally quantized.

    The folder (aim-mlx's layout) loads wherever a hub id does: `--model DIR`. The flags are mlx_lm.convert's.
    AIMv1's published pickles (.bin, .pth) are read here only, with torch's weights-only loader
    (pip install 'aim-mlx[pth]').
    """
    from aim_mlx.convert.convert import convert as run_convert
    from aim_mlx.convert.convert import describe_quantization

    mlx_path = check_output(mlx_path, force, "--mlx-path", folder=True)
    with spinner(f"converting {hf_path}"):
        done = run_convert(
            hf_path,
            mlx_path,
            revision=revision,
            dtype=value(dtype),
            quantize=quantize,
            q_bits=q_bits and int(q_bits.value),  # None when not given: convert() refuses them without -q
            q_group_size=q_group_size and int(q_group_size.value),
            quant_predicate=value(quant_predicate),
            force=force,
            probe=value(probe),
            verify=verify,
        )
    source = done.source + (f" @ {done.revision}" if done.revision else "")
    typer.echo(f"source:     {source}")
    typer.echo(f"dtype:      {done.dtype}")
    typer.echo(f"quantized:  {describe_quantization(done.quantized)}")
    typer.echo(f"size:       {done.bytes_before / 1e6:.1f} MB -> {done.bytes_after / 1e6:.1f} MB")
    typer.echo(f"wrote {done.output} ({', '.join(done.files)})")
