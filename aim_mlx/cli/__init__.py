"""The `aim-mlx` command line: one module per command, each a thin wrapper over a library function.

root.py holds the app and its one way of failing (one `error:` line, exit codes 0/1/2/3/130); common.py the
choices, option types and output checks the commands share. Heavy imports happen inside the commands, so
that `aim-mlx --help` stays instant.
"""

import os
import signal
import sys


def main() -> None:
    """Entry point of the `aim-mlx` script and of `python -m aim_mlx`. The app is imported here, not at the
    top, so that a Ctrl-C while the command line itself loads (Typer, the commands) ends as any other."""
    try:
        from .root import app

        app(prog_name="aim-mlx")
    except KeyboardInterrupt:  # before a command could say how far it got
        sys.stderr.write("interrupted; nothing written\n")
        _exit_interrupted()
    except SystemExit as exc:
        if exc.code == 130:
            _exit_interrupted()
        raise
    finally:
        # The outcome is settled (and any output written): a Ctrl-C while the interpreter tears down would
        # only turn the exit code into a death by SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _exit_interrupted() -> None:
    """Exit 130 at once. An interrupt can land in the middle of importing or starting MLX and its BLAS, and
    tearing the interpreter down after that was seen, rarely, to end the process by SIGINT instead (-2)
    after the line was said; nothing is left to write, so the teardown is skipped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def __getattr__(name: str):
    """`from aim_mlx.cli import app`, for tests and embedding the CLI, without importing it for main()."""
    if name == "app":
        from .root import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
