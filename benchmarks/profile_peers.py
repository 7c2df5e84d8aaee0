"""Where one image's time goes: aim-mlx's numpy backend against ONNX Runtime's own profile of the same model.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/profile_peers.py [--size large] [--calls 3]

The checkpoint, the ONNX export and both engines are bench_peers.py's. The numpy backend is timed by wall
clock around its pieces (numpy_blocks' projections, attention, norms and SwiGLU activation, wrapped here
for the run); ONNX Runtime by its profiler (SessionOptions.enable_profiling), each node's kernel time, in a
process of its own. ONNX Runtime's calls come first, then aim-mlx's, each after a warm-up and with a reading
of numpy's sgemm rate before each call; each bucket is the mean over the calls. "rest" is the call's wall
time that no bucket holds: for aim-mlx the patch embedding and final norm in MLX, the copies between MLX and
numpy and Python's own time; for ONNX Runtime its executor between nodes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import bench_peers
import turns

GEMMS = ("qkv", "proj", "fc1", "fc3", "fc2")  # aim-mlx's projections, in a block's order
# ONNX Runtime's node names (transformers' modules) -> the same projections; q, k and v are three there.
ORT_GEMMS = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "out_proj": "proj",
    "gate_proj": "fc1",
    "up_proj": "fc3",
    "down_proj": "fc2",
}
LAYOUT_OPS = {"Transpose", "Reshape", "Shape", "Gather", "Unsqueeze", "Concat", "Slice", "ReorderOutput"}


def profile_numpy(engine, x, calls: int, between) -> list[dict[str, float]]:
    """Seconds per bucket for each of `calls` calls of aim-mlx's engine, timed around numpy_blocks' pieces."""
    from aim_mlx.models.aimv2 import BlockStack
    from aim_mlx.platform import numpy_blocks as nb

    stack = next(m for m in engine.native.modules() if isinstance(m, BlockStack) and m.backend is not None)
    names = {id(getattr(w, g, None) or getattr(w.mlp, g)): g for w in stack.backend._weights for g in GEMMS}
    spent: dict[str, float] = defaultdict(float)

    def timed(fn, bucket):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = names[id(args[0])] if bucket is None else bucket
                spent[key] += time.perf_counter() - start

        return wrapper

    patches = {
        (nb._Projection, "__call__"): timed(nb._Projection.__call__, None),
        (nb._Norm, "__call__"): timed(nb._Norm.__call__, "norms"),
        (nb, "_attention"): timed(nb._attention, "attention"),
        (nb, "_silu_mul"): timed(nb._silu_mul, "swiglu"),
    }
    originals = {where: getattr(*where) for where in patches}
    for (owner, attr), fn in patches.items():
        setattr(owner, attr, fn)
    try:
        per_call = []
        for _ in range(calls):
            between()
            spent.clear()
            start = time.perf_counter()
            engine.run(x)
            per_call.append({**spent, "wall": time.perf_counter() - start})
        return per_call
    finally:
        for (owner, attr), fn in originals.items():
            setattr(owner, attr, fn)


def ort_bucket(op: str, node: str) -> str:
    if op in ("MatMul", "Gemm", "FusedMatMul") and (proj := next((p for p in ORT_GEMMS if p in node), None)):
        return ORT_GEMMS[proj]
    if "/attention/" in node and op in ("MatMul", "FusedMatMul", "Softmax"):
        return "attention"
    if op in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
        return "norms"
    if "/ffn/" in node and op in ("QuickGelu", "Mul", "Sigmoid"):
        return "swiglu"
    return "layout ops" if op in LAYOUT_OPS else f"other ({op})"


def profile_ort(path: Path, x, calls: int, between, prefix: str) -> list[dict[str, float]]:
    """Seconds per bucket for each of `calls` calls, from ONNX Runtime's profile (after one warm-up call)."""
    engine = bench_peers.onnxruntime_engine(path, profile=prefix)
    x = engine.prepare(x)
    engine.run(x)  # warm-up
    walls = []
    for _ in range(calls):
        between()
        start = time.perf_counter()
        engine.run(x)
        walls.append(time.perf_counter() - start)
    events = json.loads(Path(engine.native.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][1:]  # no warm-up
    per_call = []
    for run, wall in zip(runs, walls, strict=True):
        spent: dict[str, float] = defaultdict(float)
        nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        for e in nodes:
            if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]:
                spent[ort_bucket(e["args"]["op_name"], e["name"])] += e["dur"] / 1e6
        per_call.append({**spent, "wall": wall})
    return per_call


