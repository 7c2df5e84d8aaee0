"""`convert`: a checkpoint (hub id or folder, any published layout) in, a converted MLX folder out.

The folder holds config.json (the source's, plus a mlx-lm style `quantization` block and where it came from),
the weights in aim-mlx's own layout (`model.safetensors`, or shards of at most 5 GB with an index),
preprocessor_config.json, the source's tokenizer files and a README.md model card. `aim_mlx.load(folder)`
reads it like any other checkpoint.

The source is loaded through `aim_mlx.load`, so it gets the same checks (safe format, strict keys and
shapes), in float32; it is then cast and quantized a tensor at a time, each new tensor replacing the float32
one it came from, so peak memory stays near the float32 checkpoint's size. Everything is written to a hidden
folder beside the output and renamed into place when complete (aim_mlx.files.atomic_folder).
"""

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from aim_mlx import __version__
from aim_mlx.checkpoints import hub, weights
from aim_mlx.checkpoints.folder import CONFIG_FILE, INDEX_FILE, PREPROCESSOR_FILE, TOKENIZER_FILES
from aim_mlx.checkpoints.variants import find_variant
from aim_mlx.errors import ConfigError
from aim_mlx.files import atomic_folder
from aim_mlx.loading import DTYPES, load, read_config
from aim_mlx.models import quantized
from aim_mlx.models.quantized import DEFAULT_GROUP_SIZE, GROUP_SIZES, MODE
from aim_mlx.registry import family_of as model_family

from . import pickles
from .recipes import recipe

logger = logging.getLogger("aim_mlx")

Q_BITS = (4, 8)
DEFAULT_BITS = 4
MAX_SHARD_BYTES = 5 << 30  # the hub's per-file comfort limit, and mlx-lm's
WEIGHTS_FILE = "model.safetensors"  # the single-file name transformers and mlx-lm write
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"  # matches aim_mlx.checkpoints.folder.SHARD_PATTERN
COPIED_FILES = (PREPROCESSOR_FILE, *TOKENIZER_FILES)


@dataclass
class Conversion:
    """What `convert` did, for the CLI to print."""

    source: str
    revision: str | None
    output: Path
    dtype: str
    recipe: str | None
    bytes_before: int
    bytes_after: int
    files: list[str] = field(default_factory=list)
    quantized: dict[str, dict] = field(default_factory=dict)  # layer path -> {"group_size", "bits", "mode"}


def convert(
    hf_path: str,
    mlx_path: str | Path = "mlx_model",
    revision: str | None = None,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    quant_predicate: str | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    probe: str | None = None,
    verify: bool = True,
) -> Conversion:
    """Convert `hf_path` (hub id or local folder) into an MLX folder at `mlx_path`, quantizing if asked.

    `dtype` (float32, float16, bfloat16) defaults to the source's recorded dtype. With `quantize`, every
    Linear layer is packed to `q_bits` with groups of `q_group_size` (4 and 64 unless given), or per layer as
    the named `quant_predicate` recipe says; giving any of the three without `quantize` is refused, since it
    would do nothing. An existing `mlx_path` is refused unless `force`.

    AIMv1: `probe` (best or last) picks the attention-probe head. AIMv1's published pickles (a per-model
    repo's pytorch_model.bin, the combined repo's .pth files for ml-aim's names or `probe` last, or a local
    folder of them) are read with torch's weights-only loader (convert/pickles.py); `verify` checks the .pth
    files against the SHA-256 prefixes ml-aim publishes (turn it off only for files you trained yourself).
    """
    output = Path(mlx_path).expanduser()
    _check_options(dtype, quantize, q_bits, q_group_size, quant_predicate)
    _check_output(output, force)
    options = dict(
        dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
        quant_predicate=quant_predicate, force=force, max_shard_bytes=max_shard_bytes,
    )  # fmt: skip
    pickled = pickles.find_source(hf_path, revision, probe)
    if pickled is None:
        folder = hub.resolve(hf_path, revision)
        source = (_source_id(hf_path), _revision(folder, hf_path, revision))
        return _convert(folder, hf_path, revision, probe, source, output, **options)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The pickles become a safetensors checkpoint in a hidden folder beside the output, deleted afterwards.
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", suffix=".pickles", dir=output.parent) as tmp:
        pickles.stage(pickled, Path(tmp), check=verify)
        done = _convert(Path(tmp), tmp, None, None, (pickled.label, pickled.revision), output, **options)
    done.bytes_before = sum(path.stat().st_size for path in pickled.paths)
    return done


