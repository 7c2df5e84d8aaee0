"""Issue #21: `embed` and `index` on 1 and 2 ranks of an mx.distributed job, on this machine's loopback.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_distributed.py

- scaling: the steady images/s of `aim-mlx embed` and `aim-mlx index` (AIMv2-L/14-224, random weights,
  float32, batch 8, real photos) for one process pinned to one core, two ranks under `mlx.launch --backend
  ring` each pinned to its own core, and (for reference) one process on both cores. Each is timed on a small
  and a large set of the same photos; the rate is the difference in images over the difference in time, so
  that start-up and model loading (the same at both sizes) cancel out. Scaling efficiency = 2-rank rate /
  (2 x 1-rank rate).
- gather: what rank 0 pays per round of the exchange (one batch of rows from each rank: indices, float32
  vectors, error lines), timed alone under mlx.launch with two ranks, and its bytes per image.
- rank 0's own work per new file, for the paper estimate: SHA-256 of a 3 MB file, and library writes (rows
  committed per second, a transaction per batch of 8).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from subprocess import PIPE

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
LAUNCH = Path(sys.executable).with_name("mlx.launch")
BATCH = 8

GATHER_SCRIPT = r"""
import json, sys, time
import numpy as np
from aim_mlx.tasks import distributed
from aim_mlx.tasks.embed import Embedded
from pathlib import Path
group = distributed.world()
dim, rounds = int(sys.argv[1]), int(sys.argv[2])
rows = [(i, Embedded(Path(f"{i}.jpg"), np.ones(dim, np.float32))) for i in range(8)]
packed = distributed._pack(group, rows, 8, (dim,))
for _ in range(5):
    distributed._gather(group, packed, (dim,))
start = time.perf_counter()
for _ in range(rounds):
    distributed._gather(group, packed, (dim,))
seconds = (time.perf_counter() - start) / rounds
if group.rank() == 0:
    print(json.dumps({"ms_per_round": 1e3 * seconds, "bytes_per_image": packed[0].nbytes}))
"""


def run(commands: list[list], envs: list[dict]) -> float:
    """Start `commands` together (the ranks of one job), wait for all; the wall time."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
        )
        for cmd, env in zip(commands, envs, strict=True)
    ]
    outputs = [p.communicate() for p in procs]
    seconds = time.perf_counter() - start
    for p, cmd, (out, err) in zip(procs, commands, outputs, strict=True):
        if p.returncode not in (0,):
            raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{out}\n{err}")
    return seconds


SETUPS = ("1 rank, 1 core", "2 ranks, 1 core each", "2 ranks under mlx.launch", "1 process, 2 cores")


def commands(setup: str, args: list, tmp: Path) -> tuple[list[list], list[dict]]:
    """The processes of `setup`, each pinned to its core where it has one, and their environments."""
    aim = [sys.executable, "-m", "aim_mlx", *map(str, args)]
    env = dict(os.environ)
    if "1 core" in setup or "mlx.launch" in setup:
        env["OPENBLAS_NUM_THREADS"] = "1"
    if setup == "1 rank, 1 core":
        return [["taskset", "-c", "0", *aim]], [env]
    if setup == "2 ranks, 1 core each":  # what mlx.launch does on one host, without its I/O loop
        port = _free_port_pair()
        hostfile = tmp / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
        envs = [{**env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)} for r in range(2)]
        return [["taskset", "-c", str(r), *aim] for r in range(2)], envs
    if setup == "2 ranks under mlx.launch":  # the ranks pinned, the launcher not
        pinned = 'exec taskset -c "$MLX_RANK" "$@"'
        return [[LAUNCH, "-n", "2", "--backend", "ring", "--", "sh", "-c", pinned, "sh", *aim]], [env]
    return [aim], [env]  # 1 process, 2 cores


