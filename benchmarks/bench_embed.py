"""aim-mlx against transformers' Aimv2VisionModel (torch) on AIMv2-L/14-224, fp32, random weights.

    python benchmarks/bench_embed.py [--batch-sizes 1,8] [--trials 6] [--rounds 2]

Each engine runs in its own process (so peak RSS is its own) on the same checkpoint folder, with the same
thread count. Both processes are loaded side by side and their calls are timed in turns (aim-mlx, torch,
torch, aim-mlx, ...), with a reading of numpy's sgemm rate before every turn, so that a shared machine's
drift hits all three alike; each round starts the engines afresh and every timed call is pooled. Prints
images/s, latency, peak RSS, the aim-mlx / torch ratio, the sgemm roofline (the median of its readings;
the best reading too) and the fraction of the roofline each engine reaches.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--trials", type=int, default=6, help="timed calls per engine and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each starting every engine afresh")
    args = parser.parse_args()

    from checkpoints import LARGE, make_reference, write_checkpoint

    from aim_mlx.tasks.bench.harness import run_interleaved
    from aim_mlx.tasks.bench.timing import header, machine, sgemm_gflops, summarize

    info = machine()
    print(header(info))
    engines = ("aim-mlx", "torch")
    runs: dict[tuple[str, int], list[dict]] = {}
    readings: list[float] = []  # numpy sgemm GFLOP/s, read before every turn of calls
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(make_reference(seed=0, image_size=224, **LARGE), Path(tmp), "hf")
        for round_ in range(args.rounds):
            for batch in map(int, args.batch_sizes.split(",")):
                order = engines if round_ % 2 == 0 else engines[::-1]
                # `aim-mlx bench`'s own runner, paced: a process per engine; torch keeps its own BLAS.
                common = {"model": tmp, "dtype": "float32", "batch": batch, "image_size": None, "warmup": 1}
                specs = [{"engine": engine, "trials": args.trials, **common} for engine in order]
                done = run_interleaved(specs, between=lambda: readings.append(sgemm_gflops(trials=3)))
                for spec, result in zip(specs, done, strict=True):
                    runs.setdefault((spec["engine"], batch), []).append(result)
    roofline = float(np.median(readings))
    rows = []
    for (engine, batch), done in runs.items():
        times = [t for run in done for t in run["times"]]  # every timed call of every round
        stats = summarize(times, batch, done[0]["flops_per_image"])
        rows.append({"engine": engine, **stats, "peak_rss_mb": max(r["peak_rss_mb"] for r in done)})
    print(
        f"# numpy sgemm roofline: {roofline:.1f} GFLOP/s (median of {len(readings)} readings between the "
        f"calls; best {max(readings):.1f}), threads: {os.cpu_count()}"
    )
    print(
        f"\n{'engine':8} {'batch':>5} {'img/s':>7} {'ms/img p50':>10} {'p95':>8} {'GFLOP/s':>8} "
        f"{'roofline':>8} {'peak RSS':>9}"
    )
    for r in rows:
        print(
            f"{r['engine']:8} {r['batch']:5d} {r['images_per_s']:7.3f} {r['ms_per_image_p50']:10.0f} "
            f"{r['ms_per_image_p95']:8.0f} {r['gflops']:8.1f} {r['gflops'] / roofline:8.0%} "
            f"{r['peak_rss_mb']:7.0f}MB"
        )
    for batch in sorted({r["batch"] for r in rows}):
        speed = {r["engine"]: r["images_per_s"] for r in rows if r["batch"] == batch}
        print(f"batch {batch}: aim-mlx / torch images/s = {speed['aim-mlx'] / speed['torch']:.2f}x")
    roof = {"sgemm_gflops": roofline, "sgemm_best_gflops": max(readings)}
    print(json.dumps({"machine": info, **roof, "results": rows}))


if __name__ == "__main__":
    main()
