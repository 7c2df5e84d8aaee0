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


@app.command(
    epilog="Examples:\n\n  aim-mlx bench\n\n"
    "  aim-mlx bench -m aimv2-large-patch14-224 -m aimv2-huge-patch14-224 --batch-sizes 1,8,32\n\n"
    "  aim-mlx bench --dtype float32 --dtype bfloat16 --json > results.json\n\n"
    "  aim-mlx bench --compare-torch --plot curve.png"
)
@_one_line_errors
def bench(
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Hub id or folder; repeat for several.")
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    dtype: Annotated[
        list[DType] | None, typer.Option(help="Repeat for several. Default: float32 on CPU, float16 on GPU.")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Input size (native checkpoint only). Default: the model's.")
    ] = None,
    num_trials: Annotated[int, typer.Option(min=1, help="Timed calls per configuration.")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls before timing.")] = 1,
    as_json: JsonOpt = False,
    plot: Annotated[Path | None, typer.Option(help="Draw images/s against batch size to this PNG.")] = None,
    compare_torch: Annotated[
        bool, typer.Option(help="Also run transformers' AIMv2 (torch) on the same inputs; print the ratio.")
    ] = False,
    coreml: Annotated[
        Path | None, typer.Option(help="Benchmark this Core ML package per compute unit (macOS only).")
    ] = None,
):
    """Throughput, latency, peak memory and load time of each configuration, with the machine described.

    Each configuration runs in a fresh process, so its load time and peak memory are its own.
    """
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from . import bench as benchmark

    sizes = benchmark.parse_batch_sizes(batch_sizes)
    if plot is not None:
        benchmark.check_plot_path(plot)
    if coreml is not None:
        rows = benchmark.run_coreml(coreml, trials=num_trials, warmup=warmup)
        specs = []
    else:
        from .loading import default_dtype

        dtypes = [d.value for d in dtype] if dtype else [default_dtype()]
        specs = benchmark.configurations(
            model or [DEFAULT_MODEL], dtypes, sizes, image_size, num_trials, warmup, compare_torch
        )
        rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=_stderr(), transient=True) as progress:
        task = progress.add_task("benchmark", total=len(specs))
        for spec in specs:
            name = f"{spec['engine']} {Path(spec['model']).name} {spec['dtype']} batch {spec['batch']}"
            progress.update(task, description=name)
            rows.append(benchmark.run_isolated(spec))
            progress.advance(task)
    info = benchmark.machine()
    ratios = benchmark.torch_ratios(rows)
    if plot is not None:
        benchmark.plot(rows, plot)
    if as_json:
        typer.echo(json.dumps({"machine": info, "results": rows, "torch_ratios": ratios}, indent=2))
        return
    typer.echo(f"# {info['cpu']}, {info['cores']} cores, {info['os']}")
    typer.echo(
        f"# mlx {info['mlx']} on {info['mlx_device']}, BLAS {info['mlx_blas']}, {info['threads']} threads; "
        f"aim-mlx {info['aim_mlx']}, numpy {info['numpy']}"
    )
    typer.echo(benchmark.table(rows))
    for r in ratios:
        typer.echo(f"{r['model']} batch {r['batch']}: aim-mlx / torch images/s = {r['ratio']:.2f}x")
    if plot is not None:
        _stderr().print(f"wrote {plot}", highlight=False)


def main() -> None:
    """Entry point of the `aim-mlx` script."""
    app()
