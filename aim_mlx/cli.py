"""The `aim-mlx` command line. Each command is a thin wrapper over a library function.

Heavy imports (mlx, the model code) happen inside commands so that `aim-mlx --help` stays instant.
User errors print one line and exit 1; set AIM_MLX_DEBUG=1 to see the traceback instead. `embed` exits
with 2 when some images failed and the rest were embedded.
"""

import functools
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import AimMlxError
from .variants import DEFAULT_MODEL

app = typer.Typer(
    name="aim-mlx",
    help="Apple's AIM vision encoders on MLX: image embeddings on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Pool(str, Enum):
    mean = "mean"
    none = "none"


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Hub id (e.g. apple/aimv2-large-patch14-224) or a local folder.")
]
RevisionOpt = Annotated[
    str | None, typer.Option(help="Hub revision (branch, tag or commit). Default: the revision ml-aim pins.")
]
DTypeOpt = Annotated[
    DType | None, typer.Option(help="Compute dtype. Default: float32 on CPU, float16 on Apple GPU.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def _one_line_errors(command):
    """Report aim-mlx errors as `error: ...` on stderr with exit code 1 (AIM_MLX_DEBUG=1: the traceback)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except AimMlxError as exc:
            if os.environ.get("AIM_MLX_DEBUG"):
                raise
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(1) from None

    return run


def _version(value: bool):
    if value:
        typer.echo(f"aim-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
):
    """Apple's AIM vision encoders on MLX: image embeddings on your own machine."""


@app.command(
    epilog="Examples:\n\n  aim-mlx embed photo.jpg\n\n"
    "  aim-mlx embed ~/Pictures -o embeddings.npz --batch-size 16\n\n"
    "  aim-mlx embed a.jpg b.png --pool none -o tokens.npy"
)
@_one_line_errors
def embed(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (walked recursively).")],
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 8,
    dtype: DTypeOpt = None,
    pool: Annotated[
        Pool, typer.Option(help="mean: one (D,) vector per image; none: the (N, D) token grid.")
    ] = Pool.mean,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write .npy (rows in order), .npz (embeddings + paths) or .jsonl."
        ),
    ] = None,
):
    """Embed images with an AIMv2 encoder. Unreadable files are named on stderr and skipped (exit code 2)."""
    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from . import embed as embedding
    from .images import find_images
    from .loading import load

    err = _stderr()
    if output is not None and output.suffix.lower() not in embedding.OUTPUT_FORMATS:
        raise AimMlxError(f"cannot write {output}: use a .npy, .npz or .jsonl file name")
    paths = find_images(images)
    if not paths:
        raise AimMlxError(f"no images found in {', '.join(map(str, images))}")
    with err.status(f"loading {model}"):
        net, processor = load(model, revision=revision, dtype=dtype.value if dtype else None)
    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=len(paths) <= batch_size) as bar:
        task = bar.add_task("embed", total=len(paths))
        result = embedding.embed_images(
            net, processor, paths, batch_size, pool.value, on_done=lambda n: bar.advance(task, n)
        )
    for _, reason in result.failures:
        err.print(f"[yellow]skipped[/] {reason}", markup=True, highlight=False, soft_wrap=True)
    if output is not None and result.paths:
        embedding.save(result, output)
        err.print(f"wrote {len(result.paths)} embeddings to {output}", highlight=False)
    else:
        for path, emb in zip(result.paths, result.embeddings, strict=True):
            head = ", ".join(f"{v:+.4f}" for v in emb.reshape(-1)[:4])
            norm = float(np.linalg.norm(emb))
            typer.echo(f"{path}\tshape={tuple(emb.shape)}\tnorm={norm:.4f}\t[{head}, ...]")
    if result.failures:
        err.print(f"{len(result.failures)} of {len(paths)} images failed", highlight=False)
        raise typer.Exit(2)


@app.command()
@_one_line_errors
def models(as_json: JsonOpt = False):
    """List the supported checkpoints with size, resolution, pinned revision and whether each is cached."""
    import json

    from .hub import is_cached
    from .variants import VARIANTS

    rows = []
    for v in VARIANTS.values():
        hidden, _, mlp, layers = v.dims
        params = layers * (4 * hidden * hidden + 3 * hidden * mlp)  # attention + SwiGLU dominate
        rows.append(
            {
                "id": v.repo_id,
                "params_millions": round(params / 1e6),
                "resolution": v.image_size or "native",
                "imagenet_top1": v.published_top1,
                "revision": v.revision,
                "license": v.license,
                "cached": is_cached(v.repo_id),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["id"]) for r in rows)
    typer.echo(f"{'model':<{width}}  params  res     top-1  pinned   cached")
    for r in rows:
        top1 = "-" if r["imagenet_top1"] is None else f"{r['imagenet_top1']:.1f}"
        params = f"{r['params_millions'] / 1000:.1f}B"
        cached = "yes" if r["cached"] else "-"
        res = str(r["resolution"])
        typer.echo(f"{r['id']:<{width}}  {params:<6}  {res:<6}  {top1:<5}  {r['revision'][:7]}  {cached}")
    typer.echo("top-1: published ImageNet-1k accuracy (frozen trunk); --json for full revisions")


def main() -> None:
    """Entry point of the `aim-mlx` script."""
    app()
