"""Core ML export: an ML program built with coremltools' MIL builder straight from the encoder's weights.

No torch: the weights come from `aim_mlx.load` (any published layout, strictly loaded) as numpy arrays and
the graph is written op by op. Choices, each for Core ML's GPU and Neural Engine:
- the patch embedding is a strided conv, attention splits heads into 4-D (1, H, N, hd) tensors for two batched
  matmuls, SwiGLU is silu * up; nothing needs dynamic shapes;
- RMSNorm squares activations, which overflows float16 (residual streams reach thousands), so the graph
  divides by max(max|x|, 1) first: x / rms(x) == y / sqrt(mean(y²) + eps / m²) for y = x / m, exactly;
- Core ML's image preprocessing has one scale for all channels, so the per-channel mean/std sits in the graph;
- the native-resolution checkpoint is exported at one size per package (`image_size`), with its sin-cos
  table as a constant: fixed shapes are what the Neural Engine runs, while flexible and enumerated input
  shapes can send a model back to the GPU or CPU.
"""

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import AimMlxError, ConfigError

logger = logging.getLogger("aim_mlx")

PRECISIONS = ("float16", "float32")
COMPRESSIONS = ("none", "int8", "int4", "palettize4", "palettize6", "palettize8")
TARGETS = ("macOS14", "iOS17", "macOS15", "iOS18")
INPUTS = ("image", "tensor")
OUTPUTS = ("pooled", "pooled,tokens")
INT4_BLOCK = 32  # int4 scales are per block of 32 input channels (Core ML's per-block mode, iOS18+)
MIN_PATCHES, MAX_PATCHES = 112, 4096  # what the native checkpoint was trained on (see preprocess.py)
LICENSE_TEXT = {"apple-amlr": "Apple Machine Learning Research Model License (apple-amlr)"}


@dataclass
class ExportResult:
    path: Path
    seconds: float
    size_bytes: int
    check: dict | None = None  # see coreml_check.check_package
    metadata: dict = field(default_factory=dict)


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise ConfigError(f"unknown {option} {value!r}; choose one of {', '.join(choices)}")
    return value


def validate_options(
    output: Path, precision: str, compress: str, target: str, input_kind: str, outputs: str, force: bool
) -> None:
    """The options, checked before anything is loaded or written (the output's suffix depends on the
    checkpoint's kind: export_coreml checks it once config.json is read)."""
    _choice(precision, PRECISIONS, "--precision")
    _choice(compress, COMPRESSIONS, "--compress")
    _choice(target, TARGETS, "--min-deployment-target")
    _choice(input_kind, INPUTS, "--input")
    _choice(outputs.replace(" ", ""), OUTPUTS, "--outputs")
    if compress == "int4" and target in ("macOS14", "iOS17"):
        raise ConfigError(
            f"--compress int4 needs per-block quantization, which Core ML has from macOS15/iOS18; "
            f"pass --min-deployment-target macOS15 or iOS18 (got {target}), or use --compress int8"
        )
    if output.exists() and not force:
        raise ConfigError(f"{output} already exists; pass --force to replace it")


def package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def numpy_params(module) -> dict[str, np.ndarray]:
    """A module's parameters as float32 numpy arrays; MLX-quantized layers (from `aim-mlx convert -q`) are
    dequantized, since Core ML compression is --compress's job."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(module.parameters()))
    for name, layer in module.named_modules():
        if isinstance(layer, nn.QuantizedLinear):
            prefix = f"{name}." if name else ""
            for key in ("scales", "biases"):
                params.pop(prefix + key, None)
            params[prefix + "weight"] = mx.dequantize(
                layer.weight,
                layer.scales,
                layer.get("biases"),
                layer.group_size,
                layer.bits,
                mode=getattr(layer, "mode", "affine"),
            )
    return {k: np.array(v.astype(mx.float32)) for k, v in params.items()}


def _vision_weights(model) -> dict[str, np.ndarray]:
    """The vision encoder's weights, refusing anything the graph below does not build."""
    from ..models.aimv2 import AIMv2VisionEncoder

    if not isinstance(model, AIMv2VisionEncoder):
        raise ConfigError(f"Core ML export takes an AIMv2 vision encoder, not a {type(model).__name__}")
    params = numpy_params(model)
    odd = sorted(k for k in params if not k.endswith(("weight", "bias", "pos_embed", "cls_token")))
    if odd:
        raise ConfigError(f"cannot export a model with the parameter {odd[0]}: not an AIMv2 encoder layer")
    if model.config.qkv_bias or model.config.mlp_bias:
        raise ConfigError(
            "Core ML export supports the published AIMv2 encoders, which have no qkv/MLP biases"
        )
    return params


