"""`aim-mlx models`: the checkpoint table (aim_mlx.checkpoints.variants) with what is in the local cache."""

import typer

from .common import Json


def models(json: Json = False):
    """List the checkpoints and which of them are cached.

    Each with its size, resolution, published ImageNet accuracy and the revision it loads by default.
    """
    from ..checkpoints.hub import is_cached
    from ..checkpoints.variants import VARIANTS

    rows = [
        {
            "id": v.repo_id,
            "params_millions": round(v.num_params / 1e6),
            "resolution": v.image_size or "native",
            "imagenet_top1": v.published_top1,
            "imagenet_top1_protocol": "zero-shot" if v.lit else "attentive probe, frozen trunk",
            "revision": v.revision,
            "license": v.license,
            "cached": is_cached(v.repo_id),
        }
        for v in VARIANTS.values()
    ]
    if json:
        import json as json_module

        typer.echo(json_module.dumps(rows, indent=2))
        return
    width = max(len(r["id"]) for r in rows)
    typer.echo(f"{'model':<{width}}  params  res     top-1  pinned   cached")
    for r in rows:
        top1 = "-" if r["imagenet_top1"] is None else f"{r['imagenet_top1']:.1f}"
        top1 += "*" if r["imagenet_top1_protocol"] == "zero-shot" else ""
        params = f"{r['params_millions'] / 1000:.1f}B"
        cached = "yes" if r["cached"] else "-"
        res = str(r["resolution"])
        typer.echo(f"{r['id']:<{width}}  {params:<6}  {res:<6}  {top1:<5}  {r['revision'][:7]}  {cached}")
    typer.echo(
        "top-1: published ImageNet-1k accuracy, attentive probe on the frozen trunk (* zero-shot); "
        "--json for full revisions"
    )
