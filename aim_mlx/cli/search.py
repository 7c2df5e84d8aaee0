"""`aim-mlx search`: the photo library's best matches for a text, an image or an indexed photo."""

import json as json_module
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from .common import Db, Json, LibraryModel, library_path, load, say

EXAMPLES = [
    'aim-mlx search "a dog running on the beach"',
    "aim-mlx search --image query.jpg -k 20",
    "aim-mlx search --like 1234 --json",
    'aim-mlx search "sunset over the sea" --open',
]


def search(
    query: Annotated[str | None, typer.Argument(metavar="TEXT", hidden=True)] = None,
    image: Annotated[
        Path | None, typer.Option("--image", "-i", metavar="FILE", help="Find photos like this image file.")
    ] = None,
    like: Annotated[
        int | None, typer.Option("--like", metavar="ID", help="Find photos like this indexed photo (its id).")
    ] = None,
    top: Annotated[int, typer.Option("-k", "--top", min=1, metavar="K", help="How many results.")] = 10,
    db: Db = None,
    model: LibraryModel = None,
    json: Json = False,
    open: Annotated[bool, typer.Option("--open", help="Open the best match in the default viewer.")] = False,
):
    """Search the photo library by text, by image or by photo.

    Text needs a library indexed with the LiT checkpoint (the default of `aim-mlx index`), whose image
    embeddings share a space with text. Scores are cosine similarities; the best comes first.
    """
    from aim_mlx.apps.library.search import find

    hits = find(library_path(db), query, image, like, top, model, load)
    if json:
        typer.echo(json_module.dumps([h.to_dict() for h in hits]))
    else:
        for hit in hits:
            typer.echo(f"{hit.score:.4f}  {hit.path}")
        if not hits:
            say("no photos in the library")
    if open and hits:
        _open(hits[0].path)


def _open(path: str) -> None:
    """Open a file in the platform's viewer (macOS `open`, elsewhere `xdg-open`)."""
    import shutil
    import subprocess
    import sys

    opener = "open" if sys.platform == "darwin" else "xdg-open"
    if shutil.which(opener) is None:
        raise ConfigError(f"cannot open {path}: no `{opener}` on this system")
    subprocess.Popen([opener, path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
