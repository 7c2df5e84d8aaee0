"""aim-mlx against the engines a Linux user would pick for a fast CPU encoder: ONNX Runtime, OpenVINO and
transformers (torch), on AIMv2-L/14-224, float32, random weights.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_peers.py [--size large|tiny]
        [--batch-sizes 1,8] [--rounds 3] [--trials 2] [--engines aim-mlx,onnxruntime,openvino,torch]
        [--json FILE]

One random-weight checkpoint folder (transformers' layout) is loaded by aim-mlx and by transformers'
Aimv2VisionModel; that torch module is exported to ONNX here (torch.onnx.export, opset 17, the TorchScript
exporter, a dynamic batch axis), and the ONNX file runs in ONNX Runtime (CPU EP, one intra-op thread per
core, all graph optimisations) and in OpenVINO (CPU, f32 inference precision, LATENCY hint: one request
takes the whole batch on every core, as the other engines do; THROUGHPUT would split the cores into streams
that only parallel requests fill). Each engine runs in its own process (in one, aim-mlx's OpenBLAS slowed
torch down about 5x), one thread per core; the processes load at once, then their calls are timed in turns,
a reading of numpy's sgemm rate before each turn, and each round reverses the order. Each engine's outputs
(last_hidden_state and the mean-pooled embedding) are checked against every other's; a maximum relative
error above 1e-3 fails the run. Prints the kernels each engine runs, the median seconds per image per
engine and batch size, the fraction of the sgemm rate, and ratios to aim-mlx.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from turns import in_turns  # noqa: E402  (benchmarks/, the script's own folder)

ENGINES = ("aim-mlx", "onnxruntime", "openvino", "torch")
TOLERANCE = 1e-3  # max relative error between any two engines' outputs
SIZES = {"large": (224, "LARGE"), "tiny": (56, "TINY")}  # image size, the dims in tests/checkpoints.py
SGEMM_N = {"large": 2048, "tiny": 512}  # the sgemm reading's square: tiny only checks that the run works


@dataclass
class Engine:
    """A loaded engine: `prepare(pixels NHWC)` makes its input once, `run(input)` returns numpy
    (last_hidden_state (B, N, D), pooled (B, D)) and blocks until done."""

    name: str
    prepare: Callable[[np.ndarray], object]
    run: Callable[[object], tuple[np.ndarray, np.ndarray]]
    kernels: Callable[[], str]  # what the header says of the kernels it runs (asked after a warm-up call)
    native: object = None  # the engine's own handle: aim-mlx's model, ONNX Runtime's session, ...


def nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: the parity tests' measure."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def disagreements(outputs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[tuple[str, str], list[float]]:
    """Every pair of engines' [last_hidden_state, pooled] relative errors (the second engine as the ref)."""
    names = list(outputs)
    return {
        (a, b): [rel_err(x, y) for x, y in zip(outputs[a], outputs[b], strict=True)]
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }


def make_checkpoint(folder: Path, size: str) -> None:
    import checkpoints

    image_size, dims = SIZES[size]
    dims = checkpoints.LARGE if dims == "LARGE" else checkpoints.TINY["large"]
    checkpoints.write_checkpoint(
        checkpoints.make_reference(seed=0, image_size=image_size, **dims), folder, "hf"
    )


def load_torch_module(folder: Path):
    """transformers' Aimv2VisionModel from the folder, returning (last_hidden_state, pooled): the module that
    the torch engine runs and that is exported to ONNX."""
    import torch
    from transformers import Aimv2VisionModel

    class Pooled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            h = self.model(pixel_values=pixel_values).last_hidden_state  # (B, N, D)
            return h, h.mean(dim=1)

    torch.set_num_threads(os.cpu_count() or 1)
    return Pooled(Aimv2VisionModel.from_pretrained(folder, attn_implementation="sdpa").eval())


