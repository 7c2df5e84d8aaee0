"""What the commands share: exit codes, choices, option types, output checks and the lines on stderr.

Nothing heavy is imported here (no MLX, numpy or model code), so that `aim-mlx --help` answers at once.
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum, IntEnum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import AimMlxError, ConfigError
from ..platform.devices import DTYPES


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2  # Click's own code for a bad option or value
    PARTIAL = 3
    INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


EXIT_CODES = {
    ExitCode.OK: "done",
    ExitCode.ERROR: "error, said in one line (AIM_MLX_DEBUG=1 shows the traceback)",
    ExitCode.USAGE: "usage error: an unknown option or a bad value",
    ExitCode.PARTIAL: "some inputs failed and are named on stderr; the others were done",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); nothing written (index keeps what it finished)",
}


def verbatim(title: str, lines: list[str]) -> str:
    """A help block Click prints as written (its \\b marker), for examples and tables that must not be
    reflowed into one paragraph."""
    return "\b\n" + title + "\n" + "\n".join(f"  {line}" for line in lines)


def examples(*commands: str) -> str:
    return verbatim("Examples:", list(commands))


EXIT_CODES_HELP = verbatim("Exit codes:", [f"{int(code):<4} {text}" for code, text in EXIT_CODES.items()])


def choice(name: str, *values: str) -> type[Enum]:
    """A str Enum whose members are named by their values. Typer lists the values in --help and refuses any
    other as a usage error (exit 2)."""
    return Enum(name, [(v, v) for v in values], type=str)


DType = choice("DType", *DTYPES)  # platform.devices imports only the standard library
# The others repeat lists from modules that import MLX (tests/test_cli_help.py keeps them equal).
Pool = choice("Pool", "mean", "none")
Templates = choice("Templates", "imagenet")
QBits = choice("QBits", "4", "8")
QGroupSize = choice("QGroupSize", "32", "64", "128")
QuantRecipe = choice("QuantRecipe", "mixed_4_8", "ends_4_8", "mixed_4_6")
Precision = choice("Precision", "float16", "float32")
Compress = choice("Compress", "none", "int8", "int4", "palettize4", "palettize6", "palettize8")
Target = choice("Target", "macOS14", "iOS17", "macOS15", "iOS18")
InputKind = choice("InputKind", "image", "tensor")
Outputs = choice("Outputs", "pooled", "pooled,tokens")
Probe = choice("Probe", "best", "last")


def value(choice: Enum | str | None):
    """An optional choice as the plain string the library takes (a string stays as it is)."""
    return choice.value if isinstance(choice, Enum) else choice


def model_option(what: str, default: str, text_default: str | None = None):
    """-m/--model with its default in a paragraph of its own: Click wraps option help at hyphens, and a hub
    id broken over two lines cannot be copied. A paragraph stays whole up to 44 columns, the help column's
    width at 80 columns."""
    defaults = [f"Default: {default}"] + ([f"(--text: {text_default})"] if text_default else [])
    return typer.Option(
        "--model", "-m", metavar="MODEL", show_default=False, help="\n\n".join([what, *defaults])
    )


def db_option():
    from ..files import data_dir

    return typer.Option(
        "--db",
        metavar="FILE",
        show_default=False,
        help=f"The library database. Default: {data_dir('library.sqlite')}",
    )


def library_model_option():
    """-m for the commands that read a library: which of the models that indexed it."""
    return typer.Option(
        "--model",
        "-m",
        metavar="MODEL",
        show_default=False,
        help="Which of the library's models (hub id or folder). Default: the only one, or the LiT "
        "checkpoint.",
    )


def library_path(db: Path | None) -> Path:
    from ..files import data_dir

    return (db or data_dir("library.sqlite")).expanduser()


def choices(enum: type[Enum]) -> str:
    """The <a|b> metavar Typer gives a single choice, for a repeatable one (which it labels list[a|b])."""
    return "<" + "|".join(member.value for member in enum) + ">"


# Option types shared by several commands. Metavars: a word in capitals for a value, <a|b> for a choice.
# IMAGES is described in each command's help: Typer would label its row <list[Path]>.
Images = Annotated[list[Path] | None, typer.Argument(metavar="IMAGES", hidden=True)]
Revision = Annotated[
    str | None,
    typer.Option(metavar="REV", help="Hub revision (branch, tag or commit). Default: the one ml-aim pins."),
]
DTypeOpt = Annotated[
    DType | None,
    typer.Option(
        help="Compute dtype. Default: $AIM_MLX_DTYPE if set, else float32 on a CPU (where float16 and "
        "bfloat16 are 20-30x slower), float16 on an Apple GPU."
    ),
]
BatchSize = Annotated[int, typer.Option(min=1, metavar="N", help="Images per forward pass.")]
ProbeOpt = Annotated[
    Probe | None,
    typer.Option(
        help="AIMv1: the attention-probe head to expect, best or last layers (a checkpoint holds one). "
        "Default: the checkpoint's own; the hub repos hold the best-layers heads."
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
Db = Annotated[Path | None, db_option()]
LibraryModel = Annotated[str | None, library_model_option()]


def force_option(what: str):
    return typer.Option("--force", help=f"Replace an existing {what}.")


def say(line: str) -> None:
    """One plain line on stderr (stdout carries only results)."""
    typer.echo(line, err=True)


def warn(message: str) -> None:
    say(f"warning: {message}")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def rate_column(unit: str):
    """A progress column with the items per second done so far."""
    from rich.progress import ProgressColumn

    class Rate(ProgressColumn):
        def render(self, task):
            return f"{task.speed:.1f} {unit}/s" if task.speed else ""

    return Rate()


def progress(*columns, hide: bool = False):
    """A transient rich progress bar on stderr, shown only on a terminal: elsewhere rich would still end
    its line, leaving a blank line in a log."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=hide or not console.is_terminal)


