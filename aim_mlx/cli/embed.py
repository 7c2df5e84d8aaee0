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
    progress,
    say,
    value,
)

EXAMPLES = [
    "aim-mlx embed photo.jpg",
    "aim-mlx embed ~/Pictures -o embeddings.npz --batch-size 16",
    "aim-mlx embed a.jpg b.png --pool none -o tokens.npy",
    'aim-mlx embed --text "a photo of a cat" -o cat.npy',
    "mlx.launch -n 2 --backend ring -- aim-mlx embed ~/Pictures -o e.npz",
]
NATIVE_TOKENS = (
    "--pool none on the native-resolution checkpoint gives each image its own token grid, which one array "
    "cannot hold; write .jsonl"
)


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
):
    """Embed images, or texts with the LiT checkpoint.

    IMAGES are image files and folders (walked recursively), embedded in that order. Unreadable images are
    named on stderr and skipped; the others are still embedded (exit code 3). With the LiT checkpoint,
    images and texts land in its shared image-text space. With an AIMv1 model (apple/aim-600M, ...), an
    embedding is its features: the probed blocks' mean, pooled by its attention-probe head. Started by
    `mlx.launch` on several ranks, the ranks share the images and rank 0 writes; each host must see the files
    at the same path.
    """
    if text and images:
        raise ConfigError("pass images or --text, not both; run embed once for each")
    if not text and not images:
        raise ConfigError("nothing to embed; pass image files or folders, or --text 'some text'")
    group = _world()
    if group is not None and group.rank() != 0:  # under mlx.launch: rank 0 reads, writes and reports
        return _work(group, text, model or DEFAULT_MODEL, revision, dtype, probe)
    if output is not None:
        from ..tasks import embed as embedding

        output = check_output(output, force, "-o")
        embedding.check_output(output)  # a format it writes
    if text:
        if pool is Pool.none:
            raise ConfigError("--pool none applies to images; a text embedding is one vector")
        return _embed_texts(text, model or DEFAULT_TEXT_MODEL, revision, dtype, output, probe)
    model = model or DEFAULT_MODEL
    one_array = pool is Pool.none and output is not None and output.suffix.lower() != ".jsonl"
    variant = find_variant(model)
    if one_array and variant is not None and variant.image_size is None:
        raise ConfigError(NATIVE_TOKENS)  # known from the id alone: refused before loading
    paths = image_paths(images)
    _embed_images(paths, model, revision, batch_size, dtype, pool, output, one_array, probe, group)


def _world():
    from ..tasks.distributed import world

    return world()


def _work(group, text, model, revision, dtype, probe) -> None:
    """A rank other than 0 of a distributed `embed`: embed the shares rank 0 sends (texts: rank 0 alone)."""
    from ..loading import load as load_model
    from ..tasks.distributed import work

    if not text:
        work(group, lambda: load_model(model, revision, value(dtype), value(probe)))


def _embed_images(paths, model, revision, batch_size, dtype, pool, output, one_array, probe, group) -> None:
    done = 0
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from ..tasks import embed as embedding

        if group is not None:
            from ..tasks.distributed import start

            start(group, {"batch_size": batch_size, "pool": pool.value})  # the other ranks load meanwhile
        net, processor = load(model, revision, dtype, probe)
        if one_array and net.dims["image_size"] is None:  # native: from a folder, known once it is loaded
            raise ConfigError(NATIVE_TOKENS)
        columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        bar = progress(*columns, hide=len(paths) <= batch_size)
        with bar:
            task = bar.add_task("embed", total=len(paths))

            def advance(count: int) -> None:
                nonlocal done
                done += count
                bar.advance(task, count)

            if group is None:
                items = embedding.iter_embeddings(net, processor, paths, batch_size, pool.value)
            else:
                from ..tasks.distributed import embeddings

                items = embeddings(group, net, processor, paths, batch_size, pool.value)
            result = embedding.collect(items, advance)
    except KeyboardInterrupt:
        raise interrupted(f"after {done} of {plural(len(paths), 'image')}") from None
    for _, reason in result.failures:
        say(f"skipped {reason}")
    if not result.paths:
        raise all_failed(len(paths))
    if output is None:
        print_embeddings(result.paths, result.embeddings)
    else:
        embedding.save(result, output)
        say(f"wrote {plural(len(result.paths), 'embedding')} to {output}")
    if result.failures:
        raise partial(len(result.failures), len(paths))


def _embed_texts(texts: list[str], model: str, revision, dtype, output: Path | None, probe) -> None:
    from ..registry import require_text
    from ..tasks import embed as embedding
    from ..tasks.embed import embed_texts

    net, _ = load(model, revision, dtype, probe)
    require_text(net, "embed text")
    result = embed_texts(net, list(texts))  # keyed `text`/`texts` in .jsonl/.npz, not `path`
    if output is None:
        print_embeddings(result.paths, result.embeddings)
        return
    embedding.save(result, output)
    say(f"wrote {plural(len(texts), 'embedding')} to {output}")


def print_embeddings(names, embeddings) -> None:
    """The summary without -o: one line per input with its shape, norm and first values."""
    import numpy as np

    for name, emb in zip(names, embeddings, strict=True):
        head = ", ".join(f"{v:+.4f}" for v in emb.reshape(-1)[:4])
        norm = float(np.linalg.norm(emb))
        typer.echo(f"{name}\tshape={tuple(emb.shape)}\tnorm={norm:.4f}\t[{head}, ...]")
