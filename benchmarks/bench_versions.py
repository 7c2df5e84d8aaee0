"""This checkout's aim-mlx against another checkout of it (an earlier commit), AIMv2-L/14-224, fp32, random
weights: did a change slow embedding down?

    git worktree add /tmp/baseline <commit>
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_versions.py /tmp/baseline

Each version runs in its own process, importing aim_mlx from its own tree (PYTHONPATH), on the same
checkpoint folder. Both are loaded side by side and their calls timed in turns (A B, B A, ...) after a
warm-up call, so that a shared machine's drift hits both alike; each round starts them afresh. Prints
images/s and ms per image (p50) per version and batch size, and the ratio this / baseline.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from turns import in_turns  # noqa: E402  (benchmarks/, the script's own folder)

# The child: load the folder with the aim_mlx on its path, then one timed encode_image per "go" line.
CHILD = """
import json, sys, time
import aim_mlx
import mlx.core as mx
import numpy as np
folder, batch = sys.argv[1], int(sys.argv[2])
model, _ = aim_mlx.load(folder)
x = mx.array(np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32))
mx.eval(model.encode_image(x))  # warm-up
print(json.dumps({"aim_mlx": aim_mlx.__file__}), flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    mx.eval(model.encode_image(x))
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
"""


def timed_in_turns(trees: dict[str, Path], folder: str, batch: int, trials: int) -> dict[str, list[float]]:
    procs = {}
    try:
        for name, tree in trees.items():  # one after the other: each load has the machine to itself
            env = dict(os.environ, PYTHONPATH=str(tree))  # and run in the tree: `-c` puts the cwd first
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "cwd": tree}
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", CHILD, folder, str(batch)], env=env, **pipes
            )
            where = json.loads(procs[name].stdout.readline())["aim_mlx"]
            if not where.startswith(str(tree)):
                raise SystemExit(f"{name}: imported aim_mlx from {where}, not from {tree}")

        def call(name: str) -> float:
            procs[name].stdin.write("go\n")
            procs[name].stdin.flush()
            return json.loads(procs[name].stdout.readline())["seconds"]

        return in_turns(list(trees), trials, call)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("baseline", type=Path, help="another checkout of aim-mlx (a git worktree)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--trials", type=int, default=8, help="timed calls per version and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each starting both afresh")
    args = parser.parse_args()

    from checkpoints import LARGE, make_reference, write_checkpoint

    def commit(tree: Path) -> str:
        done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain"], capture_output=True).stdout
        return done.stdout.decode().strip() + ("+changes" if dirty.strip() else "")

    trees = {"this": ROOT, "baseline": args.baseline.resolve()}
    from aim_mlx.tasks.bench.timing import header, machine  # this tree's: the machine is the same for both

    print(header(machine()))
    print(f"# this {commit(ROOT)} against baseline {commit(trees['baseline'])}, AIMv2-L/14-224 float32")
    runs: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(make_reference(seed=0, image_size=224, **LARGE), Path(tmp), "hf")
        for round_ in range(args.rounds):
            for batch in map(int, args.batch_sizes.split(",")):
                order = dict(list(trees.items())[:: 1 if round_ % 2 == 0 else -1])
                for name, times in timed_in_turns(order, tmp, batch, args.trials).items():
                    runs.setdefault((name, batch), []).extend(times)
    print(f"\n{'version':9} {'batch':>5} {'img/s':>7} {'ms/img p50':>10} {'calls':>6}")
    rows = []
    for (name, batch), times in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        p50 = float(np.median(times)) / batch
        rows.append(
            {"version": name, "batch": batch, "images_per_s": 1 / p50, "ms_per_image_p50": 1000 * p50}
        )
        print(f"{name:9} {batch:5d} {1 / p50:7.3f} {1000 * p50:10.0f} {len(times):6d}")
    for batch in sorted({r["batch"] for r in rows}):
        speed = {r["version"]: r["images_per_s"] for r in rows if r["batch"] == batch}
        print(f"batch {batch}: this / baseline images/s = {speed['this'] / speed['baseline']:.3f}x")
    print(json.dumps({"results": rows}))


if __name__ == "__main__":
    main()
