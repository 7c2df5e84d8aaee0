"""`aim-mlx index`: bring the photo library up to date with folders; over aim_mlx.apps.library.index."""

import json as json_module
from pathlib import Path
from typing import Annotated

import typer

from ..checkpoints.variants import DEFAULT_TEXT_MODEL
from ..errors import ConfigError
from .common import (
    BatchSize,
    Db,
    DTypeOpt,
    ExitCode,
    Json,
    Revision,
    interrupted,
    library_path,
    load,
    model_option,
    plural,
    progress,
    rate_column,
    say,
    value,
)

EXAMPLES = [
    "aim-mlx index ~/Pictures",
    "aim-mlx index ~/Pictures /Volumes/Photos --dry-run",
    "aim-mlx index ~/Pictures --db ~/photos.sqlite --json",
    "mlx.launch --hosts mac1,mac2 -- aim-mlx index /Volumes/Photos",
]


def index(
    folders: Annotated[list[Path] | None, typer.Argument(metavar="FOLDERS", hidden=True)] = None,
    db: Db = None,
    model: Annotated[str, model_option("Hub id or local folder.", DEFAULT_TEXT_MODEL)] = DEFAULT_TEXT_MODEL,
    revision: Revision = None,
    batch_size: BatchSize = 8,
    dtype: DTypeOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be done; change nothing.")
    ] = False,
    json: Json = False,
):
    """Index photos for search: embed every image under FOLDERS once.

    FOLDERS are folders (walked recursively, skipping hidden folders and macOS bundles unless named) or
    image files. A re-run only touches what changed: unchanged files are not opened, renamed, moved or
    copied photos reuse their vectors, edited ones are embedded again, deleted ones leave the library.
    Unreadable files are recorded with the reason and skipped (exit code 3). Interrupted or killed, the
    library keeps everything finished; run the command again to do the rest. Started by `mlx.launch` on
    several ranks (or machines), the ranks share the embedding and rank 0 alone writes the library; each
    host must see the files at the same path.
    """
    from aim_mlx.apps.library.db import Library
    from aim_mlx.apps.library.index import Summary, known_model, plan
    from aim_mlx.apps.library.index import index as run_index

    from ..loading import default_dtype, origin
    from ..tasks.distributed import RankLost, world

    group = world()
    if group is not None and group.rank() != 0:  # under mlx.launch: rank 0 reads and writes the library
        return None if dry_run else _work(group, model, revision, dtype)
    if not folders:
        raise ConfigError("no folders given; pass the folders (or image files) to index")
    for folder in folders:
        if not folder.expanduser().exists():
            raise ConfigError(f"{folder}: no such file or folder")
    path = library_path(db)
    if dry_run:
        return _dry_run(path, model, folders, json)
    found = origin(model, revision)
    with Library(path) as library:  # a re-run with nothing to do loads no model
        known = known_model(library, found, value(dtype) or default_dtype())
        todo = plan(library, known, folders) if known is not None else None
    nothing = todo is not None and not (todo.todo or todo.gone or todo.missing)
    if group is not None:
        from ..tasks.distributed import start

        start(group, None if nothing else {"batch_size": batch_size, "pool": "mean"})
    if nothing:
        return _report(Summary(unchanged=todo.unchanged), path, found.source, json)
    net, processor = load(model, revision, dtype)
    done = 0
    with Library(path) as library:
        model_id = library.model_id(net.info)
        if model_id != known:
            todo = plan(library, model_id, folders)
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        total = len(todo.todo) + todo.unchanged + len(todo.missing)
        columns = (TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), rate_column("files"))
        bar = progress(*columns, TimeRemainingColumn(), hide=len(todo.todo) <= batch_size)
        try:
            with bar:
                task = bar.add_task("index", total=total, completed=todo.unchanged)

                def advance(kind: str) -> None:
                    nonlocal done
                    done += 1
                    bar.advance(task)

                summary = run_index(library, net, processor, folders, batch_size, advance, todo, group)
        except KeyboardInterrupt:
            raise interrupted(
                f"after {plural(done, 'file')}; what was indexed is kept, run the command again to finish",
                kept=True,
            ) from None
        except RankLost as exc:
            raise RankLost(
                f"{exc}; the library keeps the {plural(done, 'file')} finished; run the command again to "
                "finish"
            ) from None
    _report(summary, path, net.info.source, json)


def _work(group, model: str, revision, dtype) -> None:
    """A rank other than 0 of a distributed `index`: embed the shares rank 0 sends, if it has work."""
    from ..loading import load as load_model
    from ..tasks.distributed import work

    work(group, lambda: load_model(model, revision, value(dtype)))


def _report(summary, path: Path, source: str, json: bool) -> None:
    for _, reason in summary.failed:
        say(f"skipped {reason}")
    if json:
        typer.echo(json_module.dumps({**summary.to_dict(), "database": str(path), "model": source}))
    else:
        typer.echo(
            f"{plural(summary.new, 'new file')}, {summary.changed} changed ({summary.embedded} embedded, "
            f"{summary.reused} reused), {summary.unchanged} unchanged, {summary.removed} removed, "
            f"{len(summary.failed)} failed; library {path}"
        )
    if summary.failed:
        raise typer.Exit(ExitCode.PARTIAL)


def _dry_run(path: Path, model: str, folders: list[Path], json: bool) -> None:
    """What a run would do, without loading the model or creating the library: files are compared with the
    library's index for `model` (matched by hub id or folder), or all new when it has none."""
    from aim_mlx.apps.library.db import Library
    from aim_mlx.apps.library.index import Plan, plan
    from aim_mlx.apps.library.scan import walk

    todo = None
    if path.exists():  # (matched by source alone: recognising the exact model could mean downloading it)
        with Library.reader(path) as library:
            source = str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else model
            ids = [m["id"] for m in library.models() if m["info"]["source"] == source]
            if ids:
                todo = plan(library, ids[-1], folders)
    if todo is None:  # no index for this model yet: every file is new
        todo = Plan(todo=[(p, None, "new") for p in walk(folders)])
    counts = todo.counts()
    if json:
        typer.echo(json_module.dumps({**counts, "database": str(path), "dry_run": True}))
    else:
        typer.echo(
            f"would embed or reuse {plural(counts['new'], 'new file')} and {counts['changed']} changed, "
            f"remove {counts['removed']}, leave {counts['unchanged']} unchanged; library {path}"
        )