@contextmanager
def progress_callback(*columns, hide_at: int = 0) -> Iterator[Callable[[int, int], None]]:
    """A bar (see `progress`) as a library call's `progress(done, in all)` callback. It appears at the first
    call, so that a spinner the call shows before (loading the model) has ended, and not at all if no more
    than `hide_at` items are left to do then."""
    bar = progress(*columns)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task("", total=total, completed=done)
            if total - done > hide_at:
                bar.start()
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        bar.stop()


@contextmanager
def spinner(text: str) -> Iterator[None]:
    """A spinner on stderr while something runs, on a terminal only (see `progress`)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(text):
        yield


def load(model: str, revision: str | None = None, dtype: DType | str | None = None, probe=None):
    """aim_mlx.load with a spinner on stderr (the library calls that load take it as their `load`)."""
    from ..loading import load as load_model

    with spinner(f"loading {model}"):
        return load_model(model, revision=revision, dtype=value(dtype), probe=value(probe))


def image_paths(images: list[Path] | None, max_frames: int = 8) -> list[Path]:
    """The images to read: files as given, folders walked; each video as up to `max_frames` of its frames."""
    from ..inputs.images import find_images

    if not images:
        raise ConfigError("no images given; pass image files or folders")
    if max_frames < 1:
        raise ConfigError(f"--max-frames must be at least 1, got {max_frames}")
    paths = find_images(images, videos=True, max_frames=max_frames)
    if not paths:
        raise ConfigError(f"no images found in {', '.join(map(str, images))}")
    return paths


def check_output(path: Path, force: bool, flag: str, folder: bool = False) -> Path:
    """The rule for every command that writes, checked before any work: the output's folder must exist (a
    typo there would otherwise cost a whole run), a file output must not be a folder, and whatever is
    already there is replaced only with --force."""
    path = path.expanduser()
    if not folder and path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; name a file to write")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"folder {parent} does not exist; create it first")
    if (path.exists() or path.is_symlink()) and not force:
        raise ConfigError(f"{path} already exists; pass --force to replace it")
    return path


def all_failed(count: int) -> AimMlxError:
    """The error when no image could be used: exit 1 and no output, not a partial result of nothing."""
    return AimMlxError(f"none of the {plural(count, 'image')} could be read")


def partial(failed: int, total: int) -> typer.Exit:
    """Exit 3 after some inputs failed (each already named on stderr) and the others were done."""
    say(f"{failed} of {total} images failed")
    return typer.Exit(ExitCode.PARTIAL)


def interrupted(detail: str = "", kept: bool = False) -> typer.Exit:
    """Exit 130 after a Ctrl-C; `kept`: the detail says what was kept (a library keeps finished work)."""
    say(f"interrupted{' ' + detail if detail else ''}{'' if kept else '; nothing written'}")
    return typer.Exit(ExitCode.INTERRUPTED)


class _Stderr(logging.Handler):
    """Library log records as `warning: ...` lines on the stderr of the moment (tests swap it per call)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:
            self.handleError(record)


@contextmanager
def library_warnings() -> Iterator[None]:
    """Show the library's warnings (e.g. half precision on a CPU) while a command runs. The library logs and
    never prints; only the CLI decides what reaches the terminal. Info records stay hidden."""
    logger = logging.getLogger("aim_mlx")
    handler = _Stderr(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
