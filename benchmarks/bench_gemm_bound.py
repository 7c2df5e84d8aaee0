"""How close batch 1 can get to the sgemm roofline: AIMv2-L/14-224's trunk with nothing but its GEMMs.

    python benchmarks/bench_gemm_bound.py [--calls 12]

One process, random weights, float32 on the CPU. Three things are timed in turns, a call of each per turn:
- numpy's 2048² sgemm rate (the roofline of bench_embed.py; best of 3 after a warm-up),
- the whole model (`encode_image`, one 224 px image), as bench_embed.py times it,
- the same model's GEMMs alone, through the BLAS calls the numpy backend makes: the patch embedding, then for
  each block the qkv projection (one call on all the cores), attention's two products (batched calls, the
  heads split over the cores), the output projection and the three MLP projections. No softmax, SiLU, norm
  or residual add; each block reads the embedded image, so values stay bounded.
The GEMM-only fraction is a ceiling for the whole model at batch 1 with this BLAS: softmax, norms, SiLU·up
and adds only add time. Prints the medians, their fractions of the median roofline reading, the time the
non-GEMM work takes per block, and how much it may take for the model to reach 80 % of the roofline.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def gemms_only(model, pixels):
    """The model's GEMMs through the BLAS calls the batch-1 forward (the numpy backend's trunk) makes, in its
    order."""
    import threading

    import mlx.core as mx

    from aim_mlx.platform import blas as _blas
    from aim_mlx.platform import workers

    x = model.embed_patches(pixels)  # the patch GEMM (plus a norm and the positions: 0.1 % of the work)
    mx.eval(x)
    _, n, d = x.shape
    x = np.array(x).reshape(n, d)  # every block reads it, so values stay bounded
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        h = attn.num_heads
        qkv, heads = np.empty((n, 3 * d), np.float32), np.empty((n, d), np.float32)
        scores = np.empty((h, n, n), np.float32)
        q, k, v = (qkv[:, i * d : (i + 1) * d].reshape(n, h, -1).transpose(1, 0, 2) for i in range(3))
        o = heads.reshape(n, h, -1).transpose(1, 0, 2)

        def products(lo, hi, q=q, k=k, v=v, o=o, scores=scores):
            _blas.gemm(q[lo:hi], k[lo:hi].transpose(0, 2, 1), scores[lo:hi])
            _blas.gemm(scores[lo:hi], v[lo:hi], o[lo:hi])

        def linear(a, layer):
            out = np.empty((n, layer.weight.shape[0]), np.float32)
            _blas.gemm(a, np.asarray(layer.weight).T, out)
            return out

        _blas.gemm(x, np.asarray(attn.qkv.weight).T, qkv)
        workers.split(products, h, threading.Event())
        linear(heads, attn.proj)
        gate = linear(x, mlp.fc1)
        linear(x, mlp.fc3)
        linear(gate, mlp.fc2)


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--calls", type=int, default=12, help="timed calls of each, taken in turns")
    args = parser.parse_args()

    from checkpoints import LARGE, make_reference, write_checkpoint

    import aim_mlx  # before mlx.core: it gives MLX its fast BLAS
    from aim_mlx.platform import blas
    from aim_mlx.tasks.bench.timing import flops_per_image, header, machine, sgemm_gflops

    if not blas.loaded():  # macOS (Accelerate), or AIM_MLX_BLAS=0: there is no numpy trunk to bound
        raise SystemExit(
            "bench_gemm_bound.py measures the numpy backend's BLAS calls: Linux with the fast BLAS only"
        )

    print(header(machine()))
    import mlx.core as mx

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(make_reference(seed=0, image_size=224, **LARGE), Path(tmp), "hf")
        model, _ = aim_mlx.load(tmp)
    pixels = mx.random.normal((1, 224, 224, 3), key=mx.random.key(0))
    runs = {
        "model": lambda: mx.eval(model.encode_image(pixels)),
        "gemms only": lambda: gemms_only(model, pixels),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    readings = []
    for fn in runs.values():  # warm-up
        fn()
    for turn in range(args.calls):
        readings.append(sgemm_gflops(trials=3))
        for name in list(runs)[:: 1 if turn % 2 == 0 else -1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    roofline, flops = float(np.median(readings)), flops_per_image(model.config)
    blocks = model.config.num_hidden_layers
    median = {name: float(np.median(t)) for name, t in times.items()}
    best = max(readings)
    print(f"# numpy sgemm roofline: {roofline:.1f} GFLOP/s (median of {len(readings)}; best {best:.1f})")
    for name, t in median.items():
        rate = flops / t / 1e9
        print(f"{name:11} {t * 1e3:6.0f} ms/image  {rate:6.1f} GFLOP/s  {rate / roofline:4.0%} of roofline")
    other = (median["model"] - median["gemms only"]) / blocks
    budget = (flops / (0.8 * roofline * 1e9) - median["gemms only"]) / blocks
    print(
        f"non-GEMM work: {other * 1e3:.2f} ms a block; for 80 % of the roofline: {budget * 1e3:.2f} at most"
    )
    result = {"sgemm_gflops": roofline, "median_s": median, "non_gemm_ms_per_block": other * 1e3}
    print(json.dumps({**result, "budget_at_80_ms_per_block": budget * 1e3}))


if __name__ == "__main__":
    main()
