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
    progress_callback,
    rate_column,
    say,
    value,
)

EXAMPLES = [
    "aim-mlx index ~/Pictures",
    "aim-mlx index ~/Pictures /Volumes/Photos --dry-run",
    "aim-mlx index ~/Pictures --db ~/photos.sqlite --json",
    "aim-mlx index ~/Pictures --watch",
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
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="After indexing, follow the folders' changes until Ctrl-C: each burst of changes is one "
            "batch, each file indexed once it is whole.",
        ),
    ] = False,
    debounce_ms: Annotated[
        int,
        typer.Option(
            min=0, metavar="MS", help="--watch: a batch starts once no change has come for this long."
        ),
    ] = 1000,
    settle_ms: Annotated[
        int,
        typer.Option(
            min=0, metavar="MS", help="--watch: a file is read once its size has held for this long."
        ),
    ] = 1000,
):
    """Index photos for search: embed every image under FOLDERS once.

    FOLDERS are folders (walked recursively, skipping hidden folders and macOS bundles unless named) or
    image files. RAW photos (the raw extra) and videos (the video extra: a few frames each) are indexed
    too; a RAW+JPEG pair and a Live Photo's .mov count as their photo. A re-run only touches what
    changed: unchanged files are not opened, renamed, moved or copied photos reuse their vectors, edited
    ones are embedded again, deleted ones leave the library.
    Unreadable files are recorded with the reason and skipped (exit code 3). Interrupted or killed, the
    library keeps everything finished; run the command again to do the rest. Started by `mlx.launch` on
    several ranks (or machines), the ranks share the embedding and rank 0 alone writes the library; each
    host must see the files at the same path.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from aim_mlx.apps.library import index as library_index

    path = library_path(db)
    if watch and dry_run:
        raise ConfigError("--watch and --dry-run: choose one")
    if watch:
        return _watch(
            folders or [], path, model, revision, value(dtype), batch_size, debounce_ms, settle_ms, json
        )
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


def _watch(folders, path: Path, model: str, revision, dtype, batch_size, debounce_ms, settle_ms, json):
    """Index, then a line (or a JSON line) per batch until Ctrl-C, which says what the watcher did."""
    from aim_mlx.apps.library import watch as library_watch

    def on_batch(summary, changed) -> None:
        for _, reason in summary.failed:
            say(f"skipped {reason}")
        where = ", ".join(map(str, changed))
        if json:
            line = {**summary.to_dict(), "database": str(path), "model": summary.model, "folders": changed}
            typer.echo(json_module.dumps(line, default=str))
        else:
            typer.echo(f"{_counts(summary.to_dict())} in {where}")

    try:
        library_watch.watch(
            folders,
            path,
            model,
            revision,
            dtype,
            batch_size,
            debounce_ms / 1000,
            settle_ms / 1000,
            on_batch=on_batch,
            load=load,
        )
    except library_watch.Interrupted as exc:
        batches = exc.totals.batches
        during = f", and {plural(exc.done, 'file')} of the batch under way" if exc.done else ""
        raise interrupted(
            f"after {batches} batch{'' if batches == 1 else 'es'} ({_counts(exc.totals.to_dict())}{during}); "
            f"library {path}",
            kept=True,
        ) from None


def _counts(counts: dict) -> str:
    failed = counts["failed"] if isinstance(counts["failed"], int) else len(counts["failed"])
    return (
        f"{plural(counts['new'], 'new file')}, {counts['changed']} changed ({counts['embedded']} embedded, "
        f"{counts['reused']} reused), {counts['removed']} removed, {failed} failed"
    )


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
