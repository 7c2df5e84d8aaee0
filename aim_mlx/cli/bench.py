"""`aim-mlx bench`: throughput, latency and memory per configuration, over aim_mlx.tasks.bench."""

from pathlib import Path
from typing import Annotated

import typer

from ..checkpoints.variants import DEFAULT_MODEL
from ..errors import ConfigError
from .common import DType, Json, QBits, check_output, choices, force_option, model_option, progress, say

EXAMPLES = [
    "aim-mlx bench",
    "aim-mlx bench -m aimv2-large-patch14-224 -m aimv2-huge-patch14-224 \\",
    "    --batch-sizes 1,8,32",
    "aim-mlx bench --dtype float32 --dtype bfloat16 --json > results.json",
    "aim-mlx bench -q --q-bits 8",
    "aim-mlx bench --compare-torch --plot curve.png",
]


def bench(
    model: Annotated[
        list[str] | None, model_option("Hub id or local folder; repeat for several.", DEFAULT_MODEL)
    ] = None,
    batch_sizes: Annotated[str, typer.Option(metavar="N,N...", help="Comma-separated batch sizes.")] = "1,8",
    dtype: Annotated[
        list[DType] | None,
        typer.Option(
            metavar=choices(DType),
            help="Repeat for several. Default: float32 on a CPU, float16 on a GPU (Apple's or NVIDIA's).",
        ),
    ] = None,
    quantize: Annotated[
        bool,
        typer.Option("--quantize", "-q", help="Quantize the models in memory first, as `convert -q` would."),
    ] = False,
    q_bits: Annotated[QBits | None, typer.Option(help="Bits per weight (with -q). Default: 4.")] = None,
    image_size: Annotated[
        int | None,
        typer.Option(metavar="SIZE", help="Input size (native checkpoint only). Default: the model's."),
    ] = None,
    num_trials: Annotated[int, typer.Option(min=1, metavar="N", help="Timed calls per configuration.")] = 5,
    warmup: Annotated[int, typer.Option(min=0, metavar="N", help="Untimed calls before timing.")] = 1,
    json: Json = False,
    plot: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Draw images/s against batch size to this PNG, SVG or PDF."),
    ] = None,
    force: Annotated[bool, force_option("--plot file")] = False,
    compare_torch: Annotated[
        bool,
        typer.Option(
            "--compare-torch",
            help="Also run transformers' AIMv2 (torch) on the same inputs and print the ratio; the "
            "engines of each model and batch size are loaded side by side and timed in turns.",
        ),
    ] = False,
    coreml: Annotated[
        Path | None,
        typer.Option(metavar="PACKAGE", help="Benchmark this Core ML package per compute unit (macOS only)."),
    ] = None,
):
    """Measure throughput, latency, memory and load time.

    One row per configuration, under a header that describes the machine and names the device MLX runs on
    (the GPU's name, or the CPU model; AIM_MLX_DEVICE=cpu|gpu chooses where both are). Each configuration
    runs in a fresh process, so its load time and peak memory are its own. With --compare-torch the
    processes of one model and batch size stay alive side by side and their calls are timed in turns, so
    that a busy machine's drift hits every engine alike.
    """
    import json as json_module

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from ..platform import devices

    # A bad AIM_MLX_DEVICE, or MLX's CUDA build without the NVIDIA driver, is one line before anything runs.
    devices.apply()
    from ..tasks.bench import harness, report, timing

    sizes = harness.parse_batch_sizes(batch_sizes)
    if q_bits is not None and not quantize:
        raise ConfigError(f"--q-bits {q_bits.value} only applies when quantizing; add -q")
    bits = int((q_bits or QBits("4")).value) if quantize else None
    if plot is not None:
        plot = check_output(plot, force, "--plot")
        report.check_plot_path(plot)
    if coreml is not None:
        from ..tasks.bench.coreml_engine import run_coreml

        rows = run_coreml(coreml, trials=num_trials, warmup=warmup)
        specs = []
    else:
        from ..loading import default_dtype

        dtypes = [d.value for d in dtype] if dtype else [default_dtype()]
        specs = harness.configurations(
            model or [DEFAULT_MODEL], dtypes, sizes, image_size, num_trials, warmup, compare_torch, bits
        )
        rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with progress(*columns) as bar:
        task = bar.add_task("benchmark", total=len(specs))

        def running(done: int, total: int, group: list[dict]) -> None:
            spec = group[0]
            name = " + ".join(s["engine"] for s in group)
            name += f" {Path(spec['model']).name} {'/'.join(s['dtype'] for s in group)} batch {spec['batch']}"
            name += f" q{spec['bits']}" if spec.get("bits") else ""
            bar.update(task, completed=done, description=name)

        rows += harness.run_all(specs, compare_torch, running)
    info = timing.machine()
    ratios = report.torch_ratios(rows)
    if json:
        typer.echo(json_module.dumps({"machine": info, "results": rows, "torch_ratios": ratios}, indent=2))
    else:
        typer.echo(timing.header(info))
        typer.echo(report.table(rows))
        for r in ratios:
            weights = "" if r["weights"] == "float" else f" ({r['weights']})"
            typer.echo(
                f"{r['model']} batch {r['batch']}: aim-mlx{weights} / torch images/s = {r['ratio']:.2f}x"
            )
    if plot is not None:
        report.plot(rows, plot)
        say(f"wrote the plot to {plot}")