def _free_port_pair() -> int:
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def scaling(folder: Path, small: Path, large: Path, tmp: Path, sizes: tuple[int, int], rounds: int) -> list:
    rows = []
    for what in ("embed", "index"):
        for setup in SETUPS:
            times = {}
            for n, photos in zip(sizes, (small, large), strict=True):
                best = float("inf")
                for r in range(rounds):
                    out = tmp / f"{what}-{r}-{n}"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    if what == "embed":
                        args = ["embed", photos, "-m", folder, "-o", out / "e.npz", "--batch-size", BATCH]
                    else:
                        db = out / "l.sqlite"
                        args = ["index", photos, "-m", folder, "--db", db, "--batch-size", BATCH]
                    best = min(best, run(*commands(setup, args, out)))
                times[n] = best
            rate = (sizes[1] - sizes[0]) / (times[sizes[1]] - times[sizes[0]])
            rows.append({"command": what, "setup": setup, "images_per_s": rate, "wall_s": times})
            print(f"{what:6s} {setup:26s} {rate:6.2f} images/s  (wall {times})", flush=True)
    for what in ("embed", "index"):
        one, two = (
            next(r["images_per_s"] for r in rows if r["command"] == what and r["setup"] == s)
            for s in ("1 rank, 1 core", "2 ranks, 1 core each")
        )
        print(f"{what}: 2 ranks / 1 rank = {two / one:.2f}x, scaling efficiency {two / (2 * one):.0%}")
    return rows


def gather(dim: int, rounds: int, tmp: Path) -> dict:
    """The exchange alone: two ranks started directly (see `commands`), one core each."""
    cmd = [sys.executable, "-c", GATHER_SCRIPT, dim, rounds]
    procs, envs = commands("2 ranks, 1 core each", [], tmp)
    procs = [[*p[:3], *cmd] for p in procs]  # taskset -c R, then the script
    running = [
        subprocess.Popen([str(c) for c in p], stdout=PIPE, text=True, env=e)
        for p, e in zip(procs, envs, strict=True)
    ]
    out = running[0].communicate()[0]
    running[1].wait()
    result = json.loads(out.strip().splitlines()[-1])
    result["ms_per_image"] = result["ms_per_round"] / (2 * BATCH)
    print(f"gather: {result}")
    return result


def launcher_cost(seconds: float = 5.0) -> dict:
    """CPU time mlx.launch itself uses while its two ranks do nothing (its I/O loop polls)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    idle = f"import time; time.sleep({seconds})"
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--", sys.executable, "-c", idle]
    start = time.perf_counter()
    subprocess.run([str(c) for c in cmd], capture_output=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {"wall_s": wall, "cpu_s": cpu, "cores_busy": cpu / wall}
    print(f"mlx.launch with two idle ranks: {result}")
    return result


def rank0_costs(tmp: Path, dim: int) -> dict:
    import hashlib

    from aim_mlx.apps.library.db import FileFacts, Library

    from aim_mlx.registry import ModelInfo

    data = os.urandom(3 << 20)
    start = time.perf_counter()
    for _ in range(20):
        hashlib.sha256(data).hexdigest()
    hash_mb_s = 20 * 3 / (time.perf_counter() - start)
    info = ModelInfo("aimv2", "bench", None, {"embed_dim": dim}, "float32", None, [], "mlx")
    rng = np.random.default_rng(0)
    with Library(tmp / "writes.sqlite") as library:
        model_id = library.model_id(info)
        n = 4000
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        start = time.perf_counter()
        for b in range(0, n, BATCH):
            with library.transaction():
                for i in range(b, b + BATCH):
                    facts = FileFacts(f"/photos/{i}.jpg", 3 << 20, i, f"{i:064x}", 4032, 3024, None)
                    library.put(model_id, facts, vectors[i])
        writes = n / (time.perf_counter() - start)
    result = {"sha256_mb_s": hash_mb_s, "library_rows_per_s": writes}
    print(f"rank 0 per file: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", default="8,40", help="the two set sizes (images)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each command; the fastest counts")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    from bench_library import photos
    from checkpoints import LARGE, make_reference, write_checkpoint, write_processor

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = write_processor(
            write_checkpoint(make_reference(seed=0, image_size=224, **LARGE), tmp / "m"), 224
        )
        (tmp / "all").mkdir()
        paths = photos(tmp / "all", sizes[1])
        small, large = tmp / "small", tmp / "large"
        for target, count in ((small, sizes[0]), (large, sizes[1])):
            target.mkdir()
            for p in paths[:count]:
                os.link(p, target / p.name)
        result = {
            "scaling": scaling(folder, small, large, tmp, sizes, args.rounds),
            "gather": gather(1024, 200, tmp),
            "launcher": launcher_cost(),
            "rank0": rank0_costs(tmp, 768),
        }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
