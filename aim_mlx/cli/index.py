"""`aim-mlx index`: bring the photo library up to date with folders; over aim_mlx.apps.library.index."""

import json as json_module
from pathlib import Path
from typing import Annotated

import typer

from ..checkpoints.variants import DEFAULT_TEXT_MODEL
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
    progress_callback,
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
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from aim_mlx.apps.library import index as library_index

    path = library_path(db)
    if dry_run:
        todo = library_index.dry_run(folders or [], path, model)
        if todo is not None:  # None: another rank of an mlx.launch job
            _report_plan(todo.counts(), path, json)
        return
    columns = (TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), rate_column("files"))
    try:
        with progress_callback(*columns, TimeRemainingColumn(), hide_at=batch_size) as advance:
            summary = library_index.update(
                folders or [], path, model, revision, value(dtype), batch_size, advance, load
            )
    except library_index.Interrupted as exc:
        raise interrupted(
            f"after {plural(exc.done, 'file')}; what was indexed is kept, run the command again to finish",
            kept=True,
        ) from None
    if summary is not None:  # None: another rank of an mlx.launch job, which rank 0 reports for
        _report(summary, path, json)


def _report(summary, path: Path, json: bool) -> None:
    for _, reason in summary.failed:
        say(f"skipped {reason}")
    if json:
        typer.echo(json_module.dumps({**summary.to_dict(), "database": str(path), "model": summary.model}))
    else:
        refreshed = f" ({summary.refreshed} re-read for dates and places)" if summary.refreshed else ""
        typer.echo(
            f"{plural(summary.new, 'new file')}, {summary.changed} changed ({summary.embedded} embedded, "
            f"{summary.reused} reused), {summary.unchanged} unchanged{refreshed}, {summary.removed} removed, "
            f"{len(summary.failed)} failed; library {path}"
        )
    if summary.failed:
        raise typer.Exit(ExitCode.PARTIAL)


def _report_plan(counts: dict, path: Path, json: bool) -> None:
    if json:
        typer.echo(json_module.dumps({**counts, "database": str(path), "dry_run": True}))
    else:
        typer.echo(
            f"would embed or reuse {plural(counts['new'], 'new file')} and {counts['changed']} changed, "
            f"remove {counts['removed']}, leave {counts['unchanged']} unchanged; library {path}"
        )
