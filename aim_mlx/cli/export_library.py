"""`aim-mlx export library`: the photo library's vectors with their paths, for other tools."""

from pathlib import Path
from typing import Annotated

import typer

from .common import Db, LibraryModel, check_output, force_option, library_path, plural, say

EXAMPLES = ["aim-mlx export library -o photos.npz", "aim-mlx export library -o photos.npz -m ./my-lit-model"]


def library(
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="The .npz file to write.")],
    db: Db = None,
    model: LibraryModel = None,
    force: Annotated[bool, force_option("output")] = False,
):
    """Write the photo library's vectors to an .npz file.

    The file holds `embeddings` ((n, D) float32, L2-normalised), `paths` and `ids` in the same order, and
    the model that made them (`model`: its hub id or folder; `model_key`: its identity).
    """
    from aim_mlx.apps.library.db import Library
    from aim_mlx.apps.library.search import choose_model

    from ..errors import ConfigError

    if output.suffix.lower() != ".npz":
        raise ConfigError(f"-o {output}: the library exports to .npz; name the file *.npz")
    output = check_output(output, force, "-o")
    with Library.reader(library_path(db)) as lib:
        entry = choose_model(lib, model)
        count = lib.export_npz(entry["id"], output)
    say(f"wrote {plural(count, 'vector')} from {entry['info']['source']} to {output}")
