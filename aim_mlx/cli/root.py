"""The `aim-mlx` app: its commands in the order a user needs them, and one way of failing for all of them.

Every error is one line on stderr, `error: ...`: aim-mlx's own errors exit 1, Click's usage errors exit 2
(with a pointer to -h, and never in a box), Ctrl-C exits 130. AIM_MLX_DEBUG=1 shows the traceback instead.
"""

import errno
import os
import re
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import AimMlxError, ModelNotFoundError
from ..platform import devices
from . import (
    bench,
    classify,
    convert,
    duplicates,
    embed,
    eval,
    export,
    export_library,
    index,
    models,
    search,
    serve,
    train,
)
from .common import EXIT_CODES_HELP, ExitCode, examples, interrupted, library_warnings, say

SETTINGS = {"help_option_names": ["-h", "--help"]}
ORDER: list[str] = []  # the commands in the order a user needs them: the order they are added at the end
# What the library says in Python, said with the command's flags.
LOCAL_FOLDER = "aim_mlx.load('/path/to/folder')"
REVISION = re.compile(r"\brevision=('[^']*')")


def debugging() -> bool:
    return bool(os.environ.get("AIM_MLX_DEBUG"))


def message(exc: Exception, command: str | None) -> str:
    """The error's one line; a model that cannot be found gets the flag that takes a local folder."""
    text = " ".join(str(exc).split())  # one line, whatever the library wrote
    text = REVISION.sub(r"--revision \1", text)
    if isinstance(exc, ModelNotFoundError):
        flag = "--hf-path DIR" if command == "convert" else "--model DIR"
        text = text.replace(LOCAL_FOLDER, flag)
        if flag not in text:
            text += f" (a local folder: {flag})"
    return text


class AimGroup(TyperGroup):
    """The root command. Catching here, around every subcommand, keeps the commands free of error handling
    and gives `aim-mlx`, `python -m aim_mlx` and the tests' CliRunner the same behaviour."""

    def list_commands(self, ctx) -> list[str]:
        """In the order a user needs them (Typer lists subgroups such as `export` after all commands)."""
        return sorted(
            super().list_commands(ctx), key=lambda name: ORDER.index(name) if name in ORDER else len(ORDER)
        )

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:  # while parsing: Typer would exit 130 without a word
            raise interrupted() from None

    def invoke(self, ctx):
        with library_warnings():
            try:
                devices.current()  # a mistyped AIM_MLX_DEVICE, MLX's CUDA build with no driver: one line
                # here, before a command imports mlx.core (which would raise an ImportError)
                return super().invoke(ctx)
            except AimMlxError as exc:
                if debugging():
                    raise
                say(f"error: {message(exc, ctx.invoked_subcommand)}")
                raise typer.Exit(ExitCode.ERROR) from None
            except OSError as exc:  # a file that cannot be read or written; EPIPE (`| head`) is Click's
                if debugging() or exc.errno == errno.EPIPE:
                    raise
                say(f"error: {exc}")
                raise typer.Exit(ExitCode.ERROR) from None
            except KeyboardInterrupt:  # commands that know how far they got say so themselves
                if debugging():
                    raise
                raise interrupted() from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # Click's usage errors derive from it
            ctx = getattr(exc, "ctx", None)
            if ctx is not None and exc.format_message() == ctx.get_help():  # a group given no command
                say(ctx.get_help())
            else:
                say(f"error: {exc.format_message()}")
                if ctx is not None:
                    say(f"Try '{ctx.command_path} -h' for help.")
            code = exc.exit_code
        if not standalone_mode:
            return code
        sys.exit(int(code) if isinstance(code, int) else ExitCode.OK)


def _version(show: bool) -> None:
    if show:
        typer.echo(f"aim-mlx {__version__}")
        raise typer.Exit()


def typer_app(**kwargs) -> typer.Typer:
    """Plain help (no rich boxes, no <bool> beside flags, paragraphs reflowed to the terminal) and -h."""
    return typer.Typer(
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        add_completion=False,
        no_args_is_help=True,
        context_settings=SETTINGS,
        **kwargs,
    )


app = typer_app(
    name="aim-mlx",
    cls=AimGroup,
    help="Apple's AIM vision encoders on MLX: image embeddings, zero-shot classification, conversion and "
    "Core ML export on your own machine.",
    epilog=EXIT_CODES_HELP,
)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
):
    pass  # the app's help is Typer's `help=`; this callback exists for --version


def add(function, lines: list[str] | None = None) -> None:
    """A command named after its function, with its examples."""
    app.command(epilog=examples(*lines) if lines else None)(function)
    ORDER.append(function.__name__)


def add_group(name: str, help: str, *commands: tuple) -> None:
    """A group of (name, function, examples) subcommands."""
    group = typer_app(help=help)
    for sub, function, lines in commands:
        group.command(sub, epilog=examples(*lines))(function)
    app.add_typer(group, name=name)
    ORDER.append(name)


add(embed.embed, embed.EXAMPLES)
add(classify.classify, classify.EXAMPLES)
add(train.train, train.EXAMPLES)
add_group(
    "eval",
    "Measure accuracy on ImageNet or on labelled folders.",
    ("imagenet", eval.imagenet, eval.EXAMPLES),
    ("folder", eval.folder, eval.FOLDER_EXAMPLES),
)
add(index.index, index.EXAMPLES)
add(search.search, search.EXAMPLES)
add(duplicates.duplicates, duplicates.EXAMPLES)
add(serve.serve, serve.EXAMPLES)
add(models.models)
add(convert.convert, convert.EXAMPLES)
add_group(
    "export",
    "Export a checkpoint, or the photo library's vectors.",
    ("coreml", export.coreml, export.EXAMPLES),
    ("library", export_library.library, export_library.EXAMPLES),
)
add(bench.bench, bench.EXAMPLES)
