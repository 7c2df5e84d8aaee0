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
import subprocess
import sys
import tempfile
from pathlib import Path

import aim_mlx  # before anything imports mlx.core: MLX gets the fast BLAS (unless AIM_MLX_BLAS=0)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run_engine(engine: str, folder: str, batch: int, trials: int) -> dict:
    if engine == "aim-mlx":
        import mlx.core as mx

        model, _ = aim_mlx.load(folder, dtype="float32")
        config = model.config
        x = mx.random.normal((batch, 224, 224, 3))
        fn = lambda: mx.eval(model.encode_image(x))  # noqa: E731
    else:
        import torch
        from transformers import Aimv2VisionModel

        from aim_mlx.config import VisionConfig

        torch.set_num_threads(os.cpu_count())
        net = Aimv2VisionModel.from_pretrained(folder).eval()
        config = VisionConfig.from_dict(net.config.to_dict())
        x = torch.randn(batch, 3, 224, 224)

        def fn():
            with torch.inference_mode():
                net(pixel_values=x).last_hidden_state.mean(1)

    from aim_mlx.bench import flops_per_image, peak_rss_mb, time_calls

    times = time_calls(fn, trials=trials, warmup=1)
    return {"times": times, "flops": flops_per_image(config), "peak_rss_mb": peak_rss_mb()}


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--trials", type=int, default=4, help="timed calls per engine and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each starting every engine afresh")
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "FOLDER", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, folder, batch = args.child
        print(json.dumps(run_engine(engine, folder, int(batch), args.trials)))
        return

    from checkpoints import LARGE, make_reference, write_checkpoint

    from aim_mlx.bench import machine, sgemm_gflops, summarize

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
                    child = ["--trials", str(args.trials), "--child", engine, tmp, str(batch)]
                    # torch keeps its own BLAS: aim-mlx's OpenBLAS is not loaded into its process.
                    env = {**os.environ, "AIM_MLX_BLAS": "1" if engine == "aim-mlx" else "0"}
                    cmd = [sys.executable, __file__, *child]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                    runs.setdefault((engine, batch), []).append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for (engine, batch), done in runs.items():
        times = [t for run in done for t in run["times"]]  # every timed call of every round
        stats = summarize(times, batch, done[0]["flops"])
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
