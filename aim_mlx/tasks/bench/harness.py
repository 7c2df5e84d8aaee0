"""The configurations a benchmark measures, and the child processes that measure them.

`run_isolated` measures one configuration (engine, model, dtype, batch size, ...) in a fresh process, so
that its load time and peak memory are its own: `python -m aim_mlx.tasks.bench '<json spec>'` prints one
JSON result. `run_interleaved` runs several such processes side by side and times their calls in turns.
Both halves of that exchange (the parent's "go", the child's "ready") are here; each engine's module calls
`measure` in the child.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack

import numpy as np

from ...errors import AimMlxError, ConfigError
from ...models.config import VisionConfig
from .timing import flops_per_image, peak_rss_mb, reset_peak_rss, summarize, time_calls


def pixels(batch: int, image_size: int) -> np.ndarray:
    """The benchmark input: seeded normal noise, (B, H, W, 3) float32, the same for every engine."""
    return np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3), dtype=np.float32)


def measure(spec: dict, load: Callable[[], tuple[object, VisionConfig]], run: Callable) -> dict:
    """Load, time and report one configuration; `run(model, pixels)` must block until done."""
    start = time.perf_counter()
    model, config = load()
    load_s = time.perf_counter() - start
    size = spec.get("image_size") or config.image_size
    if size != config.image_size and not config.is_native:
        raise ConfigError(
            f"{spec['model']} takes {config.image_size}x{config.image_size} images; drop --image-size or "
            "use the native checkpoint"
        )
    if size % config.patch_size:
        raise ConfigError(f"--image-size must be a multiple of {config.patch_size}, got {size}")
    x = pixels(spec["batch"], size)
    reset_peak_rss()  # memory while embedding, with the model resident; not the transient peak of loading
    starts = []  # paced runs: the wall-clock start of each timed call, granted by the parent

    def take_turn():
        await_turn()
        starts.append(time.time())

    before = take_turn if spec.get("paced") else None
    times = time_calls(lambda: run(model, x), trials=spec["trials"], warmup=spec["warmup"], before=before)
    flops = flops_per_image(config, (size // config.patch_size,) * 2)
    return {
        **spec,
        "image_size": size,
        **summarize(times, spec["batch"], flops),
        "flops_per_image": flops,
        "times": times,
        **({"started": starts} if starts else {}),
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def _command(spec: dict) -> list[str]:
    return [sys.executable, "-m", "aim_mlx.tasks.bench", json.dumps(spec)]


def _environment(spec: dict) -> dict:
    # torch keeps its own BLAS; MLX only reads the weights there
    return dict(os.environ, **({"AIM_MLX_BLAS": "0"} if spec["engine"] == "torch" else {}))


def run_isolated(spec: dict) -> dict:
    """Run `spec` (engine, model, dtype, batch, ...) in a fresh Python process and return its result."""
    done = subprocess.run(_command(spec), capture_output=True, text=True, env=_environment(spec))
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise AimMlxError(lines[-1].removeprefix("error: ") if lines else f"benchmark process failed: {spec}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def await_turn() -> None:
    """A paced run (see run_interleaved): tell the parent this process is ready, wait for its go."""
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise AimMlxError("paced benchmark: the parent process stopped pacing")


def run_interleaved(specs: list[dict], between: Callable[[], object] | None = None) -> list[dict]:
    """Each spec measured as by run_isolated, but with all processes alive side by side and their timed
    calls taken in turns (A B, B A, A B, ...): call i of every spec runs before call i+1 of any, so that a
    shared machine's drift hits them alike. `between()` runs before each turn (a roofline reading, say).
    The specs must share a trial count."""
    trials = {spec["trials"] for spec in specs}
    if len(trials) != 1:
        raise ConfigError("run_interleaved takes specs with one trial count")
    with ExitStack() as stack:
        procs, lines = [], []
        for spec in specs:  # one after the other, so that each load and warm-up has the machine to itself
            log = stack.enter_context(tempfile.TemporaryFile("w+"))
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": log}
            command, env = _command({**spec, "paced": True}), _environment(spec)
            proc = stack.enter_context(subprocess.Popen(command, text=True, env=env, **pipes))
            stack.callback(proc.kill)  # on the way out, before Popen's own exit waits for it
            procs.append((proc, log))
            lines.append(_next_line(proc, log))  # "ready": loaded and warmed up
        for turn in range(trials.pop()):
            if between is not None:
                between()
            for i in range(len(procs)) if turn % 2 == 0 else reversed(range(len(procs))):
                time.sleep(0.25)  # the previous call's idle BLAS or OpenMP threads may spin a little longer
                proc, log = procs[i]
                proc.stdin.write("go\n")
                proc.stdin.flush()
                lines[i] = _next_line(proc, log)  # "ready" for the next call, the result after the last
        return [json.loads(line) for line in lines]


def _next_line(proc: subprocess.Popen, log) -> str:
    line = proc.stdout.readline()
    if not line:  # the process ended early: its last error line says why
        proc.wait()
        log.seek(0)
        errors = log.read().strip().splitlines()
        raise AimMlxError(
            errors[-1].removeprefix("error: ") if errors else f"benchmark process failed: {proc.args}"
        )
    return line.strip()


def parse_batch_sizes(text: str) -> list[int]:
    """`--batch-sizes 1,8,32` as [1, 8, 32]; anything else is a one-line error before a process starts."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError(
            f"--batch-sizes takes positive integers separated by commas, e.g. 1,8,32; got {text!r}"
        )
    return sizes


def configurations(
    models, dtypes, batch_sizes, image_size, trials, warmup, compare_torch, bits=None
) -> list[dict]:
    """Every (engine, model, dtype, batch) to measure; torch (float32 only) next to aim-mlx when asked.
    `bits` quantizes the aim-mlx models in memory."""
    specs = []
    for model in models:
        for batch in batch_sizes:
            common = {
                "model": model,
                "batch": batch,
                "image_size": image_size,
                "trials": trials,
                "warmup": warmup,
            }
            specs += [{"engine": "aim-mlx", "dtype": dtype, "bits": bits, **common} for dtype in dtypes]
            if compare_torch:
                specs.append({"engine": "torch", "dtype": "float32", **common})
    return specs


def group_by(specs: list[dict], keys: tuple[str, ...]) -> list[list[dict]]:
    """`specs` in groups sharing the values of `keys`, in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for spec in specs:
        groups.setdefault(tuple(spec[k] for k in keys), []).append(spec)
    return list(groups.values())


def run_all(
    specs: list[dict],
    compare_torch: bool = False,
    progress: Callable[[int, int, list[dict]], None] | None = None,
) -> list[dict]:
    """Every spec's result, in order. With torch, each model and batch size is one group whose engines are
    timed in turns (run_interleaved); otherwise each spec runs alone in its own process (run_isolated).
    `progress(specs done, in all, the group about to run)` is called before each group."""
    groups = group_by(specs, ("model", "batch")) if compare_torch else [[spec] for spec in specs]
    rows: list[dict] = []
    for group in groups:
        if progress is not None:
            progress(len(rows), len(specs), group)
        rows += run_interleaved(group) if len(group) > 1 else [run_isolated(group[0])]
    return rows
