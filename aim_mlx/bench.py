"""Timing and machine facts shared by `benchmarks/` and the `bench` command: one timing path for all.

`run_isolated` measures one configuration (model, dtype, batch size, engine) in a fresh process, so that its
load time and peak memory are its own: `python -m aim_mlx.bench '<json spec>'` prints one JSON result.
`run_interleaved` runs several such processes side by side and times their calls in turns.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .config import VisionConfig
from .errors import AimMlxError, ConfigError


def flops_per_image(config: VisionConfig, grid: tuple[int, int] | None = None) -> float:
    """Multiply-add FLOPs of one forward pass (matmuls and attention; norms and activations are noise)."""
    gh, gw = grid or (config.image_size // config.patch_size,) * 2
    n, d, m = gh * gw, config.hidden_size, config.intermediate_size
    patch = 2 * n * d * config.patch_size**2 * config.num_channels
    per_block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * n * d * m * 3 + 2 * 2 * n * n * d
    return float(patch + config.num_hidden_layers * per_block)


def time_calls(
    fn: Callable[[], object], trials: int = 5, warmup: int = 1, before: Callable[[], object] | None = None
) -> list[float]:
    """Wall seconds of `trials` calls of `fn` after `warmup` untimed ones. `fn` must block until done;
    `before()`, untimed, runs ahead of each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(trials):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summarize(times: list[float], batch: int, flops: float | None) -> dict:
    """images/s from the median call, per-image latency percentiles, achieved GFLOP/s (None when the FLOPs
    per image are unknown)."""
    t = np.asarray(times)
    median = float(np.median(t))
    return {
        "batch": batch,
        "images_per_s": batch / median,
        "ms_per_image_p50": 1e3 * median / batch,
        "ms_per_image_p95": 1e3 * float(np.percentile(t, 95)) / batch,
        "gflops": None if flops is None else flops * batch / median / 1e9,
        "trials": len(times),
    }


def sgemm_gflops(n: int = 2048, trials: int = 5) -> float:
    """This machine's fp32 GEMM rate through numpy's BLAS: the roofline the encoders are measured against."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    best = min(time_calls(lambda: a @ b, trials=trials, warmup=1))
    return 2 * n**3 / best / 1e9


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: clear_refs resets VmHWM; elsewhere nothing happens)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far.

    On Linux this is VmHWM, which starts afresh at exec; ru_maxrss would include the parent's peak when the
    process was started with fork+exec (as the benchmarks start their engines).
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, macOS: bytes
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def machine() -> dict:
    """CPU model, cores, OS and library versions, for the header of every result."""
    cpu = platform.processor() or platform.machine()
    if sys.platform == "darwin":  # the chip's name, e.g. "Apple M2 Pro"
        done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        cpu = done.stdout.strip() or cpu
    elif sys.platform == "linux":
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    import mlx.core as mx

    from . import __version__
    from .backends import blas as _blas

    blas = _blas.status()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "numpy": np.__version__,
        "aim_mlx": __version__,
        "mlx_device": str(mx.default_device()),
        "mlx_blas": blas["path"] or ("Accelerate" if sys.platform == "darwin" else "MLX's own"),
        "mlx_blas_kernel": blas["kernel"],
        "numpy_blas_kernel": _numpy_blas_kernel(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),  # when set, it forces both kernels
        "threads": int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count() or 1),
    }


def header(info: dict) -> str:
    """`machine()` as the comment lines that head a printed result."""
    blas = info["mlx_blas"] + (f" ({info['mlx_blas_kernel']} kernels)" if info["mlx_blas_kernel"] else "")
    numpy = info["numpy"] + (
        f" (OpenBLAS, {info['numpy_blas_kernel']} kernels)" if info["numpy_blas_kernel"] else ""
    )
    lines = [
        f"# {info['cpu']}, {info['cores']} cores, {info['os']}",
        f"# mlx {info['mlx']} on {info['mlx_device']}, BLAS {blas}, {info['threads']} threads; "
        f"aim-mlx {info['aim_mlx']}, numpy {numpy}",
    ]
    if info["openblas_coretype"]:
        lines.append(
            f"# OPENBLAS_CORETYPE={info['openblas_coretype']} is set: it picks every OpenBLAS's kernels"
        )
    return "\n".join(lines)


def _numpy_blas_kernel() -> str | None:
    """The CPU kernels numpy's own OpenBLAS runs (the sgemm roofline's), read with threadpoolctl. None without
    threadpoolctl (the test extra has it) or when numpy's BLAS is not the OpenBLAS its wheel bundles."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    numpy_dir = str(Path(np.__file__).parent)  # a prefix of numpy.libs/, where the wheel keeps its OpenBLAS
    for lib in threadpool_info():
        if lib.get("internal_api") == "openblas" and lib["filepath"].startswith(numpy_dir):
            return lib.get("architecture")
    return None


