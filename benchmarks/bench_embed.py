"""aim-mlx against transformers' Aimv2VisionModel (torch) on AIMv2-L/14-224, fp32, random weights.

    python benchmarks/bench_embed.py [--batch-sizes 1,8] [--trials 4] [--rounds 3]

Each engine runs in its own process (so peak RSS is its own) on the same checkpoint folder, with the same
thread count; the engines alternate over several rounds and every timed call of every round is pooled, so
that a shared machine's drift hits both alike. Prints images/s, latency, peak RSS, the aim-mlx / torch
ratio, the machine's numpy sgemm rate (best of the rounds) and the fraction of it each engine reaches.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--trials", type=int, default=4, help="timed calls per engine and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each starting every engine afresh")
    args = parser.parse_args()

    from checkpoints import LARGE, make_reference, write_checkpoint

    from aim_mlx.bench import machine, run_isolated, sgemm_gflops, summarize

    info = machine()
    roofline = sgemm_gflops()
    print(f"# {info['cpu']}, {info['cores']} cores, {info['os']}")
    print(f"# mlx {info['mlx']} ({info['mlx_device']}, BLAS: {info['mlx_blas']}), numpy {info['numpy']}")
    engines = ("aim-mlx", "torch")
    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(make_reference(seed=0, image_size=224, **LARGE), Path(tmp), "hf")
        for round_ in range(args.rounds):  # engines alternate (ABBA) so that drift hits both alike
            roofline = max(roofline, sgemm_gflops())
            for batch in map(int, args.batch_sizes.split(",")):
                for engine in engines if round_ % 2 == 0 else engines[::-1]:
                    # `aim-mlx bench`'s own runner: a fresh process per engine; torch keeps its own BLAS.
                    spec = {"engine": engine, "model": tmp, "dtype": "float32", "batch": batch}
                    spec.update(image_size=None, trials=args.trials, warmup=1)
                    runs.setdefault((engine, batch), []).append(run_isolated(spec))
    rows = []
    for (engine, batch), done in runs.items():
        times = [t for run in done for t in run["times"]]  # every timed call of every round
        stats = summarize(times, batch, done[0]["flops_per_image"])
        rows.append({"engine": engine, **stats, "peak_rss_mb": max(r["peak_rss_mb"] for r in done)})
    print(f"# numpy sgemm roofline: {roofline:.1f} GFLOP/s (best of the rounds), threads: {os.cpu_count()}")
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
    print(json.dumps({"machine": info, "sgemm_gflops": roofline, "results": rows}))


if __name__ == "__main__":
    main()
