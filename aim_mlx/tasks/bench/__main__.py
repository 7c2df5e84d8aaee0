"""A benchmark child process: `python -m aim_mlx.tasks.bench '<json spec>'` (started by harness.run_isolated
and harness.run_interleaved).

It prints one JSON result as its last stdout line, or an `error: ...` line on stderr and exits 1. A paced
child then stays idle until the parent closes its stdin: exiting takes CPU time the others are timed in.
"""

import json
import sys

from ...errors import AimMlxError


def run(spec: dict) -> dict:
    """Measure `spec` with its engine; torch is imported only for a torch spec."""
    if spec["engine"] == "torch":
        from .torch_engine import run_torch

        return run_torch(spec)
    from .mlx_engine import run_mlx

    return run_mlx(spec)


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        result = run(spec)
    except AimMlxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    if spec.get("paced"):
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
