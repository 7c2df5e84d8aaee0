"""The `aim-mlx` command line: one module per command, each a thin wrapper over a library function.

root.py holds the app and its one way of failing (one `error:` line, exit codes 0/1/2/3/130); common.py the
choices, option types and output checks the commands share. Heavy imports happen inside the commands, so
that `aim-mlx --help` stays instant.
"""

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
        sys.exit(130)
    finally:
        # The outcome is settled (and any output written): a Ctrl-C while the interpreter tears down would
        # only turn the exit code into a death by SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def __getattr__(name: str):
    """`from aim_mlx.cli import app`, for tests and embedding the CLI, without importing it for main()."""
    if name == "app":
        from .root import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