def _convert(
    folder: Path, load_id: str, revision, probe, source: tuple, output: Path, *, dtype, quantize, q_bits,
    q_group_size, quant_predicate, force, max_shard_bytes,
) -> Conversion:  # fmt: skip
    """Convert the checkpoint in `folder` (loaded as `load_id`), recording `source` (id, revision)."""
    raw = read_config(folder)
    if "quantization" in raw:
        raise ConfigError(f"{source[0]} is already quantized; convert from its float checkpoint instead")
    dtype = dtype or _source_dtype(raw)
    # Loaded in float32 and cast lazily below: `load` casting to half precision evaluates every tensor at
    # once, which held the float32 and the half copies together (1.57x the checkpoint for AIMv2-L).
    model, processor = load(load_id, revision=revision, dtype="float32", probe=probe)
    model.set_dtype(DTYPES[dtype])
    done = Conversion(
        source=source[0],
        revision=source[1],
        output=output,
        dtype=dtype,
        recipe=quant_predicate,
        bytes_before=sum(p.stat().st_size for p in weights.weight_files(folder)),
        bytes_after=0,
    )
    config = _output_config(raw, model, dtype, done)
    if quantize:
        q_bits = DEFAULT_BITS if q_bits is None else q_bits
        q_group_size = DEFAULT_GROUP_SIZE if q_group_size is None else q_group_size
        defaults = {"group_size": q_group_size, "bits": q_bits, "mode": MODE}
        predicate = recipe(quant_predicate)(model, q_group_size) if quant_predicate else None
        done.quantized = quantized.quantize(model, defaults, predicate)
        # mlx-lm's record: the defaults, and an entry per layer when a recipe chose per layer.
        config["quantization"] = {**defaults, **(done.quantized if predicate else {})}
        config["quantization_config"] = config["quantization"]
    _evaluate_one_by_one(model)
    try:
        with atomic_folder(output, replace=force) as staging:
            done.files = _write_weights(model, staging, max_shard_bytes)
            (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for name in COPIED_FILES:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, staging / name)
            if not (staging / PREPROCESSOR_FILE).exists():  # the processor `load` settled on
                (staging / PREPROCESSOR_FILE).write_text(json.dumps(processor.to_dict(), indent=2) + "\n")
            (staging / "README.md").write_text(model_card(done, config))
            done.bytes_after = sum((staging / name).stat().st_size for name in done.files)
    except FileExistsError:
        _check_output(output, force)  # it appeared while converting: the one-line refusal
        raise
    logger.info("converted %s to %s", source[0], output)
    return done