def mean(per_call: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for call in per_call for k in call}
    return {k: sum(call.get(k, 0.0) for call in per_call) / len(per_call) for k in keys}


def main(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--size", choices=list(bench_peers.SIZES), default="large")
    parser.add_argument("--calls", type=int, default=3, help="profiled calls per engine, after a warm-up")
    parser.add_argument("--ort-child", type=Path, help=argparse.SUPPRESS)  # ONNX Runtime's own process
    args = parser.parse_args(argv)

    from aim_mlx.models.config import VisionConfig
    from aim_mlx.tasks.bench.harness import pixels
    from aim_mlx.tasks.bench.timing import header, machine, sgemm_gflops

    readings = []
    image_size = bench_peers.SIZES[args.size][0]

    def between():
        readings.append(sgemm_gflops(n=bench_peers.SGEMM_N[args.size], trials=3))
        time.sleep(turns.PAUSE_S)  # numpy's BLAS threads may spin a little after the reading

    if args.ort_child:
        prefix = str(args.ort_child.parent / "ort")
        per_call = profile_ort(args.ort_child, pixels(1, image_size), args.calls, between, prefix)
        print(json.dumps({"per_call": per_call, "readings": readings}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder, onnx = Path(tmp) / "checkpoint", Path(tmp) / "aimv2.onnx"
        bench_peers.make_checkpoint(folder, args.size)
        config = VisionConfig.from_dict(json.loads((folder / "config.json").read_text()))
        bench_peers.export_onnx(bench_peers.load_torch_module(folder), image_size, onnx)
        # ONNX Runtime first, in a process of its own without aim-mlx's OpenBLAS (as bench_peers runs it).
        command = [sys.executable, __file__, "--size", args.size, "--calls", str(args.calls)]
        env = dict(os.environ, AIM_MLX_BLAS="0")
        done = subprocess.run([*command, "--ort-child", str(onnx)], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the ONNX Runtime process failed:\n{done.stderr.strip()}")
        child = json.loads(done.stdout.strip().splitlines()[-1])
        theirs, readings = mean(child["per_call"]), child["readings"]
        ours = bench_peers.aim_mlx_engine(folder)
        x = ours.prepare(pixels(1, image_size))
        ours.run(x)  # warm-up
        ours_t = mean(profile_numpy(ours, x, args.calls, between))
    print(header(machine()))
    print(
        f"# batch 1, {config.num_hidden_layers} blocks; mean of {args.calls} calls each; numpy sgemm "
        f"{sum(readings) / len(readings):.1f} GFLOP/s (mean of {len(readings)} readings)"
    )
    n, d, m = (config.image_size // config.patch_size) ** 2, config.hidden_size, config.intermediate_size
    flops = {"qkv": 2 * n * d * 3 * d, "proj": 2 * n * d * d, "fc1": 2 * n * d * m, "fc3": 2 * n * d * m}
    flops = {k: v * config.num_hidden_layers for k, v in {**flops, "fc2": 2 * n * m * d}.items()}
    buckets = [*GEMMS, "attention", "norms", "swiglu"]
    others = sorted((set(theirs) | set(ours_t)) - {*buckets, "wall"})
    for t in (ours_t, theirs):  # the wall time no bucket holds
        t["rest"] = t["wall"] - sum(v for k, v in t.items() if k != "wall")
    print("\n| piece | aim-mlx ms | share | ONNX Runtime ms | share | GFLOP/s aim-mlx | ONNX Runtime |")
    print("|---|---|---|---|---|---|---|")
    for key in [*buckets, *others, "rest", "wall"]:
        a, b = ours_t.get(key, 0.0), theirs.get(key, 0.0)
        rate = f"{flops[key] / a / 1e9:.0f} | {flops[key] / b / 1e9:.0f}" if key in flops else " | "
        print(
            f"| {key} | {1e3 * a:.0f} | {a / ours_t['wall']:.0%} | {1e3 * b:.0f} | {b / theirs['wall']:.0%} "
            f"| {rate} |"
        )
    gemm = sum(flops.values())
    for name, t in (("aim-mlx", ours_t), ("ONNX Runtime", theirs)):
        spent = sum(t.get(k, 0.0) for k in GEMMS)
        print(
            f"{name}: projections {gemm / 1e9:.0f} GFLOP in {spent:.3f} s = {gemm / spent / 1e9:.0f} GFLOP/s"
        )


if __name__ == "__main__":
    sys.exit(main())