def export_onnx(module, image_size: int, path: Path) -> Path:
    """`module` as ONNX at `path`, through the TorchScript exporter (dynamo=False): the dynamo one needs
    onnxscript, which nothing else here does."""
    import torch

    example = torch.zeros(1, 3, image_size, image_size)
    batch = {0: "batch"}
    with torch.inference_mode():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            opset_version=17,
            dynamo=False,
            input_names=["pixel_values"],
            output_names=["last_hidden_state", "pooled"],
            dynamic_axes={"pixel_values": batch, "last_hidden_state": batch, "pooled": batch},
        )
    return path


def aim_mlx_engine(folder: Path) -> Engine:
    import mlx.core as mx

    import aim_mlx
    from aim_mlx.platform import backends, blas

    model, _ = aim_mlx.load(str(folder), dtype="float32")

    def run(x):
        out = model(x)
        mx.eval(out.last_hidden_state, out.pooler_output)
        return np.array(out.last_hidden_state), np.array(out.pooler_output)

    status = blas.status()
    kernels = f"{backends.name(model)} backend, OpenBLAS {status['kernel'] or '?'} kernels ({status['path']})"
    return Engine("aim-mlx", mx.array, run, lambda: kernels, model)


def torch_engine(module) -> Engine:
    import torch

    def run(x):
        with torch.inference_mode():
            h, pooled = module(x)
        return h.numpy(), pooled.numpy()

    kernels = (
        f"torch {torch.__version__}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{mkl_sgemm() if torch.backends.mkl.is_available() else 'no MKL'}"
    )
    return Engine("torch", lambda x: torch.from_numpy(nchw(x)), run, lambda: kernels, module)


def mkl_sgemm() -> str:
    """What MKL's verbose mode says of one float32 matmul in torch: its version and the code path it took
    (MKL names an ISA, e.g. AVX-512, only on the Intel CPUs it tunes for), and that the call is an SGEMM."""
    import torch

    with tempfile.TemporaryFile("w+") as log:
        sys.stdout.flush()
        saved = os.dup(1)  # MKL prints to the process's stdout, which carries this child's replies
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
                torch.ones(64, 64) @ torch.ones(64, 64)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = [line.removeprefix("MKL_VERBOSE ") for line in log.read().splitlines()]
    if not lines:
        return "MKL (its verbose mode printed nothing)"
    version = lines[0].split(",")[0].replace(" Product build", ", build")
    call = "SGEMM" if any(line.startswith("SGEMM") for line in lines[1:]) else "not an SGEMM"
    return f"matmuls by MKL, {call}: {version}"


def onnxruntime_engine(path: Path, profile: str | None = None) -> Engine:
    """`profile`: a file prefix; ONNX Runtime then writes its own per-node profile (enable_profiling)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x):
        h, pooled = session.run(None, {"pixel_values": x})
        return h, pooled

    kernels = (
        f"onnxruntime {ort.__version__}, {session.get_providers()[0]}: MLAS, which picks its GEMM kernels by "
        f"CPUID at run time and does not report them; the CPU offers {cpu_isa()}"
    )
    return Engine("onnxruntime", nchw, run, lambda: kernels, session)


def openvino_engine(path: Path) -> Engine:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(x):
        result = request.infer({0: x})
        return result[outputs[0]].copy(), result[outputs[1]].copy()

    def primitives() -> str:
        """The primitive types OpenVINO's CPU plugin chose for the matmuls, from its runtime graph (it knows
        them once a shape has run: call after the warm-up)."""
        found = {}
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = str(info["layerType"].astype(str))
            if kind in ("FullyConnected", "MatMul", "Convolution"):
                found.setdefault(kind, set()).add(str(info["primitiveType"].astype(str)))
        return "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in found.items())

    def kernels() -> str:
        threads, streams = (compiled.get_property(p) for p in ("INFERENCE_NUM_THREADS", "NUM_STREAMS"))
        version = ov.__version__.split("-")[0]
        return f"openvino {version}, CPU, {threads} threads, {streams} stream; {primitives()}"

    return Engine("openvino", nchw, run, kernels, compiled)


def cpu_isa() -> str:
    """The vector extensions /proc/cpuinfo lists that matter for float32 GEMMs."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown extensions"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of AVX2/AVX-512"


