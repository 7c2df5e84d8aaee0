"""`aim-mlx search`: the photo library's best matches for a query of texts, images and indexed photos,
among the photos that pass its filters."""

import json as json_module
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from .common import Db, Json, LibraryModel, library_path, load, say

EXAMPLES = [
    'aim-mlx search "a dog running on the beach"',
    'aim-mlx search "a dog" + beach.jpg - "people"',
    'aim-mlx search "2:a red car" + id:1234 -k 20',
    "aim-mlx search --image query.jpg --after 2023-06 --before 2023-09",
    'aim-mlx search "a beach" --in ~/Pictures/Trips --in ~/Pictures/2024',
    'aim-mlx search "a lighthouse" --near 48.38,-4.49 --within 50 --camera iphone',
    'aim-mlx search "birthday cake" --min-score 0.2 --json',
    "aim-mlx search --like 1234 --json",
    'aim-mlx search "sunset over the sea" --open',
]
FLAGS = {  # Filters' fields -> the flags that set them
    "after": "--after",
    "before": "--before",
    "folders": "--in",
    "camera": "--camera",
    "near": "--near",
    "within": "--within",
    "min_score": "--min-score",
}


def search(
    query: Annotated[list[str] | None, typer.Argument(metavar="QUERY", hidden=True)] = None,
    image: Annotated[
        Path | None, typer.Option("--image", "-i", metavar="FILE", help="Find photos like this image file.")
    ] = None,
    like: Annotated[
        int | None, typer.Option("--like", metavar="ID", help="Find photos like this indexed photo (its id).")
    ] = None,
    top: Annotated[int, typer.Option("-k", "--top", min=1, metavar="K", help="How many results.")] = 10,
    after: Annotated[
        str | None,
        typer.Option(metavar="DATE", help="Taken on or after: YYYY, YYYY-MM or YYYY-MM-DD (from its start)."),
    ] = None,
    before: Annotated[
        str | None, typer.Option(metavar="DATE", help="Taken before: YYYY, YYYY-MM or YYYY-MM-DD (its start)")
    ] = None,
    folder: Annotated[
        list[Path] | None,
        typer.Option(
            "--in", "--folder", metavar="FOLDER", help="Only photos under this folder (repeat for several)."
        ),
    ] = None,
    camera: Annotated[
        str | None, typer.Option(metavar="TEXT", help="Camera make or model contains TEXT (any case).")
    ] = None,
    near: Annotated[
        str | None, typer.Option(metavar="LAT,LON", help="Taken near this place (with --within).")
    ] = None,
    within: Annotated[
        float | None, typer.Option(metavar="KM", help="... at most KM kilometres from it.")
    ] = None,
    min_score: Annotated[
        float | None, typer.Option("--min-score", metavar="COS", help="Only scores of COS and up (-1 to 1).")
    ] = None,
    db: Db = None,
    model: LibraryModel = None,
    json: Json = False,
    open: Annotated[bool, typer.Option("--open", help="Open the best match in the default viewer.")] = False,
):
    """Search the photo library by texts, images and photos.

    QUERY is one or more terms joined by + and - (separate words): a text, an image file, or an indexed
    photo as id:N (ids are in --json). W: before a term weights it, e.g. "2:a dog". The query vector is the
    normalised weighted sum of the terms' normalised vectors, - terms counted negative (as rclip does), and
    photos given as + id:N terms are left out of the results. Text needs a library indexed with the LiT
    checkpoint (the default of `aim-mlx index`), whose image embeddings share a space with text.

    Filters choose the photos before the best K are taken: a date filter needs the photo's EXIF capture time
    (the camera's clock), --near its GPS position, --camera its EXIF make and model; photos without them do
    not pass. Scores are cosine similarities, -1 to 1, whatever the size of the library; the best comes
    first. --json gives id, path, score, taken (ISO 8601 or null), lat, lon and camera.
    """
    from aim_mlx.apps.library.search import FilterError, Filters, Term, find, parse_query

    terms = parse_query(query or [])
    terms += [Term("image", str(image))] if image is not None else []
    terms += [Term("photo", like)] if like is not None else []
    try:
        folders = [str(f) for f in folder or []]
        filters = Filters.parse(after, before, folders, camera, near, within, min_score)
        hits = find(library_path(db), terms, top, filters, model, load)
    except FilterError as exc:
        raise typer.BadParameter(exc.reason, param_hint=f"'{FLAGS[exc.name]}'") from None
    if json:
        typer.echo(json_module.dumps([h.to_dict() for h in hits]))
    else:
        for hit in hits:
            typer.echo(f"{hit.score:.4f}  {hit.path}")
        if not hits:
            say("no photos matched" if filters else "no photos in the library")
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
