"""Mixed-precision quantization recipes, chosen by name with `aim-mlx convert -q --quant-predicate NAME`.

A recipe turns (model, group size) into a predicate `(path, module) -> dict` giving each Linear its own bit
width; `convert` records every choice per layer in config.json, as mlx-lm does, so loading needs no recipe.
Layers outside the numbered blocks (a LiT head or projection) always get the higher width, like mlx-lm's
treatment of the LM head: they are few and sit right at the output.
"""

import re
from collections.abc import Callable

import mlx.nn as nn

from aim_mlx.errors import ConfigError
from aim_mlx.models.quantized import Predicate

_BLOCK = re.compile(r"^(.*?)blocks\.(\d+)\.")


def _depths(model: nn.Module) -> dict[str, int]:
    """Number of blocks under each prefix ('' for the vision trunk; a LiT model may have several towers)."""
    depths: dict[str, int] = {}
    for path, _ in model.named_modules():
        if m := _BLOCK.match(path + "."):
            depths[m[1]] = max(depths.get(m[1], 0), int(m[2]) + 1)
    return depths


def _mixed(
    model: nn.Module, group_size: int, low: int, high: int, high_here: Callable[[int, int, str], bool]
):
    depths = _depths(model)

    def predicate(path: str, module: nn.Module) -> dict:
        m = _BLOCK.match(path)
        wide = m is None or high_here(int(m[2]), depths[m[1]], path)
        return {"group_size": group_size, "bits": high if wide else low}

    return predicate


def attention_8_mlp_4(model: nn.Module, group_size: int) -> Predicate:
    """8 bits for the attention layers (qkv, proj), 4 bits for the MLP. Measured on a random-weight AIMv2-L
    (benchmarks/bench_quant.py), attention is where 4-bit error hurts the embedding most: keeping it at 8 bits
    took the pooled cosine against float32 from 0.975 to 0.99, for about a third of the weights."""
    return _mixed(model, group_size, 4, 8, lambda i, n, path: ".attn." in f".{path}.")


def ends_4_8(model: nn.Module, group_size: int) -> Predicate:
    """8 bits for every Linear of the first and the last block, 4 bits elsewhere: the ends of a ViT take raw
    patch statistics in and hand the embedding out, and are where quantization error hurts most."""
    return _mixed(model, group_size, 4, 8, lambda i, n, path: i in (0, n - 1))


def outputs_4_6(model: nn.Module, group_size: int) -> Predicate:
    """mlx-lm's mixed rule on a ViT: 6 bits for the layers writing into the residual stream (attn.proj,
    mlp.fc2) in the first and last eighth of the blocks and every third block between, 4 bits elsewhere."""

    def high_here(i: int, n: int, path: str) -> bool:
        writes_residual = path.endswith(("attn.proj", "mlp.fc2"))
        return writes_residual and (i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2)

    return _mixed(model, group_size, 4, 6, high_here)


RECIPES: dict[str, Callable[[nn.Module, int], Predicate]] = {
    "mixed_4_8": attention_8_mlp_4,
    "ends_4_8": ends_4_8,
    "mixed_4_6": outputs_4_6,
}


def recipe(name: str) -> Callable[[nn.Module, int], Predicate]:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(
            f"unknown quantization recipe {name!r}; choose one of {', '.join(RECIPES)}"
        ) from None
