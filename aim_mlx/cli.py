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


def _load(model: str, revision: str | None, dtype: DType | None):
    """aim_mlx.load with a spinner on stderr."""
    from .loading import load

    with _stderr().status(f"loading {model}"):
        return load(model, revision=revision, dtype=dtype.value if dtype else None)


def _image_paths(images: list[Path]) -> list[Path]:
    from .images import find_images

    paths = find_images(images)
    if not paths:
        raise AimMlxError(f"no images found in {', '.join(map(str, images))}")
    return paths


def _print_embeddings(names, embeddings) -> None:
    """The human summary when no -o is given: one line per row with its shape, norm and first values."""
    import numpy as np

    for name, emb in zip(names, embeddings, strict=True):
        head = ", ".join(f"{v:+.4f}" for v in emb.reshape(-1)[:4])
        norm = float(np.linalg.norm(emb))
        typer.echo(f"{name}\tshape={tuple(emb.shape)}\tnorm={norm:.4f}\t[{head}, ...]")


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
    "  aim-mlx embed a.jpg b.png --pool none -o tokens.npy\n\n"
    '  aim-mlx embed -m apple/aimv2-large-patch14-224-lit --text "a photo of a cat" -o cat.npy'
)
@_one_line_errors
def embed(
    images: Annotated[
        list[Path] | None, typer.Argument(help="Image files and/or folders (walked recursively).")
    ] = None,
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
    text: Annotated[
        list[str] | None,
        typer.Option(
            "--text",
            "-t",
            help="Embed this text instead of images (LiT model; repeatable); .npz/.jsonl keep it as `path`.",
        ),
    ] = None,
):
    """Embed images with an AIMv2 encoder. Unreadable files are named on stderr and skipped (exit code 2).

    With --text and a LiT checkpoint, embed texts into its image-text space instead."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from . import embed as embedding

    err = _stderr()
    if output is not None and output.suffix.lower() not in embedding.OUTPUT_FORMATS:
        raise AimMlxError(f"cannot write {output}: use a .npy, .npz or .jsonl file name")
    if text or not images:
        return _embed_texts(text, images, model, revision, dtype, output)
    paths = _image_paths(images)
    net, processor = _load(model, revision, dtype)
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
        _print_embeddings(result.paths, result.embeddings)
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
        rows.append(
            {
                "id": v.repo_id,
                "params_millions": round(v.num_params / 1e6),
                "resolution": v.image_size or "native",
                "imagenet_top1": v.published_top1,
                "imagenet_top1_protocol": "zero-shot" if v.lit else "attentive probe, frozen trunk",
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
        top1 += "*" if r["imagenet_top1_protocol"] == "zero-shot" else ""
        params = f"{r['params_millions'] / 1000:.1f}B"
        cached = "yes" if r["cached"] else "-"
        res = str(r["resolution"])
        typer.echo(f"{r['id']:<{width}}  {params:<6}  {res:<6}  {top1:<5}  {r['revision'][:7]}  {cached}")
    typer.echo(
        "top-1: published ImageNet-1k accuracy, attentive probe on the frozen trunk (* zero-shot); "
        "--json for full revisions"
    )


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
    q_bits: Annotated[
        int | None,
        typer.Option(
            "-q",
            "--q-bits",
            help="Quantize the models in memory to 4 or 8 bits (group 64) first, as `convert -q` would.",
        ),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Input size (native checkpoint only). Default: the model's.")
    ] = None,
    num_trials: Annotated[int, typer.Option(min=1, help="Timed calls per configuration.")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls before timing.")] = 1,
    as_json: JsonOpt = False,
    plot: Annotated[Path | None, typer.Option(help="Draw images/s against batch size to this PNG.")] = None,
    compare_torch: Annotated[
        bool,
        typer.Option(
            help="Also run transformers' AIMv2 (torch) on the same inputs and print the ratio; the engines "
            "of each model and batch size are loaded side by side and timed in turns."
        ),
    ] = False,
    coreml: Annotated[
        Path | None, typer.Option(help="Benchmark this Core ML package per compute unit (macOS only).")
    ] = None,
):
    """Throughput, latency, peak memory and load time of each configuration, with the machine described.

    Each configuration runs in a fresh process, so its load time and peak memory are its own. With
    --compare-torch the processes of one model and batch size stay alive side by side and their calls are
    timed in turns, so that a busy machine's drift hits every engine alike.
    """
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from . import bench as benchmark

    sizes = benchmark.parse_batch_sizes(batch_sizes)
    if q_bits is not None and q_bits not in (4, 8):
        raise typer.BadParameter(f"{q_bits} bits; quantize to 4 or 8", param_hint="-q/--q-bits")
    if plot is not None:
        benchmark.check_plot_path(plot)
    if coreml is not None:
        rows = benchmark.run_coreml(coreml, trials=num_trials, warmup=warmup)
        specs = []
    else:
        from .loading import default_dtype

        dtypes = [d.value for d in dtype] if dtype else [default_dtype()]
        specs = benchmark.configurations(
            model or [DEFAULT_MODEL], dtypes, sizes, image_size, num_trials, warmup, compare_torch, q_bits
        )
        rows = []
    # With torch, each model and batch size is one group, timed in turns; otherwise one spec at a time.
    groups = benchmark.group_by(specs, ("model", "batch")) if compare_torch else [[s] for s in specs]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=_stderr(), transient=True) as progress:
        task = progress.add_task("benchmark", total=len(specs))
        for group in groups:
            spec = group[0]
            name = " + ".join(s["engine"] for s in group)
            name += f" {Path(spec['model']).name} {'/'.join(s['dtype'] for s in group)} batch {spec['batch']}"
            name += f" q{spec['bits']}" if spec.get("bits") else ""
            progress.update(task, description=name)
            rows += benchmark.run_interleaved(group) if len(group) > 1 else [benchmark.run_isolated(spec)]
            progress.advance(task, len(group))
    info = benchmark.machine()
    ratios = benchmark.torch_ratios(rows)
    if plot is not None:
        benchmark.plot(rows, plot)
    if as_json:
        typer.echo(json.dumps({"machine": info, "results": rows, "torch_ratios": ratios}, indent=2))
        return
    typer.echo(benchmark.header(info))
    typer.echo(benchmark.table(rows))
    for r in ratios:
        weights = "" if r["weights"] == "float" else f" ({r['weights']})"
        typer.echo(f"{r['model']} batch {r['batch']}: aim-mlx{weights} / torch images/s = {r['ratio']:.2f}x")
    if plot is not None:
        _stderr().print(f"wrote {plot}", highlight=False)


def _embed_texts(texts, images, model, revision, dtype, output) -> None:
    """`embed --text`: texts into a LiT model's image-text space, written like image embeddings."""
    from . import embed as embedding
    from .lit import embed_texts
    from .registry import require_text

    if not texts:
        raise AimMlxError("nothing to embed; pass image files or folders, or --text 'some text'")
    if images:
        raise AimMlxError("pass images or --text, not both; run embed once for each")
    net, _ = _load(model, revision, dtype)
    require_text(net, "embed text")
    result = embed_texts(net, list(texts))
    if output is not None:
        embedding.save(result, output)
        _stderr().print(f"wrote {len(result.paths)} embeddings to {output}", highlight=False)
        return
    _print_embeddings(result.paths, result.embeddings)


