"""aim-mlx on MLX's CUDA backend against transformers on torch CUDA, AIMv2-L/14-224, float16 and bfloat16,
random weights: seconds per image at batch 1, 8 and 64, peak GPU memory, and parity against float32 on the
CPU. benchmarks/gpu_check.sh installs MLX's CUDA build and runs this.

    AIM_MLX_DEVICE=gpu python benchmarks/bench_gpu.py [--batch-sizes 1,8,64] [--dtypes float16,bfloat16]
        [--trials 10] [--json FILE]
    AIM_MLX_DEVICE=cpu python benchmarks/bench_gpu.py --size tiny --device cpu   # a dry run of the code

Both engines load the same checkpoint folder in this process and take the same inputs; their calls are
timed in turns after two warm-up calls per batch size, each call ending when the GPU is done (mx.eval,
torch.cuda.synchronize). Peak memory is each framework's own count over a batch size's calls (MLX's
allocator, torch.cuda.max_memory_allocated). Parity: both engines' outputs at --parity-batch against
transformers in float32 on the CPU, as max relative error of last_hidden_state and the pooled embedding;
beyond TOLERANCE the run exits 1, after printing everything.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import bench_peers
import numpy as np
from turns import in_turns

TOLERANCE = {"float16": 2e-2, "bfloat16": 1e-1}  # against float32; a first guess for 24 random blocks


class Pair:
    """aim-mlx and transformers on one device in one dtype, loaded from `folder`; each call returns when the
    device is done."""

    def __init__(self, folder: Path, dtype: str, on_gpu: bool, image_size: int):
        import mlx.core as mx
        import torch
        from transformers import Aimv2VisionModel

        import aim_mlx

        self.mx, self.torch, self.on_gpu, self.image_size = mx, torch, on_gpu, image_size
        self.mx_dtype, self.torch_dtype = getattr(mx, dtype), getattr(torch, dtype)
        self.device = "cuda" if on_gpu else "cpu"
        self.model, _ = aim_mlx.load(str(folder), dtype=dtype)
        net = Aimv2VisionModel.from_pretrained(folder, attn_implementation="sdpa", dtype=self.torch_dtype)
        self.net = net.eval().to(self.device)

    def inputs(self, batch: int):
        from aim_mlx.tasks.bench.harness import pixels

        x = pixels(batch, self.image_size)
        t = self.torch.from_numpy(bench_peers.nchw(x)).to(device=self.device, dtype=self.torch_dtype)
        return {"aim-mlx": self.mx.array(x).astype(self.mx_dtype), "torch": t}

    def run(self, name: str, x):
        if name == "aim-mlx":
            out = self.model(x).last_hidden_state
            self.mx.eval(out)
            return out
        with self.torch.inference_mode():
            out = self.net(pixel_values=x).last_hidden_state
        if self.on_gpu:
            self.torch.cuda.synchronize()
        return out

    def float32(self, name: str, out) -> np.ndarray:
        return np.array(out.astype(self.mx.float32)) if name == "aim-mlx" else out.float().cpu().numpy()

    def reset_peaks(self) -> None:
        self.mx.reset_peak_memory()
        if self.on_gpu:
            self.torch.cuda.reset_peak_memory_stats()

    def peaks_mb(self) -> dict:
        gpu = self.torch.cuda.max_memory_allocated() / 2**20 if self.on_gpu else None
        return {"aim-mlx": self.mx.get_peak_memory() / 2**20, "torch": gpu}


def measure(pair: Pair, dtype: str, batch_sizes, trials: int, ref: np.ndarray) -> tuple[list, list]:
    """Parity rows (at the reference's batch size) and timing rows for one dtype."""
    parity = []
    x = pair.inputs(len(ref))
    for name in ("aim-mlx", "torch"):
        hidden = pair.float32(name, pair.run(name, x[name]))
        errors = bench_peers.rel_err(hidden, ref), bench_peers.rel_err(hidden.mean(1), ref.mean(1))
        parity.append({"engine": name, "dtype": dtype, "last_hidden_state": errors[0], "pooled": errors[1]})
    rows = []
    for batch in batch_sizes:
        x = pair.inputs(batch)
        for _ in range(2):  # warm-up: kernels compiled and tuned, memory pools grown
            for name in x:
                pair.run(name, x[name])
        pair.reset_peaks()

        def call(name, x=x):
            start = time.perf_counter()
            pair.run(name, x[name])
            return time.perf_counter() - start

        times = in_turns(list(x), trials, call)
        peaks = pair.peaks_mb()
        for name, t in times.items():
            p50 = float(np.median(t))
            rows.append(
                {
                    "engine": name,
                    "dtype": dtype,
                    "batch": batch,
                    "s_per_image_p50": p50 / batch,
                    "images_per_s": batch / p50,
                    "peak_memory_mb": peaks[name],
                }  # fmt: skip
            )
    return parity, rows


def main(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--size", choices=list(bench_peers.SIZES), default="large")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="cpu: a dry run")
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--trials", type=int, default=10, help="timed calls per engine, dtype and batch size")
    parser.add_argument("--parity-batch", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import mlx.core as mx
    import torch
    from transformers import Aimv2VisionModel

    from aim_mlx.tasks.bench.harness import parse_batch_sizes, pixels
    from aim_mlx.tasks.bench.timing import header, machine

    on_gpu = args.device == "gpu"
    if on_gpu and not (torch.cuda.is_available() and mx.default_device() == mx.gpu):
        raise SystemExit("no GPU for both: torch.cuda and MLX's default device must both be a GPU")
    info = machine()
    print(header(info))
    gpu = torch.cuda.get_device_name() if on_gpu else "none (a dry run on the CPU)"
    print(f"# torch {torch.__version__} on {gpu}; mlx {mx.__version__} on {mx.default_device()}")
    image_size = bench_peers.SIZES[args.size][0]
    parity, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        bench_peers.make_checkpoint(folder, args.size)
        reference = Aimv2VisionModel.from_pretrained(folder, attn_implementation="sdpa").eval()
        x = torch.from_numpy(bench_peers.nchw(pixels(args.parity_batch, image_size)))
        with torch.inference_mode():
            ref = reference(pixel_values=x).last_hidden_state.numpy()  # float32 on the CPU
        del reference
        for dtype in args.dtypes.split(","):
            pair = Pair(folder, dtype, on_gpu, image_size)
            more_parity, more_rows = measure(
                pair, dtype, parse_batch_sizes(args.batch_sizes), args.trials, ref
            )
            parity, rows = parity + more_parity, rows + more_rows
            del pair
            if on_gpu:
                torch.cuda.empty_cache()
            mx.clear_cache()

    print(f"\n{'engine':8} {'dtype':9} {'batch':>5} {'ms/img p50':>10} {'img/s':>9} {'peak MB':>9}")
    for r in rows:
        peak = "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        print(
            f"{r['engine']:8} {r['dtype']:9} {r['batch']:5d} {1e3 * r['s_per_image_p50']:10.2f} "
            f"{r['images_per_s']:9.1f} {peak:>9}"
        )
    speed = {(r["engine"], r["dtype"], r["batch"]): r["images_per_s"] for r in rows}
    for engine, dtype, batch in speed:
        if engine == "aim-mlx":
            ratio = speed[engine, dtype, batch] / speed["torch", dtype, batch]
            print(f"{dtype} batch {batch}: aim-mlx / torch images/s = {ratio:.2f}x")
    print(f"\nparity at batch {args.parity_batch}: max relative error against transformers, float32, CPU")
    for p in parity:
        errors = f"last_hidden_state {p['last_hidden_state']:.2e} pooled {p['pooled']:.2e}"
        print(f"{p['engine']:8} {p['dtype']:9} {errors}")
    result = {"machine": info, "gpu": gpu, "results": rows, "parity": parity}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    bad = [p for p in parity if max(p["last_hidden_state"], p["pooled"]) > TOLERANCE[p["dtype"]]]
    if bad:
        raise SystemExit(f"parity beyond {TOLERANCE}: {bad}")
    return result


if __name__ == "__main__":
    main()
