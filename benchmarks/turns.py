"""Timing in turns, shared by the benchmarks that time several engines or versions on one machine.

Calls are taken A B, B A, A B, ...: call i of every name runs before call i+1 of any, so that a shared
machine's drift hits them alike.
"""

import time
from collections.abc import Callable

PAUSE_S = 0.25  # before each call: the previous call's idle BLAS or OpenMP threads may spin a little longer


def in_turns(
    names: list[str], trials: int, call: Callable[[str], float], between: Callable[[], object] | None = None
) -> dict[str, list[float]]:
    """`trials` timed calls per name, in turns: `call(name)` makes one and returns its seconds;
    `between()`, untimed, runs before each turn (a roofline reading, say)."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(trials):
        if between is not None:
            between()
        for name in names if turn % 2 == 0 else names[::-1]:
            time.sleep(PAUSE_S)
            times[name].append(call(name))
    return times
