"""`aim-mlx embed`: images (or texts) in, embeddings out; over aim_mlx.tasks.embed and lit.embed_texts."""

from pathlib import Path
from typing import Annotated

import typer

from ..checkpoints.variants import DEFAULT_MODEL, DEFAULT_TEXT_MODEL, find_variant
from ..errors import ConfigError
from .common import (
    BatchSize,
    DTypeOpt,
    Images,
    Pool,
    ProbeOpt,
    Revision,
    all_failed,
    check_output,
    force_option,
    image_paths,
    interrupted,
    load,
    model_option,
    partial,
    plural,
    progress_callback,
    say,
)

EXAMPLES = [
    "aim-mlx embed photo.jpg",
    "aim-mlx embed ~/Pictures -o embeddings.npz --batch-size 16",
    "aim-mlx embed a.jpg b.png --pool none -o tokens.npy",
    "aim-mlx embed clip.mp4 --max-frames 4 -o frames.jsonl",
    'aim-mlx embed --text "a photo of a cat" -o cat.npy',
    "mlx.launch -n 2 --backend ring -- aim-mlx embed ~/Pictures -o e.npz",
]


def embed(
    images: Images = None,
    model: Annotated[
        str | None, model_option("Hub id or local folder.", DEFAULT_MODEL, DEFAULT_TEXT_MODEL)
    ] = None,
    revision: Revision = None,
    batch_size: BatchSize = 8,
    dtype: DTypeOpt = None,
    pool: Annotated[
        Pool, typer.Option(help="mean: one (D,) vector per image; none: its (N, D) token grid.")
    ] = Pool.mean,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write .npy (rows in input order), .npz (embeddings and paths, or texts) or .jsonl "
            "(one object per line). Without it, a summary line per input is printed.",
        ),
    ] = None,
    force: Annotated[bool, force_option("-o file")] = False,
    text: Annotated[
        list[str] | None,
        typer.Option("--text", "-t", metavar="TEXT", help="Embed this text instead of images (repeatable)."),
    ] = None,
    probe: ProbeOpt = None,
    max_frames: Annotated[
        int, typer.Option(metavar="N", help="At most N frames of each video, one per scene.")
    ] = 8,
):
    """Embed images, or texts with the LiT checkpoint.

    IMAGES are image files and folders (walked recursively), embedded in that order. RAW photos need the raw
    extra. A video (the video extra) gives one embedding per frame chosen, one per scene, each named by its
    time in seconds: clip.mp4#t=12.480 (in the summary and in the paths of .npz and .jsonl). Unreadable
    images are named on stderr and skipped; the others are still embedded (exit code 3). With the LiT
    checkpoint, images and texts land in its shared image-text space. With an AIMv1 model (apple/aim-600M,
    ...), an embedding is its features: the probed blocks' mean, pooled by its attention-probe head. Started
    by `mlx.launch` on several ranks, the ranks share the images and rank 0 writes; each host must see the
    files at the same path.
    """
    if text and images:
        raise ConfigError("pass images or --text, not both; run embed once for each")
    if not text and not images:
        raise ConfigError("nothing to embed; pass image files or folders, or --text 'some text'")
    from ..tasks.distributed import follow

    model = model or (DEFAULT_TEXT_MODEL if text else DEFAULT_MODEL)
    if follow(None if text else lambda: load(model, revision, dtype, probe)):  # texts: rank 0 alone
        return  # another rank of an mlx.launch job: rank 0 reads, writes and reports
    if output is not None:
        from ..tasks.embed import check_output as check_format

        output = check_output(output, force, "-o")
        check_format(output)  # a format it writes
    if text:
        if pool is Pool.none:
            raise ConfigError("--pool none applies to images; a text embedding is one vector")
        return _embed_texts(text, model, revision, dtype, output, probe)
    one_array = pool is Pool.none and output is not None and output.suffix.lower() != ".jsonl"
    variant = find_variant(model)
    if one_array and variant is not None and variant.image_size is None:
        from ..tasks.embed import NATIVE_TOKENS

        raise ConfigError(NATIVE_TOKENS)  # known from the id alone: refused before loading
    paths = image_paths(images, max_frames)
    _embed_images(paths, model, revision, batch_size, dtype, pool, output, one_array, probe)


def _embed_images(paths, model, revision, batch_size, dtype, pool, output, one_array, probe) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ..tasks.distributed import embed_files
    from ..tasks.embed import save

    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    done = 0
    try:
        with progress_callback(*columns, hide_at=batch_size) as advance:

            def counted(count: int, total: int) -> None:
                nonlocal done
                done = count
                advance(count, total)

            def load_model():
                return load(model, revision, dtype, probe)

            result = embed_files(load_model, paths, batch_size, pool.value, counted, one_array)
    except KeyboardInterrupt:
        raise interrupted(f"after {done} of {plural(len(paths), 'image')}") from None
    for _, reason in result.failures:
        say(f"skipped {reason}")
    if not result.paths:
        raise all_failed(len(paths))
    if output is None:
        print_embeddings(result.paths, result.embeddings)
    else:
        save(result, output)
        say(f"wrote {plural(len(result.paths), 'embedding')} to {output}")
    if result.failures:
        raise partial(len(result.failures), len(paths))


def _embed_texts(texts: list[str], model: str, revision, dtype, output: Path | None, probe) -> None:
    from ..registry import require_text
    from ..tasks.embed import embed_texts, save

    net, _ = load(model, revision, dtype, probe)
    require_text(net, "embed text")
    result = embed_texts(net, list(texts))  # keyed `text`/`texts` in .jsonl/.npz, not `path`
    if output is None:
        print_embeddings(result.paths, result.embeddings)
        return
    save(result, output)
    say(f"wrote {plural(len(texts), 'embedding')} to {output}")


def print_embeddings(names, embeddings) -> None:
    """The summary without -o: one line per input with its shape, norm and first values."""
    import numpy as np

    for name, emb in zip(names, embeddings, strict=True):
        head = ", ".join(f"{v:+.4f}" for v in emb.reshape(-1)[:4])
        norm = float(np.linalg.norm(emb))
        typer.echo(f"{name}\tshape={tuple(emb.shape)}\tnorm={norm:.4f}\t[{head}, ...]")