def load_engine(name: str, folder: Path, onnx: Path) -> Engine:
    """One engine: aim-mlx and torch read the checkpoint folder, ONNX Runtime and OpenVINO the ONNX file."""
    if name == "aim-mlx":
        return aim_mlx_engine(folder)
    if name == "torch":
        return torch_engine(load_torch_module(folder))
    return onnxruntime_engine(onnx) if name == "onnxruntime" else openvino_engine(onnx)


def child(name: str, folder: Path, onnx: Path, image_size: int, batch_sizes: list[int], out: Path) -> None:
    """An engine's own process: load it, run each batch size once (its outputs saved in `out`), say which
    kernels it ran, then one timed call per line read ("<batch>"), answering the seconds it took."""
    from aim_mlx.tasks.bench.harness import pixels

    engine = load_engine(name, folder, onnx)
    inputs = {b: engine.prepare(pixels(b, image_size)) for b in batch_sizes}
    for batch in batch_sizes:  # the warm-up calls
        hidden, pooled = engine.run(inputs[batch])
        np.savez(out / f"{name}-{batch}.npz", last_hidden_state=hidden, pooled=pooled)
    print(json.dumps({"kernels": engine.kernels()}), flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        engine.run(inputs[int(line)])
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def measure(names, folder: Path, onnx: Path, size: str, batch_sizes, rounds: int, trials: int) -> dict:
    """Each engine in its own process, all loading at once; then their calls in turns, a reading of
    numpy's sgemm rate before each turn. Returns each engine's kernels and warm-up outputs, every timed
    call, and the sgemm readings."""
    from aim_mlx.tasks.bench.timing import sgemm_gflops

    out = onnx.parent
    with ExitStack() as stack:
        procs = {}
        for name in names:
            command = [sys.executable, __file__, "--child", name, "--size", size, "--folder", str(folder)]
            command += ["--onnx", str(onnx), "--batch-sizes", ",".join(map(str, batch_sizes))]
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
            # Only aim-mlx's process loads aim-mlx's OpenBLAS: loaded with RTLD_GLOBAL, it made torch in the
            # same process about 5x slower (measured: all four engines shared one process at first).
            env = dict(os.environ, **({} if name == "aim-mlx" else {"AIM_MLX_BLAS": "0"}))
            procs[name] = stack.enter_context(subprocess.Popen(command, env=env, **pipes))
            stack.callback(procs[name].kill)
        kernels = {name: _reply(proc, name)["kernels"] for name, proc in procs.items()}  # all loaded at once
        readings: list[float] = []
        times: dict[tuple[str, int], list[float]] = {}
        for round_ in range(rounds):
            for batch in batch_sizes:

                def call(name, batch=batch):
                    procs[name].stdin.write(f"{batch}\n")
                    procs[name].stdin.flush()
                    return _reply(procs[name], name)["seconds"]

                order = names if round_ % 2 == 0 else names[::-1]
                between = lambda: readings.append(sgemm_gflops(n=SGEMM_N[size], trials=3))  # noqa: E731
                for name, t in in_turns(order, trials, call, between).items():
                    times.setdefault((name, batch), []).extend(t)
    outputs = {
        b: {
            n: tuple(np.load(out / f"{n}-{b}.npz")[k] for k in ("last_hidden_state", "pooled")) for n in names
        }
        for b in batch_sizes
    }
    return {"kernels": kernels, "outputs": outputs, "times": times, "readings": readings}


def _reply(proc: subprocess.Popen, name: str) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the {name} process ended early (exit status {proc.wait()}); its errors are above")
    return json.loads(line)


def agreement(outputs: dict[int, dict]) -> list[dict]:
    """Every pair's relative errors at every batch size: {batch, engines, last_hidden_state, pooled}."""
    return [
        {"batch": batch, "engines": [a, b], "last_hidden_state": hidden, "pooled": pooled}
        for batch, by_engine in outputs.items()
        for (a, b), (hidden, pooled) in disagreements(by_engine).items()
    ]


def main(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--size", choices=list(SIZES), default="large", help="tiny: a fast check")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each taking the engines in turn")
    parser.add_argument("--trials", type=int, default=2, help="timed calls per engine, batch size and round")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--json", type=Path, help="write the results here as well")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)  # an engine's own process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.engines.split(",")
    if any(n not in ENGINES for n in names) or len(set(names)) != len(names):
        raise SystemExit(f"--engines takes distinct names among {', '.join(ENGINES)}; got {args.engines!r}")

    from aim_mlx.models.config import VisionConfig
    from aim_mlx.tasks.bench.harness import parse_batch_sizes
    from aim_mlx.tasks.bench.timing import flops_per_image, header, machine, summarize

    batch_sizes = parse_batch_sizes(args.batch_sizes)
    image_size = SIZES[args.size][0]
    if args.child:
        return child(args.child, args.folder, args.onnx, image_size, batch_sizes, args.onnx.parent)
    with tempfile.TemporaryDirectory() as tmp:
        folder, onnx = Path(tmp) / "checkpoint", Path(tmp) / "aimv2.onnx"
        make_checkpoint(folder, args.size)
        config = VisionConfig.from_dict(json.loads((folder / "config.json").read_text()))
        if {"onnxruntime", "openvino"} & set(names):
            export_onnx(load_torch_module(folder), image_size, onnx)
        done = measure(names, folder, onnx, args.size, batch_sizes, args.rounds, args.trials)
    info = machine()
    print(header(info))
    for name, kernels in done["kernels"].items():
        print(f"# {name}: {kernels}")
    roofline = float(np.median(done["readings"]))
    print(
        f"# numpy sgemm rate: {roofline:.1f} GFLOP/s (median of {len(done['readings'])} readings between the "
        f"turns; best {max(done['readings']):.1f}); load average {os.getloadavg()[0]:.2f} at the end"
    )
    model = f"AIMv2-L/14-224 ({config.num_hidden_layers} blocks)" if args.size == "large" else "tiny AIMv2"
    print(
        f"# {model}, float32, {args.rounds} rounds x {args.trials} calls in turns per engine and batch size"
    )

    flops = flops_per_image(config)
    rows = []
    for (name, batch), times in done["times"].items():
        stats = summarize(times, batch, flops)
        rows.append({"engine": name, **stats, "s_per_image_p50": stats["ms_per_image_p50"] / 1e3})
    columns = ("s/img p50", "p95", "img/s", "GFLOP/s", "of sgemm")
    print(f"\n{'engine':12} {'batch':>5} " + " ".join(f"{c:>9}" for c in columns))
    for r in sorted(rows, key=lambda r: (r["batch"], names.index(r["engine"]))):
        print(
            f"{r['engine']:12} {r['batch']:5d} {r['s_per_image_p50']:9.3f} {r['ms_per_image_p95'] / 1e3:9.3f}"
            f" {r['images_per_s']:9.3f} {r['gflops']:9.1f} {r['gflops'] / roofline:9.0%}"
        )
    if "aim-mlx" in names:
        for batch in batch_sizes:
            speed = {r["engine"]: r["images_per_s"] for r in rows if r["batch"] == batch}
            ratios = ", ".join(f"{n} {speed['aim-mlx'] / speed[n]:.2f}x" for n in names if n != "aim-mlx")
            print(f"batch {batch}: aim-mlx images/s over {ratios}")

    print("\nagreement: max relative error of last_hidden_state, pooled (the second engine as reference)")
    agreed = agreement(done["outputs"])
    for a in agreed:
        first, second = a["engines"]
        print(f"batch {a['batch']}: {first:12} vs {second:12} {a['last_hidden_state']:.2e} {a['pooled']:.2e}")
    worst = max(max(a["last_hidden_state"], a["pooled"]) for a in agreed) if agreed else 0.0
    result = {
        "machine": info,
        "kernels": done["kernels"],
        "sgemm_gflops": roofline,
        "sgemm_best_gflops": max(done["readings"]),
        "results": rows,
        "agreement": agreed,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if worst > TOLERANCE:
        raise SystemExit(f"engines disagree: a max relative error of {worst:.2e} is above {TOLERANCE:g}")
    return {**result, "outputs": done["outputs"]}  # {batch: {engine: warm-up outputs}}, for the tests


if __name__ == "__main__":
    main()