def rms_norm(mb, x, weight, eps: float):
    """RMSNorm over the last axis that float16 cannot overflow: x / rms(x) == y / sqrt(mean(y²) + eps / m²)
    for y = x / m, and m = max(max|x|, 1) keeps |y| <= 1."""
    m = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True), y=np.float32(1.0))
    y = mb.real_div(x=x, y=m)
    mean_sq = mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)
    mean_sq = mb.add(x=mean_sq, y=mb.real_div(x=np.float32(eps), y=mb.mul(x=m, y=m)))
    return mb.mul(x=mb.mul(x=y, y=mb.rsqrt(x=mean_sq)), y=weight)


def l2_normalize(mb, x):
    """x / |x| over the last axis, scaled by max|x| first for the same float16 reason as `rms_norm`."""
    y = mb.real_div(x=x, y=mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True))
    return mb.mul(x=y, y=mb.rsqrt(x=mb.reduce_sum(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)))


def transformer(mb, x, w: dict, prefix: str, layers: int, heads: int, eps: float, mask=None):
    """Pre-norm blocks on (1, N, D): `x + attn(norm_1(x))`, then `x + mlp(norm_2(x))`. `mask`, added to
    the attention scores, makes it causal."""
    _, n, d = x.shape
    hd = d // heads

    def split_heads(t):  # (1, N, D) -> (1, H, N, hd)
        return mb.transpose(x=mb.reshape(x=t, shape=[1, n, heads, hd]), perm=[0, 2, 1, 3])

    for i in range(layers):
        b = f"{prefix}{i}."
        h = rms_norm(mb, x, w[b + "norm_1.weight"], eps)
        qkv = w[b + "attn.qkv.weight"]  # (3D, D), rows q, k, v
        # The softmax scale is folded into the query weights: one op fewer, smaller float16 scores.
        q = split_heads(mb.linear(x=h, weight=qkv[:d] * np.float32(hd**-0.5)))
        k = split_heads(mb.linear(x=h, weight=qkv[d : 2 * d]))
        v = split_heads(mb.linear(x=h, weight=qkv[2 * d :]))
        scores = mb.matmul(x=q, y=k, transpose_y=True)  # (1, H, N, N)
        if mask is not None:
            scores = mb.add(x=scores, y=mask)
        out = mb.transpose(x=mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v), perm=[0, 2, 1, 3])  # (1,N,H,hd)
        x = mb.add(x=x, y=mb.linear(x=mb.reshape(x=out, shape=[1, n, d]), weight=w[b + "attn.proj.weight"]))
        h = rms_norm(mb, x, w[b + "norm_2.weight"], eps)
        gate = mb.linear(x=h, weight=w[b + "mlp.fc1.weight"])
        up = mb.linear(x=h, weight=w[b + "mlp.fc3.weight"])
        x = mb.add(x=x, y=mb.linear(x=mb.mul(x=mb.silu(x=gate), y=up), weight=w[b + "mlp.fc2.weight"]))
    return x