def _check_options(dtype, quantize, q_bits, q_group_size, quant_predicate) -> None:
    """Each option's value, then the quantization options given without -q (None: not given)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if q_bits is not None and q_bits not in Q_BITS:
        raise ConfigError(f"--q-bits {q_bits} is not supported; use {' or '.join(map(str, Q_BITS))}")
    if q_group_size is not None and q_group_size not in GROUP_SIZES:
        raise ConfigError(
            f"--q-group-size {q_group_size} is not supported; use {', '.join(map(str, GROUP_SIZES))}"
        )
    if quant_predicate is not None:
        recipe(quant_predicate)
    given = {"--q-bits": q_bits, "--q-group-size": q_group_size, "--quant-predicate": quant_predicate}
    for flag, value in given.items():
        if value is not None and not quantize:
            raise ConfigError(f"{flag} {value} only applies when quantizing; add -q/--quantize")


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output} is a file; pass a folder path for --mlx-path")
    if output.exists() and not force:
        raise ConfigError(f"{output} already exists; choose another --mlx-path or pass --force to replace it")


def _source_dtype(raw: dict) -> str:
    """The dtype the source records (transformers writes `dtype` or `torch_dtype`), if it is one of ours."""
    vision = raw.get("vision_config", raw)
    recorded = vision.get("dtype", vision.get("torch_dtype", raw.get("dtype", raw.get("torch_dtype"))))
    return recorded if recorded in DTYPES else "float32"


def _source_id(hf_path: str) -> str:
    local = Path(hf_path).expanduser()
    if local.is_dir():
        return str(local.resolve())
    variant = find_variant(hf_path)
    return variant.repo_id if variant is not None else hf_path


def _revision(folder: Path, hf_path: str, revision: str | None) -> str | None:
    """The commit a hub id resolved to (its cache snapshot folder is named by it); None for local folders."""
    if Path(hf_path).expanduser().is_dir():
        return None
    return folder.name if folder.parent.name == "snapshots" else revision


def _output_config(raw: dict, model: nn.Module, dtype: str, done: Conversion) -> dict:
    config = json.loads(json.dumps(raw))  # a deep copy
    config.pop("auto_map", None)  # Apple's remote-code pointers: that code is not part of the folder
    vision = config.get("vision_config", config)
    vision["is_native"] = model.dims["image_size"] is None  # Apple's configs leave it implicit
    vision["torch_dtype"] = dtype
    if "dtype" in vision:  # transformers 5 writes this name
        vision["dtype"] = dtype
    config["source_model"] = done.source
    config["source_revision"] = done.revision
    config["converted_by"] = f"aim-mlx {__version__}"
    return config


def _evaluate_one_by_one(model: nn.Module) -> None:
    """Evaluate the (cast, quantized) parameters a tensor at a time: each evaluation drops the float32
    tensor it came from, so converting holds the float32 model plus one converted copy at most."""
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)


def _write_weights(model: nn.Module, folder: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)
    with model.safetensors.index.json. Returns the weight file names."""
    params = dict(tree_flatten(model.parameters()))
    shards: list[dict[str, mx.array]] = []
    size = 0
    for key, value in params.items():
        if not shards or size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(folder / WEIGHTS_FILE), shards[0], metadata={"format": "mlx"})
        return [WEIGHTS_FILE]
    names = [SHARD_NAME.format(i + 1, len(shards)) for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in params.values())}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def describe_quantization(quantized_layers: dict[str, dict]) -> str:
    """'96 Linear layers: 88 at 4 bits, 8 at 8 bits (group size 64)'."""
    if not quantized_layers:
        return "none (float weights)"
    by_bits: dict[int, int] = {}
    for layer in quantized_layers.values():
        by_bits[layer["bits"]] = by_bits.get(layer["bits"], 0) + 1
    groups = sorted({layer["group_size"] for layer in quantized_layers.values()})
    counts = ", ".join(f"{n} at {bits} bits" for bits, n in sorted(by_bits.items()))
    return f"{len(quantized_layers)} Linear layers: {counts} (group size {', '.join(map(str, groups))})"


def model_card(done: Conversion, config: dict) -> str:
    """README.md: hub front matter (library_name: mlx, base_model) and how the folder was made and is used."""
    variant = find_variant(done.source)
    front = ["---", "library_name: mlx"]
    if not Path(done.source).is_absolute():
        front.append(f"base_model: {done.source}")
    if variant is not None:
        front.append(f"license: other\nlicense_name: {variant.license}")
    family = model_family(config)
    lit, classifier = family.text, family.name == "aimv1"
    task = "zero-shot-image-classification" if lit else "image-feature-extraction"
    task = "image-classification" if classifier else task
    front += [f"pipeline_tag: {task}", "tags:", "- mlx", f"- {family.name.split('-')[0]}", "- vision", "---"]
    q = config.get("quantization")
    flags = [f"--hf-path {done.source}", f"--mlx-path {done.output.name}", f"--dtype {done.dtype}"]
    if done.revision:
        flags.insert(1, f"--revision {done.revision}")
    if "probe" in config:
        flags.append(f"--probe {config['probe']}")
    if q:
        flags += ["-q", f"--q-bits {q['bits']}", f"--q-group-size {q['group_size']}"]
        if done.recipe:
            flags.append(f"--quant-predicate {done.recipe}")
    source = done.source + (f" at revision `{done.revision}`" if done.revision else "")
    return "\n".join(
        [
            *front,
            "",
            f"# {done.output.name}",
            "",
            f"{source}, converted to MLX with aim-mlx {__version__} ({done.dtype} weights; quantization: "
            f"{describe_quantization(done.quantized)}).",
            "",
            "Converted with:",
            "",
            "```bash",
            f"aim-mlx convert {' '.join(flags)}",
            "```",
            "",
            "Use it:",
            "",
            "```bash",
            "pip install aim-mlx",
            f"aim-mlx embed photo.jpg --model {done.output.name}",
            *([f'aim-mlx classify photo.jpg --labels "cat,dog" --model {done.output.name}'] if lit else []),
            *([f"aim-mlx classify photo.jpg --model {done.output.name}"] if classifier else []),
            "```",
            "",
            "```python",
            "import aim_mlx",
            "",
            f'model, processor = aim_mlx.load("{done.output.name}")',
            'embeddings = model.encode_image(processor(["photo.jpg"]))',
            "```",
            "",
        ]
    )