class Templates(str, Enum):
    imagenet = "imagenet"


@app.command(
    epilog="Examples:\n\n  aim-mlx classify photo.jpg --labels 'cat,dog,horse'\n\n"
    "  aim-mlx classify ~/Pictures --imagenet --top-k 3 --json\n\n"
    "  aim-mlx classify a.jpg --labels-file labels.txt --template 'a drawing of a {}.'"
)
@_one_line_errors
def classify(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (walked recursively).")],
    labels: Annotated[str | None, typer.Option(help="Comma-separated labels, e.g. 'cat,dog,horse'.")] = None,
    labels_file: Annotated[Path | None, typer.Option(help="A UTF-8 text file, one label per line.")] = None,
    imagenet: Annotated[bool, typer.Option("--imagenet", help="The 1000 ImageNet-1k classes.")] = False,
    template: Annotated[
        str | None, typer.Option(help="Prompt with {} where the label goes. Default: 'a photo of a {}.'")
    ] = None,
    templates: Annotated[
        Templates | None, typer.Option(help="imagenet: CLIP's 80 ImageNet prompts, averaged per label.")
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Labels shown per image.")] = 5,
    model: Annotated[
        str, typer.Option("--model", "-m", help="A zero-shot (LiT) checkpoint: hub id or local folder.")
    ] = "apple/aimv2-large-patch14-224-lit",
    revision: RevisionOpt = None,
    dtype: DTypeOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 8,
    as_json: JsonOpt = False,
):
    """Zero-shot classification: the top-k labels per image, with probabilities, from a LiT checkpoint.

    Label embeddings are cached on disk (AIM_MLX_CACHE, default ~/.cache/aim-mlx), so a repeated label set
    costs about one image forward. Unreadable images are named on stderr and skipped (exit code 2).
    """
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from . import zeroshot
    from .registry import require_text

    names = zeroshot.label_set(labels, labels_file, imagenet)
    prompts = zeroshot.template_set(template, templates.value if templates else None)
    paths = _image_paths(images)
    err = _stderr()
    net, processor = _load(model, revision, dtype)
    require_text(net, "classify zero-shot")
    columns = (TextColumn("encoding prompts"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:  # shows only while prompts are encoded
        task = bar.add_task("prompts", total=len(names) * len(prompts), visible=False)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, visible=total > 256)  # more than one batch

        classifier = zeroshot.text_classifier(net, processor, names, prompts, progress=advance)
    with err.status(f"classifying {len(paths)} images among {len(names)} labels"):
        predictions, failures = zeroshot.classify_files(
            net, processor, paths, names, classifier, top_k, batch_size
        )
    for _, reason in failures:
        err.print(f"[yellow]skipped[/] {reason}", markup=True, highlight=False, soft_wrap=True)
    rows = [{"path": str(path), "predictions": pred.to_list()} for path, pred in predictions]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            typer.echo(row["path"])
            for pred in row["predictions"]:
                typer.echo(f"  {pred['prob']:7.2%}  {pred['label']}")
    if failures:
        err.print(f"{len(failures)} of {len(paths)} images failed", highlight=False)
        raise typer.Exit(2)


@app.command(
    epilog="Examples:\n\n  aim-mlx convert --hf-path apple/aimv2-large-patch14-224 --mlx-path aimv2-l-mlx\n\n"
    "  aim-mlx convert --hf-path apple/aimv2-large-patch14-224 --mlx-path aimv2-l-4bit -q\n\n"
    "  aim-mlx convert --hf-path ./checkpoint --mlx-path out -q --quant-predicate mixed_4_8"
)
@_one_line_errors
def convert(
    hf_path: Annotated[str, typer.Option(help="Hub id or local folder of the checkpoint to convert.")],
    mlx_path: Annotated[Path, typer.Option(help="Folder to write (must not exist).")] = Path("mlx_model"),
    revision: RevisionOpt = None,
    dtype: Annotated[DType | None, typer.Option(help="Weight dtype. Default: the source's.")] = None,
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="Quantize the Linear layers.")] = False,
    q_bits: Annotated[int, typer.Option(help="Bits per weight when quantizing: 4 or 8.")] = 4,
    q_group_size: Annotated[int, typer.Option(help="Quantization group size: 32, 64 or 128.")] = 64,
    quant_predicate: Annotated[
        str | None,
        typer.Option(help="Mixed-precision recipe (with -q): mixed_4_8, ends_4_8 or mixed_4_6; see README."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --mlx-path folder.")] = False,
):
    """Convert a checkpoint to an MLX folder (aim-mlx layout), optionally quantized, for `--model DIR`."""
    from .convert.convert import convert as run_convert
    from .convert.convert import describe_quantization

    with _stderr().status(f"converting {hf_path}"):
        done = run_convert(
            hf_path,
            mlx_path,
            revision=revision,
            dtype=dtype.value if dtype else None,
            quantize=quantize,
            q_bits=q_bits,
            q_group_size=q_group_size,
            quant_predicate=quant_predicate,
            force=force,
        )
    source = done.source + (f" @ {done.revision}" if done.revision else "")
    typer.echo(f"source:     {source}")
    typer.echo(f"dtype:      {done.dtype}")
    typer.echo(f"quantized:  {describe_quantization(done.quantized)}")
    typer.echo(f"size:       {done.bytes_before / 1e6:.1f} MB -> {done.bytes_after / 1e6:.1f} MB")
    typer.echo(f"wrote {done.output} ({', '.join(done.files)})")


export_app = typer.Typer(help="Export a checkpoint for other runtimes.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command(
    "coreml",
    epilog="Examples:\n\n  aim-mlx export coreml -o AIMv2L.mlpackage --check\n\n"
    "  aim-mlx export coreml -m apple/aimv2-large-patch14-native --image-size 336 -o native336.mlpackage\n\n"
    "  aim-mlx export coreml -o l8.mlpackage --compress int8 --outputs pooled,tokens\n\n"
    "  aim-mlx export coreml -o l4.mlpackage --compress int4 --min-deployment-target iOS18",
)
@_one_line_errors
def export_coreml(
    output: Annotated[Path, typer.Option("--output", "-o", help="The .mlpackage to write (LiT: a folder).")],
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    precision: Annotated[str, typer.Option(help="float16 or float32.")] = "float16",
    compress: Annotated[
        str, typer.Option(help="none, int8, int4 (macOS15/iOS18+), palettize4, palettize6 or palettize8.")
    ] = "none",
    image_size: Annotated[
        int | None, typer.Option(help="Input size (native checkpoint only; default 224).")
    ] = None,
    min_deployment_target: Annotated[str, typer.Option(help="macOS14, iOS17, macOS15 or iOS18.")] = "iOS17",
    input_kind: Annotated[
        str, typer.Option("--input", help="image (RGB 0-255) or tensor (normalised pixel_values).")
    ] = "image",
    outputs: Annotated[
        str, typer.Option(help="pooled, or pooled,tokens to add last_hidden_state.")
    ] = "pooled",
    check: Annotated[
        bool, typer.Option(help="Verify the package against MLX on real photos before writing it.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    labels: Annotated[
        str | None, typer.Option(help="LiT: comma-separated labels whose text embeddings to precompute.")
    ] = None,
):
    """Build a Core ML package (ML program) from an AIMv2 checkpoint, without torch.

    The LiT checkpoint gives a folder: ImageEncoder.mlpackage, TextEncoder.mlpackage (input_ids (1, 77) ->
    text_embeds), tokenizer/ and lit.json (logit scale, token ids), for zero-shot in an app.
    """
    import logging

    if not os.environ.get("AIM_MLX_DEBUG"):  # coremltools' progress bars and platform notes
        os.environ.setdefault("TQDM_DISABLE", "1")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
    from .convert.coreml import export_coreml as run_export

    with _stderr().status(f"exporting {model}"):
        done = run_export(
            model,
            output,
            revision=revision,
            precision=precision,
            compress=compress,
            image_size=image_size,
            target=min_deployment_target,
            input_kind=input_kind,
            outputs=outputs,
            check=check,
            force=force,
            labels=None if labels is None else labels.split(","),
        )
    meta = done.metadata
    typer.echo(f"source:     {meta['source_model']} @ {meta['source_revision']}")
    size = meta["image_size"]
    typer.echo(f"package:    {precision}, compression {compress}, {size} px, {input_kind} input")
    if done.check is not None:
        typer.echo(f"check:      {done.check['summary']} (numpy evaluator); predict {done.check['predict']}")
    typer.echo(f"wrote {done.path} ({done.size_bytes / 1e6:.1f} MB) in {done.seconds:.1f} s")


def main() -> None:
    """Entry point of the `aim-mlx` script."""
    app()