def build_program(
    w: dict[str, np.ndarray],
    config,
    image_size: int,
    mean,
    std,
    rescale: float,
    input_kind: str,
    tokens: bool,
    opset,
    pool=None,
):
    """The encoder as a MIL program: (1, 3, S, S) pixels in, `image_embeds` (+ `last_hidden_state`) out.

    `pool(mb, tokens)` makes the (1, D') embedding from the final (1, N, D) tokens; default: their mean."""
    from coremltools.converters.mil import Builder as mb

    from ..models.aimv2 import sincos_2d

    d, p, eps = config.hidden_size, config.patch_size, config.rms_norm_eps
    n = (image_size // p) ** 2
    # The native checkpoint's positions: the (N, D) sin-cos table MLX computes for this grid.
    pos = np.array(sincos_2d(image_size // p, image_size // p, d)) if config.is_native else w["pos_embed"]
    # pixel * rescale / std - mean / std, per channel; the identity for already normalised tensors
    gain = (rescale / np.asarray(std, np.float32)).reshape(1, 3, 1, 1).astype(np.float32)
    shift = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(1, 3, 1, 1)

    def encoder(x):
        if input_kind == "image":
            x = mb.add(x=mb.mul(x=x, y=gain), y=shift)
        conv = w["patch_embed.proj.weight"].transpose(0, 3, 1, 2)  # MLX (D, p, p, C) -> Core ML OIHW
        x = mb.conv(x=x, weight=conv, bias=w["patch_embed.proj.bias"], strides=[p, p], pad_type="valid")
        x = mb.transpose(x=mb.reshape(x=x, shape=[1, d, n]), perm=[0, 2, 1])  # (1, N, D), rows outer
        x = mb.add(x=rms_norm(mb, x, w["patch_embed.norm.weight"], eps), y=pos[None])
        x = transformer(mb, x, w, "blocks.", config.num_hidden_layers, config.num_attention_heads, eps)
        x = rms_norm(mb, x, w["post_trunk_norm.weight"], eps)
        if pool is None:
            pooled = mb.reduce_mean(x=x, axes=[1], keep_dims=False, name="image_embeds")  # (1, D)
        else:
            pooled = mb.identity(x=pool(mb, x), name="image_embeds")
        if tokens:
            return pooled, mb.identity(x=x, name="last_hidden_state")  # (1, N, D)
        return pooled

    # mb.program names the input after the function's argument.
    spec = [mb.TensorSpec(shape=(1, 3, image_size, image_size))]
    if input_kind == "image":

        @mb.program(input_specs=spec, opset_version=opset)
        def program(image):
            return encoder(image)

    else:

        @mb.program(input_specs=spec, opset_version=opset)
        def program(pixel_values):
            return encoder(pixel_values)

    return program


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars: (k centroids, index of each value). Deterministic (quantile start).

    On sorted values every cluster is a contiguous run, so each step is a search and two prefix sums."""
    flat = values.reshape(-1).astype(np.float64)
    ordered = np.sort(flat)
    prefix = np.concatenate([[0.0], np.cumsum(ordered)])
    centroids = np.quantile(ordered, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        edges = np.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2)
        starts, ends = np.r_[0, edges], np.r_[edges, len(ordered)]
        counts = ends - starts
        updated = np.where(counts > 0, (prefix[ends] - prefix[starts]) / np.maximum(counts, 1), centroids)
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    indices = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
    return centroids, indices


def _kmeans_lut(nbits: int):
    """A LUT function for `palettize_weights` (mode "custom"): coremltools' own k-means mode needs
    scikit-learn, or kmeans1d with float16 weights only."""

    def lut_function(weight: np.ndarray):
        centroids, indices = kmeans_1d(weight, 1 << nbits)
        return centroids.astype(weight.dtype), indices.astype(np.uint8)

    return lut_function


def compress_model(mlmodel, compress: str):
    if compress == "none":
        return mlmodel
    import coremltools.optimize.coreml as cto

    if compress in ("int8", "int4"):
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric",
            dtype=compress,
            granularity="per_channel" if compress == "int8" else "per_block",
            **({"block_size": INT4_BLOCK} if compress == "int4" else {}),
        )
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    nbits = int(compress.removeprefix("palettize"))
    op = cto.OpPalettizerConfig(mode="custom", lut_function=_kmeans_lut(nbits))
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))


def _source_revision(folder: Path) -> str:
    """The hub commit of a cached snapshot (its folder name), or `local` for a user's folder."""
    return folder.name if folder.parent.name == "snapshots" else "local"


def export_coreml(
    model: str,
    output: str | Path,
    *,
    revision: str | None = None,
    precision: str = "float16",
    compress: str = "none",
    image_size: int | None = None,
    target: str = "iOS17",
    input_kind: str = "image",
    outputs: str = "pooled",
    check: bool = False,
    force: bool = False,
    labels: list[str] | None = None,
) -> ExportResult:
    """Export an AIMv2 checkpoint (hub id or folder) to Core ML at `output`.

    A vision checkpoint becomes one `.mlpackage`: one (1, 3, S, S) input, `image` (RGB, 0-255; resize and
    centre-crop to S first) or, with input_kind="tensor", normalised `pixel_values`; outputs `image_embeds`
    (1, D) float32, the mean of the final tokens, and with outputs="pooled,tokens" also `last_hidden_state`
    (1, N, D). The LiT checkpoint becomes a folder with an image and a text package (see coreml_lit.py),
    and with `labels` their precomputed embeddings for zero-shot classification.
    `check` verifies the result against MLX (coreml_check.py) and writes nothing if it misses its bound.
    """
    output = Path(output).expanduser()
    outputs = outputs.replace(" ", "")
    validate_options(output, precision, compress, target, input_kind, outputs, force)
    start = time.perf_counter()
    from .. import hub
    from ..loading import load, read_config
    from ..variants import find_variant

    folder = hub.resolve(model, revision)
    raw = read_config(folder)
    lit = isinstance(raw.get("text_config"), dict)
    if lit and output.suffix == ".mlpackage":
        raise ConfigError(
            f"{output}: the LiT checkpoint exports a folder (image and text packages, tokenizer, lit.json); "
            "name -o without .mlpackage"
        )
    if not lit and output.suffix != ".mlpackage":
        raise ConfigError(f"{output}: Core ML ML programs are saved as packages; name the output *.mlpackage")
    if labels is not None and not lit:
        raise ConfigError(f"{model} has no text tower: label embeddings need the LiT (zero-shot) checkpoint")
    net, processor = load(model, revision=revision, dtype="float32")
    vision = net.config.vision if lit else net.config
    size = _image_size(vision, image_size)
    options = {"precision": precision, "compress": compress, "target": target}
    options.update(input_kind=input_kind, outputs=outputs)
    image_processor = processor.image if lit else processor
    # A folder written by `aim-mlx convert` records where it came from.
    source = raw.get("source_model") or model
    variant = None if Path(source).expanduser().is_dir() else find_variant(source)
    meta = {
        "source_model": variant.repo_id if variant else source,
        "source_revision": raw.get("source_revision") or _source_revision(folder),
        "license": variant.license if variant else "see the source checkpoint",
        "image_mean": ",".join(f"{v:.8g}" for v in image_processor.image_mean),
        "image_std": ",".join(f"{v:.8g}" for v in image_processor.image_std),
        "image_size": str(size),
        "embedding_size": str(vision.hidden_size),
        "precision": precision,
        "compression": compress,
        "input": input_kind,
        "aim_mlx_version": __version__,
    }

    suffix = ".mlpackage" if not lit else ""  # coremltools wants the suffix on a package path
    tmp = output.with_name(f".{output.stem}.tmp-{os.getpid()}{suffix}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if lit:
            from . import coreml_lit

            coreml_lit.export_lit(net, processor, folder, tmp, options, meta, labels)
        else:
            program = build_program(
                _vision_weights(net),
                vision,
                size,
                image_processor.image_mean,
                image_processor.image_std,
                image_processor.rescale_factor,
                input_kind,
                outputs == "pooled,tokens",
                getattr(_ct().target, target),
            )
            mlmodel = convert_program(program, options, size)
            describe(mlmodel, meta, input_kind, size, vision.hidden_size)
            mlmodel.save(str(tmp))
        report = None
        if check:
            from .coreml_check import check_package
            from .coreml_lit import check_lit

            report = check_lit(tmp, net) if lit else check_package(tmp, net)
            if not report["passed"]:
                raise AimMlxError(f"--check failed, nothing written: {report['summary']}")
        _move_into_place(tmp, output)
    except OSError as exc:  # the writes above: a full disk, a read-only folder, a file in the path
        raise AimMlxError(f"cannot write {output} ({exc}); choose a writable location") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    seconds = time.perf_counter() - start
    logger.info("exported %s to %s in %.1f s", model, output, seconds)
    return ExportResult(output, seconds, package_size(output), report, meta)


def _ct():
    import coremltools

    return coremltools


def convert_program(program, options: dict, size: int | None):
    """ct.convert, then --compress. `size` given: an image model (input per options); None: the text model."""
    ct = _ct()
    if size is None:
        shape = tuple(program.functions["main"].inputs["input_ids"].shape)  # (1, context length)
        inputs = [ct.TensorType(name="input_ids", shape=shape, dtype=np.int32)]
        names = ["text_embeds"]
    else:
        shape = (1, 3, size, size)
        if options["input_kind"] == "image":
            inputs = [ct.ImageType(name="image", shape=shape, color_layout=ct.colorlayout.RGB)]
        else:
            inputs = [ct.TensorType(name="pixel_values", shape=shape, dtype=np.float32)]
        names = ["image_embeds"] + (["last_hidden_state"] if options["outputs"] == "pooled,tokens" else [])
    mlmodel = ct.convert(
        program,
        inputs=inputs,
        outputs=[ct.TensorType(name=n, dtype=np.float32) for n in names],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if options["precision"] == "float16" else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, options["target"]),
    )
    return compress_model(mlmodel, options["compress"])


def _image_size(config, image_size: int | None) -> int:
    if not config.is_native:
        if image_size not in (None, config.image_size):
            raise ConfigError(
                f"--image-size {image_size}: this checkpoint has a learned position table for "
                f"{config.image_size}x{config.image_size} images only; drop --image-size"
            )
        return config.image_size
    size = image_size or 224
    patches = (size // config.patch_size) ** 2
    if size % config.patch_size or not MIN_PATCHES <= patches <= MAX_PATCHES:
        raise ConfigError(
            f"--image-size {size}: the native checkpoint takes multiples of {config.patch_size} with "
            f"{MIN_PATCHES}-{MAX_PATCHES} patches, i.e. 154 to 896 (e.g. 224, 336, 448)"
        )
    return size


def describe(mlmodel, meta: dict, input_kind: str, size: int, embedding_size: int) -> None:
    """Author, license, version, description, input/output descriptions and the user-defined fields."""
    mlmodel.author = "Apple (AIMv2 weights); Core ML package by aim-mlx"
    mlmodel.license = LICENSE_TEXT.get(meta["license"], meta["license"])
    mlmodel.version = f"{meta['source_revision'][:12]}-aim-mlx{__version__}"
    mlmodel.short_description = (
        f"AIMv2 image encoder ({meta['source_model']}): a {size}x{size} image to a "
        f"{embedding_size}-d embedding."
    )
    mlmodel.user_defined_metadata.update(meta)
    if input_kind == "image":
        mlmodel.input_description["image"] = (
            f"RGB image, exactly {size}x{size}, values 0-255: resize the shortest side to {size} (bicubic) "
            f"and centre-crop; the model normalises with mean {meta['image_mean']} "
            f"and std {meta['image_std']}"
        )
    else:
        mlmodel.input_description["pixel_values"] = (
            f"(1, 3, {size}, {size}) float32, RGB, already scaled to 0-1 and normalised with mean "
            f"{meta['image_mean']} and std {meta['image_std']}"
        )
    mlmodel.output_description["image_embeds"] = f"(1, {embedding_size}) float32: mean-pooled tokens"
    if "last_hidden_state" in mlmodel.output_description:
        mlmodel.output_description["last_hidden_state"] = (
            "(1, N, D) tokens after the final RMSNorm, rows outer"
        )


def _move_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished package into place; a replaced one is moved aside first and deleted last."""
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        output.rename(old)
    try:
        tmp.rename(output)
    except OSError:
        if old.exists():
            old.rename(output)
        raise
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
