"""`aim-mlx duplicates`: groups of identical and near-identical photos in the library."""

import json as json_module
from typing import Annotated

import typer

from .common import Db, Json, LibraryModel, library_path, say

EXAMPLES = ["aim-mlx duplicates", "aim-mlx duplicates --threshold 0.98 --json"]


def duplicates(
    threshold: Annotated[
        float,
        typer.Option(
            min=-1.0, max=1.0, metavar="COS", help="Cosine at or above which two photos count as near copies."
        ),
    ] = 0.95,
    db: Db = None,
    model: LibraryModel = None,
    json: Json = False,
):
    """List groups of duplicate photos, largest first.

    Exact copies share their bytes; near copies (resized, re-encoded, lightly edited) have embeddings within
    the threshold of each other. Nothing is deleted.
    """
    from aim_mlx.apps.library.db import Library
    from aim_mlx.apps.library.duplicates import groups
    from aim_mlx.apps.library.search import choose_model

    with Library.reader(library_path(db)) as library:
        found = groups(library, choose_model(library, model)["id"], threshold)
    if json:
        typer.echo(json_module.dumps(found))
        return
    for group in found:
        kind = "identical" if group["exact"] else f"near (cosine >= {group['score']:.3f})"
        typer.echo(f"{len(group['paths'])} photos, {kind}:")
        for path in group["paths"]:
            typer.echo(f"  {path}")
    if not found:
        say(f"no duplicates at cosine >= {threshold}")
