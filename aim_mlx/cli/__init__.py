"""The `aim-mlx` command line: one module per command, each a thin wrapper over a library function.

app.py holds the app and its one way of failing (one `error:` line, exit codes 0/1/2/3/130); common.py the
choices, option types and output checks the commands share. Heavy imports happen inside the commands, so
that `aim-mlx --help` stays instant.
"""

from .app import app, main

__all__ = ["app", "main"]