def pixels(batch: int, image_size: int) -> np.ndarray:
    """The benchmark input: seeded normal noise, (B, H, W, 3) float32, the same for every engine."""
    return np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3), dtype=np.float32)


def _measure(spec: dict, load: Callable[[], tuple[object, VisionConfig]], run: Callable) -> dict:
    """Load, time and report one configuration; `run(model, pixels)` must block until done."""
    start = time.perf_counter()
    model, config = load()
    load_s = time.perf_counter() - start
    size = spec.get("image_size") or config.image_size
    if size != config.image_size and not config.is_native:
        raise ConfigError(
            f"{spec['model']} takes {config.image_size}x{config.image_size} images; drop --image-size or "
            "use the native checkpoint"
        )
    if size % config.patch_size:
        raise ConfigError(f"--image-size must be a multiple of {config.patch_size}, got {size}")
    x = pixels(spec["batch"], size)
    reset_peak_rss()  # memory while embedding, with the model resident; not the transient peak of loading
    starts = []  # paced runs: the wall-clock start of each timed call, granted by the parent

    def await_turn():
        _await_turn()
        starts.append(time.time())

    before = await_turn if spec.get("paced") else None
    times = time_calls(lambda: run(model, x), trials=spec["trials"], warmup=spec["warmup"], before=before)
    flops = flops_per_image(config, (size // config.patch_size,) * 2)
    return {
        **spec,
        "image_size": size,
        **summarize(times, spec["batch"], flops),
        "flops_per_image": flops,
        "times": times,
        **({"started": starts} if starts else {}),
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def weight_format(model) -> str:
    """'float', or the bit widths of its quantized layers: 'q4', 'q4+q8'."""
    import mlx.nn as nn

    bits = sorted({m.bits for m in model.modules() if isinstance(m, nn.QuantizedLinear)})
    return "+".join(f"q{b}" for b in bits) or "float"


def run_mlx(spec: dict) -> dict:
    """One aim-mlx configuration in this process; `spec["bits"]` quantizes the loaded model first."""
    import mlx.core as mx

    from . import quantized
    from .loading import load

    def run(model, x):
        mx.eval(model.encode_image(mx.array(x)))

    loaded = {}

    def load_model():
        model, _ = load(spec["model"], revision=spec.get("revision"), dtype=spec.get("dtype"))
        if spec.get("bits"):  # -q: what `convert -q --q-bits BITS` would write, made in memory
            defaults = {
                "group_size": quantized.DEFAULT_GROUP_SIZE,
                "bits": spec["bits"],
                "mode": quantized.MODE,
            }
            quantized.quantize(model, defaults)
            mx.eval(model.parameters())
        loaded["weights"] = weight_format(model)
        return model, getattr(model.config, "vision", model.config)  # a LiT model: its vision tower's

    mx.reset_peak_memory()
    result = _measure(spec, load_model, run)
    mlx_peak = mx.get_peak_memory() / 2**20
    on_gpu = mx.default_device() == mx.gpu
    # On Apple GPUs MLX's allocator sees all the memory that matters; on the CPU numpy buffers and the
    # process's own footprint count too, so the process peak is the honest figure there.
    return {
        **result,
        "weights": loaded["weights"],
        "peak_mlx_mb": mlx_peak,
        "peak_memory_mb": mlx_peak if on_gpu else result["peak_rss_mb"],
    }


def run_torch(spec: dict) -> dict:
    """The same configuration in transformers' Aimv2VisionModel (torch, CPU, float32)."""
    try:
        import torch
        from transformers import Aimv2VisionConfig, Aimv2VisionModel
    except ImportError:
        raise AimMlxError("--compare-torch needs torch and transformers: pip install -e '.[test]'") from None
    import mlx.core as mx

    from . import hub, weights
    from .loading import read_config

    def load_model():
        folder = hub.resolve(spec["model"], spec.get("revision"))
        raw = read_config(folder)
        if "text_config" in raw or "quantization" in raw:
            raise ConfigError(
                f"--compare-torch runs float vision-only checkpoints; {spec['model']} is "
                + ("a LiT checkpoint" if "text_config" in raw else "a quantized folder")
            )
        config = VisionConfig.from_dict(raw)
        state = weights.load_folder(folder, config.num_channels)
        config.is_native = "pos_embed" not in state
        hf = Aimv2VisionConfig(**{**config.to_dict(), "use_head": False})
        hf._attn_implementation = "sdpa"
        net = Aimv2VisionModel(hf).eval()
        state = weights.to_transformers(state)
        net.load_state_dict({k: torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in state.items()})
        return net, config

    def run(net, x):
        with torch.inference_mode():
            net(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).last_hidden_state.mean(1)

    torch.set_num_threads(os.cpu_count() or 1)
    result = _measure({**spec, "dtype": "float32", "bits": None}, load_model, run)
    return {**result, "weights": "float", "peak_mlx_mb": None, "peak_memory_mb": result["peak_rss_mb"]}


def _command(spec: dict) -> list[str]:
    return [sys.executable, "-m", "aim_mlx.bench", json.dumps(spec)]


def _environment(spec: dict) -> dict:
    # torch keeps its own BLAS; MLX only reads the weights there
    return dict(os.environ, **({"AIM_MLX_BLAS": "0"} if spec["engine"] == "torch" else {}))


def run_isolated(spec: dict) -> dict:
    """Run `spec` (engine, model, dtype, batch, ...) in a fresh Python process and return its result."""
    done = subprocess.run(_command(spec), capture_output=True, text=True, env=_environment(spec))
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise AimMlxError(lines[-1].removeprefix("error: ") if lines else f"benchmark process failed: {spec}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _await_turn() -> None:
    """A paced run (see run_interleaved): tell the parent this process is ready, wait for its go."""
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise AimMlxError("paced benchmark: the parent process stopped pacing")


def run_interleaved(specs: list[dict], between: Callable[[], object] | None = None) -> list[dict]:
    """Each spec measured as by run_isolated, but with all processes alive side by side and their timed
    calls taken in turns (A B, B A, A B, ...): call i of every spec runs before call i+1 of any, so that a
    shared machine's drift hits them alike. `between()` runs before each turn (a roofline reading, say).
    The specs must share a trial count."""
    trials = {spec["trials"] for spec in specs}
    if len(trials) != 1:
        raise ConfigError("run_interleaved takes specs with one trial count")
    with ExitStack() as stack:
        procs, lines = [], []
        for spec in specs:  # one after the other, so that each load and warm-up has the machine to itself
            log = stack.enter_context(tempfile.TemporaryFile("w+"))
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": log}
            command, env = _command({**spec, "paced": True}), _environment(spec)
            proc = stack.enter_context(subprocess.Popen(command, text=True, env=env, **pipes))
            stack.callback(proc.kill)  # on the way out, before Popen's own exit waits for it
            procs.append((proc, log))
            lines.append(_next_line(proc, log))  # "ready": loaded and warmed up
        for turn in range(trials.pop()):
            if between is not None:
                between()
            for i in range(len(procs)) if turn % 2 == 0 else reversed(range(len(procs))):
                time.sleep(0.25)  # the previous call's idle BLAS or OpenMP threads may spin a little longer
                proc, log = procs[i]
                proc.stdin.write("go\n")
                proc.stdin.flush()
                lines[i] = _next_line(proc, log)  # "ready" for the next call, the result after the last
        return [json.loads(line) for line in lines]


def _next_line(proc: subprocess.Popen, log) -> str:
    line = proc.stdout.readline()
    if not line:  # the process ended early: its last error line says why
        proc.wait()
        log.seek(0)
        errors = log.read().strip().splitlines()
        raise AimMlxError(
            errors[-1].removeprefix("error: ") if errors else f"benchmark process failed: {proc.args}"
        )
    return line.strip()


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError(
            f"--batch-sizes takes positive integers separated by commas, e.g. 1,8,32; got {text!r}"
        )
    return sizes


def configurations(
    models, dtypes, batch_sizes, image_size, trials, warmup, compare_torch, bits=None
) -> list[dict]:
    """Every (engine, model, dtype, batch) to measure; torch (float32 only) next to aim-mlx when asked.
    `bits` quantizes the aim-mlx models in memory."""
    specs = []
    for model in models:
        for batch in batch_sizes:
            common = {
                "model": model,
                "batch": batch,
                "image_size": image_size,
                "trials": trials,
                "warmup": warmup,
            }
            specs += [{"engine": "aim-mlx", "dtype": dtype, "bits": bits, **common} for dtype in dtypes]
            if compare_torch:
                specs.append({"engine": "torch", "dtype": "float32", **common})
    return specs


def group_by(specs: list[dict], keys: tuple[str, ...]) -> list[list[dict]]:
    """`specs` in groups sharing the values of `keys`, in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for spec in specs:
        groups.setdefault(tuple(spec[k] for k in keys), []).append(spec)
    return list(groups.values())


def torch_ratios(rows: list[dict]) -> list[dict]:
    """aim-mlx / torch images/s per model and batch size, for the float32 aim-mlx runs."""
    torch_speed = {(r["model"], r["batch"]): r["images_per_s"] for r in rows if r["engine"] == "torch"}
    return [
        {
            "model": r["model"],
            "batch": r["batch"],
            "weights": r["weights"],
            "ratio": r["images_per_s"] / torch_speed[r["model"], r["batch"]],
        }
        for r in rows
        if r["engine"] == "aim-mlx" and r["dtype"] == "float32" and (r["model"], r["batch"]) in torch_speed
    ]


def table(rows: list[dict]) -> str:
    """The results as an aligned text table."""
    head = (
        "model",
        "engine",
        "dtype",
        "weights",
        "batch",
        "img/s",
        "ms/img p50",
        "p95",
        "GFLOP/s",
        "peak MB",
        "load s",
    )
    body = [
        (
            Path(r["model"]).name,
            r["engine"],
            r["dtype"],
            r["weights"],
            str(r["batch"]),
            f"{r['images_per_s']:.3f}",
            f"{r['ms_per_image_p50']:.1f}",
            f"{r['ms_per_image_p95']:.1f}",
            "-" if r["gflops"] is None else f"{r['gflops']:.1f}",
            f"{r['peak_memory_mb']:.0f}",
            f"{r['load_s']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (head, *body)
    )


def check_plot_path(path: Path) -> None:
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--plot {path}: use a .png, .svg or .pdf file name")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AimMlxError("--plot needs matplotlib: pip install 'aim-mlx[plot]'") from None


def plot(rows: list[dict], path: Path) -> None:
    """images/s against batch size, one line per (model, engine, dtype, weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault((Path(r["model"]).name, r["engine"], r["dtype"], r["weights"]), []).append(r)
    for (model, engine, dtype, weights), points in lines.items():
        points.sort(key=lambda r: r["batch"])
        ax.plot(
            [r["batch"] for r in points],
            [r["images_per_s"] for r in points],
            marker="o",
            label=f"{model} {engine} {dtype}" + ("" if weights == "float" else f" {weights}"),
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


COREML_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")


def run_coreml(package: Path, trials: int = 5, warmup: int = 1) -> list[dict]:
    """`MLModel.predict` latency of a Core ML package per compute unit. Core ML runs only on macOS."""
    if sys.platform != "darwin":
        raise AimMlxError(f"--coreml needs macOS: Core ML cannot run predictions on {sys.platform}")
    if not package.exists():
        raise ConfigError(f"--coreml {package}: no such package")
    import coremltools as ct
    from PIL import Image

    rows = []
    for unit in COREML_UNITS:
        start = time.perf_counter()
        model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit[unit])
        load_s = time.perf_counter() - start
        feed = {}
        for item in model.get_spec().description.input:
            if item.type.WhichOneof("Type") == "imageType":
                size = (item.type.imageType.width, item.type.imageType.height)
                feed[item.name] = Image.fromarray(
                    np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), np.uint8)
                )
            else:
                shape = tuple(item.type.multiArrayType.shape)
                feed[item.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        times = time_calls(lambda m=model, f=feed: m.predict(f), trials=trials, warmup=warmup)
        compression = model.user_defined_metadata.get("compression", "package")
        rows.append(coreml_row(package, unit, times, load_s, compression))
    return rows


def coreml_row(package: Path, unit: str, times: list[float], load_s: float, compression: str) -> dict:
    """One compute unit's result, in the shape of the MLX rows (its FLOP rate unknown: None)."""
    return {
        "model": str(package),
        "engine": f"coreml {unit}",
        "dtype": "package",
        "weights": compression,
        **summarize(times, 1, None),
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_mlx_mb": None,
        "peak_memory_mb": peak_rss_mb(),
    }


def _child(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        result = (run_torch if spec["engine"] == "torch" else run_mlx)(spec)
    except AimMlxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    if spec.get("paced"):  # stay idle until the parent is done timing the others: exiting takes CPU time
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
