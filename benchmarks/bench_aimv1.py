"""Issue #19: AIMv1 aim-600M classification (trunk + attention-probe head, logits) with aim-mlx against torch.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_aimv1.py [--batch-sizes 1,8]

The torch side is the AIMv1 model the tests check aim-mlx against (tests/aimv1_checkpoints.py, written from
ml-aim's architecture), run like ml-aim's classifier: blocks up to the highest probed one, their mean, the
head. Random weights, float32, 224 px, probe "best" (blocks 14-19 of 24). Both engines live in this process
with the same thread count, and their calls are timed in turns (aim-mlx, torch, torch, aim-mlx, ...) so that a
shared machine's drift hits both alike; the median call counts.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import aim_mlx  # noqa: E402  (first: on Linux it gives MLX its BLAS before mlx.core loads)

SIZE_600M = dict(embed_dim=1536, num_heads=12, num_blocks=24, probe_layers=(14, 15, 16, 17, 18, 19))


def torch_logits(reference, pixels_nchw):
    """ml-aim's classifier forward: the blocks up to the highest probed one, their mean, the head."""
    import torch

    with torch.no_grad():
        x = reference.preprocessor(pixels_nchw)
        probed = []
        for i, block in enumerate(reference.trunk.blocks[: max(reference.probe_layers) + 1]):
            x = block(x)
            if i in reference.probe_layers:
                probed.append(x)
        return reference.head.linear(reference.head.pool(torch.stack(probed).mean(0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--trials", type=int, default=6, help="timed calls per engine and batch size")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import mlx.core as mx
    import torch
    from aimv1_checkpoints import make_reference, write_checkpoint

    from aim_mlx.tasks.bench.timing import header, machine

    torch.set_num_threads(os.cpu_count() or 1)
    print(header(machine()))
    reference = make_reference(seed=0, **SIZE_600M)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(reference, Path(tmp))
        model, _ = aim_mlx.load(tmp, dtype="float32")
    threads = torch.get_num_threads()
    print(f"aim-mlx backend: {model.info.backend}; torch {torch.__version__}, {threads} threads")
    rows = []
    for batch in map(int, args.batch_sizes.split(",")):
        pixels = np.random.default_rng(batch).standard_normal((batch, 224, 224, 3)).astype(np.float32)
        x_mlx = mx.array(pixels)
        x_torch = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
        engines = {
            "aim-mlx": lambda x=x_mlx: mx.eval(model.classify(x)),
            "torch": lambda x=x_torch: torch_logits(reference, x),
        }
        got = np.asarray(model.classify(x_mlx))
        want = torch_logits(reference, x_torch).numpy()
        error = float(np.abs(got - want).max() / np.abs(want).max())
        times: dict[str, list[float]] = {name: [] for name in engines}
        for fn in engines.values():
            fn()  # warm-up
        for trial in range(args.trials):
            order = list(engines) if trial % 2 == 0 else list(engines)[::-1]
            for name in order:
                start = time.perf_counter()
                engines[name]()
                times[name].append(time.perf_counter() - start)
        rate = {name: batch / float(np.median(t)) for name, t in times.items()}
        row = {
            "batch": batch,
            "images_per_s": rate,
            "ratio": rate["aim-mlx"] / rate["torch"],
            "max_rel_error": error,
        }
        rows.append(row)
        print(
            f"batch {batch}: aim-mlx {rate['aim-mlx']:.2f} images/s, torch {rate['torch']:.2f} images/s, "
            f"aim-mlx / torch {row['ratio']:.2f}x (logits agree to {error:.1e} of their range)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
