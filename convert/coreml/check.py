"""Verification of a saved Core ML package where Core ML cannot run: a numpy reference evaluator.

Core ML predicts only on macOS. This reads the package back (its MIL program and weight file, through
coremltools' milproto loader) and executes each op with numpy, the compressed-weight ops too. Every op
computes in float32 and rounds its result to the dtype the program declares for it, so a float16 package is
evaluated with float16 activations between ops (and float32 accumulation inside them, as Core ML's GPU and
Neural Engine do). It checks the program as written, not Core ML's compiler or kernels: on macOS
`check_package` also runs `MLModel.predict`.
"""

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

from aim_mlx.errors import AimMlxError
from aim_mlx.extras import require

logger = logging.getLogger("aim_mlx")

# (precision, compression) -> the bound each package must meet on real photos against MLX float32.
# float32: max |error| / max |reference| over every output; the others: the lowest per-image cosine of
# `image_embeds`. 4-bit bounds are this project's own choice (the issue sets none): they catch a wrong
# dequantization, which gives cosines near 0, while allowing 4-bit rounding.
# A package with tokens (`last_hidden_state`) must also meet the cosine bound with its lowest per-token
# cosine. Measured on the tiny random-weight checkpoints of tests/ (and the same with activations in the
# thousands), the per-token minimum sits at most 1e-3 below the pooled cosine (float16 >= 0.9999995, int8
# 0.99996, palettize6 0.9990 against a pooled 0.9992, palettize4 0.9925 against 0.9935), so one bound serves
# both; a full-size model has not been measured on the evaluator.
MAX_REL_ERROR_FP32 = 1e-4
MIN_COSINE = {"none": 0.999, "int8": 0.995, "palettize8": 0.995, "palettize6": 0.99, "int4": 0.95}
MIN_COSINE_DEFAULT = 0.9  # palettize4


def load_program(package: str | Path):
    """The package's MIL program, with its weights read from the package's weight file."""
    ct = require("coremltools")
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    package = Path(package)
    spec = ct.utils.load_spec(str(package))
    if spec.WhichOneof("Type") != "mlProgram":
        raise AimMlxError(f"{package} is not an ML program package; the evaluator reads ML programs only")
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return spec, milproto_load(spec, spec.specificationVersion, str(weights))


def _np_dtype(var):
    from coremltools.converters.mil.mil import types

    return types.nptype_from_builtin(var.dtype)


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """iOS16 LUT indices: n-bit fields packed from each byte's least significant bit upwards."""
    bits = np.unpackbits(packed.astype(np.uint8), bitorder="little")[: count * nbits]
    return (bits.reshape(count, nbits) << np.arange(nbits, dtype=np.uint16)).sum(axis=1)


def _blockwise(values: np.ndarray, shape) -> np.ndarray:
    """Repeat per-block parameters (same rank, each dim dividing the output's) up to the output shape."""
    for axis, (full, part) in enumerate(zip(shape, values.shape, strict=True)):
        if part != full:
            values = np.repeat(values, full // part, axis=axis)
    return values


def _lut_to_dense(args: dict, out_shape) -> np.ndarray:
    lut, indices = args["lut"].astype(np.float32), args["indices"]
    if "shape" in args:  # iOS16: one LUT, indices packed into bytes
        count = int(np.prod(args["shape"]))
        idx = _unpack_bits(indices, int(np.log2(lut.shape[0])), count)
        return lut[idx].reshape(tuple(int(s) for s in args["shape"]))
    if lut.shape[-1] != 1:
        raise AimMlxError("the evaluator handles scalar palettes only, not vector palettization")
    # iOS18: lut (*blocks, P, 1); each block of the output has its own palette.
    lut = lut[..., 0]
    grids = np.ix_(*[np.arange(n) // (n // b) for n, b in zip(indices.shape, lut.shape[:-1], strict=True)])
    return lut[(*grids, indices.astype(np.int64))]


def _conv(x, weight, bias, strides, pad_type, groups, dilations, **_):
    """The patch embedding's conv only: kernel == stride, no padding, one group, as a matmul on patches."""
    o, c, kh, kw = weight.shape
    if tuple(strides) != (kh, kw) or pad_type != "valid" or groups != 1 or tuple(dilations) != (1, 1):
        raise AimMlxError("the evaluator runs non-overlapping patch convs only (kernel == stride, valid)")
    b, _, h, w = x.shape
    gh, gw = h // kh, w // kw
    patches = x[:, :, : gh * kh, : gw * kw].reshape(b, c, gh, kh, gw, kw).transpose(0, 2, 4, 1, 3, 5)
    out = patches.reshape(b, gh * gw, c * kh * kw) @ weight.reshape(o, -1).T  # (B, N, O)
    if bias is not None:
        out = out + bias
    return out.transpose(0, 2, 1).reshape(b, o, gh, gw)


def _reshape(x, shape):
    shape = [int(x.shape[i]) if s == 0 else int(s) for i, s in enumerate(shape)]  # 0: keep that dim
    return x.reshape(shape)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _reduce(fn):
    return lambda x, axes=None, keep_dims=False: fn(
        x, axis=None if axes is None else tuple(int(a) for a in axes), keepdims=bool(keep_dims)
    )


def _matmul(x, y, transpose_x=False, transpose_y=False):
    return (np.swapaxes(x, -1, -2) if transpose_x else x) @ (np.swapaxes(y, -1, -2) if transpose_y else y)


def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    """MIL layer_norm: gamma · (x - E[x]) / sqrt(Var[x] + epsilon) + beta over `axes` (default: all);
    gamma and beta have the shape of those axes."""
    axes = tuple(range(x.ndim)) if axes is None else tuple(int(a) % x.ndim for a in axes)
    centred = x - x.mean(axis=axes, keepdims=True)
    out = centred / np.sqrt(np.square(centred).mean(axis=axes, keepdims=True) + epsilon)
    shape = [n if i in axes else 1 for i, n in enumerate(x.shape)]
    if gamma is not None:
        out = out * gamma.reshape(shape)
    return out if beta is None else out + beta.reshape(shape)


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    """MIL slice_by_index: x[begin:end:stride] per axis; a mask entry drops that begin/end, a squeeze entry
    indexes at begin."""
    index = []
    for i in range(x.ndim):
        if squeeze_mask is not None and squeeze_mask[i]:
            index.append(int(begin[i]))
            continue
        start = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        stop = None if end_mask is not None and end_mask[i] else int(end[i])
        index.append(slice(start, stop, 1 if stride is None else int(stride[i])))
    return x[tuple(index)]


_ERF = np.frompyfunc(math.erf, 1, 1)  # exact, in float64; numpy has no erf


def _gelu(x, mode="EXACT"):
    """MIL gelu: EXACT is x · Φ(x) (erf); the tanh and sigmoid approximations as MIL defines them."""
    if mode == "EXACT":
        return 0.5 * x * (1 + _ERF(x.astype(np.float64) / math.sqrt(2)).astype(np.float64))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return x / (1 + np.exp(-1.702 * x))  # SIGMOID_APPROXIMATION


def _sdpa(query, key, value, attn_mask=None):
    """iOS18 scaled_dot_product_attention: softmax(q·kᵀ / sqrt(E) + mask)·v; a bool mask marks the
    positions that take part (the others get -inf), a float mask is added to the scores."""
    scores = _matmul(query, key, transpose_y=True) / np.sqrt(np.float32(query.shape[-1]))
    if attn_mask is not None:
        scores = np.where(attn_mask, scores, -np.inf) if attn_mask.dtype == bool else scores + attn_mask
    return _softmax(scores, -1) @ value


OPS = {
    "identity": lambda x: x,
    "cast": lambda x, dtype: x,  # the result is rounded to the declared output dtype below
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "real_div": lambda x, y: x / y,
    "maximum": lambda x, y: np.maximum(x, y),
    "minimum": lambda x, y: np.minimum(x, y),
    "abs": lambda x: np.abs(x),
    "square": lambda x: np.square(x),
    "sqrt": lambda x: np.sqrt(x),
    "rsqrt": lambda x, epsilon=1e-12: 1 / np.sqrt(x + epsilon),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu": _gelu,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "softmax": _softmax,
    "layer_norm": _layer_norm,
    "scaled_dot_product_attention": _sdpa,
    "concat": lambda values, axis, interleave=False: _concat(values, int(axis), interleave),
    "slice_by_index": _slice_by_index,
    "reduce_mean": _reduce(np.mean),
    "reduce_max": _reduce(np.max),
    "reduce_sum": _reduce(np.sum),
    "reshape": _reshape,
    "transpose": lambda x, perm: x.transpose([int(p) for p in perm]),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in axes)),
    "squeeze": lambda x, axes=None: np.squeeze(x, None if axes is None else tuple(int(a) for a in axes)),
    "matmul": _matmul,
    "linear": lambda x, weight, bias=None: x @ weight.T + (0 if bias is None else bias),
    "conv": lambda x, weight, bias=None, **kw: _conv(x, weight, bias, **kw),
    "batch_norm": lambda x, mean, variance, gamma=None, beta=None, epsilon=1e-5: (
        (x - mean.reshape(1, -1, 1, 1))
        / np.sqrt(variance.reshape(1, -1, 1, 1) + epsilon)
        * (1 if gamma is None else gamma.reshape(1, -1, 1, 1))
        + (0 if beta is None else beta.reshape(1, -1, 1, 1))
    ),
    "gather": lambda x, indices, axis=0, batch_dims=0, validate_indices=False: np.take(
        x, indices.astype(np.int64), axis=int(axis)
    ),
    "equal": lambda x, y: x == y,
    "greater_equal": lambda x, y: x >= y,
    "less": lambda x, y: x < y,
    "select": lambda cond, a, b: np.where(cond, a, b),
    "cumsum": lambda x, axis=0, exclusive=False, reverse=False: _cumsum(x, int(axis), exclusive, reverse),
    # Compressed weights (iOS16 and iOS18 forms).
    "constexpr_affine_dequantize": lambda quantized_data, zero_point, scale, axis: (
        (quantized_data.astype(np.float32) - _along(zero_point, axis, quantized_data.ndim))
        * _along(scale, axis, quantized_data.ndim)
    ),
    "constexpr_blockwise_shift_scale": lambda data, scale, offset=None: (
        (
            data.astype(np.float32)
            - (0 if offset is None else _blockwise(offset.astype(np.float32), data.shape))
        )
        * _blockwise(scale.astype(np.float32), data.shape)
    ),
}


def _concat(values, axis: int, interleave: bool):
    if interleave:
        raise AimMlxError("the evaluator does not run interleaved concat")
    return np.concatenate(values, axis=axis)


def _cumsum(x, axis: int, exclusive: bool, reverse: bool):
    if reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if exclusive:
        out = out - x
    return np.flip(out, axis) if reverse else out


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A scalar, or a vector laid along `axis` for broadcasting (constexpr_affine_dequantize)."""
    values = np.asarray(values, np.float32)
    if values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[int(axis)] = -1
    return values.reshape(shape)


def run_program(program, feeds: dict[str, np.ndarray], extra=()) -> dict[str, np.ndarray]:
    """Execute the program's main function on `feeds` (input name -> array); returns its outputs, and the
    values of the variables named in `extra`."""
    main = program.functions["main"]
    env = {}
    for name, var in main.inputs.items():
        if name not in feeds:
            raise AimMlxError(f"the program needs input {name!r}; got {', '.join(feeds) or 'none'}")
        env[name] = np.asarray(feeds[name]).astype(_np_dtype(var))
    for op in main.operations:
        out = op.outputs[0]
        if op.op_type == "const":
            env[out.name] = out.val
            continue
        if op.op_type in WHOLE_OPS:
            env.update(WHOLE_OPS[op.op_type](op, env))
            continue
        args = {}
        for key, var in op.inputs.items():
            if isinstance(var, (list, tuple)):
                args[key] = [env[v.name] for v in var]
            else:
                args[key] = env[var.name]
        if op.op_type == "constexpr_lut_to_dense":
            result = _lut_to_dense(args, out.shape)
        elif op.op_type in OPS:
            numeric = {k: v.astype(np.float32) if _is_float(v) else v for k, v in args.items()}
            result = OPS[op.op_type](**numeric)
        else:
            raise AimMlxError(f"the evaluator has no numpy version of the {op.op_type!r} op ({op.name})")
        if len(op.outputs) != 1:
            raise AimMlxError(f"the evaluator expects one output from {op.op_type!r} ({op.name})")
        env[out.name] = np.asarray(result).astype(_np_dtype(out))
    return {**{name: env[name] for name in extra}, **{var.name: env[var.name] for var in main.outputs}}


def _classify_op(program):
    ops = [op for op in program.functions["main"].operations if op.op_type == "classify"]
    if len(ops) != 1:
        raise AimMlxError("the program is not a classifier: it has no classify op")
    return ops[0]


def classifier_classes(program) -> list[str]:
    """A classifier program's labels, in the order of its probabilities."""
    classes = _classify_op(program).inputs["classes"].val
    return [c.item() if isinstance(c, np.generic) else c for c in getattr(classes, "ls", classes)]


def classifier_logits(program) -> str:
    """The name of the variable a classifier program's softmax takes: its logits (a classifier outputs only
    probabilities, and the logits are what the model's `classify` gives). Found by walking back from the
    classify op through casts and identities, so it does not depend on how conversion named them."""
    var = _classify_op(program).inputs["probabilities"]
    while var.op is not None and var.op.op_type in ("cast", "identity"):
        var = var.op.inputs["x"]
    if var.op is None or var.op.op_type != "softmax":
        raise AimMlxError("the classifier's probabilities do not come from a softmax; no logits to compare")
    return var.op.inputs["x"].name


def _classify(op, env: dict) -> dict:
    """A classifier's outputs (ClassifierConfig): the most probable label and every label's probability.
    Its labels are a literal list bound to the op, not a constant the program computes."""
    probs = np.asarray(env[op.inputs["probabilities"].name], np.float64).reshape(-1)
    classes = op.inputs["classes"].val
    classes = [c.item() if isinstance(c, np.generic) else c for c in getattr(classes, "ls", classes)]
    label, table = op.outputs
    return {
        label.name: classes[int(probs.argmax())],
        table.name: dict(zip(classes, probs.tolist(), strict=True)),
    }


# Ops evaluated from the op itself, for several outputs or inputs that are not tensors: name -> (op, env)
# -> {output name: value}.
WHOLE_OPS = {"classify": _classify}


def _is_float(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def photos() -> list:
    """Real photos from scikit-image's data module (no download)."""
    require("skimage")
    from PIL import Image
    from skimage import data

    return [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")]


def tolerance(precision: str, compression: str) -> tuple[str, float]:
    """(metric, bound) for a package: ('max_rel_error', upper bound) or ('cosine', lower bound)."""
    if precision == "float32" and compression == "none":
        return "max_rel_error", MAX_REL_ERROR_FP32
    return "cosine", MIN_COSINE.get(compression, MIN_COSINE_DEFAULT)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check_package(package: str | Path, model, images=None) -> dict:
    """Compare a package's outputs (numpy evaluator; on macOS also MLModel.predict) with `model`, the MLX
    float32 encoder it was exported from, on real photos. Returns the figures and whether they pass."""
    import mlx.core as mx

    from aim_mlx.inputs.preprocess import ImageProcessor

    spec, program = load_program(package)
    meta = dict(spec.description.metadata.userDefined)
    size = int(meta["image_size"])
    mean = tuple(float(v) for v in meta["image_mean"].split(","))
    std = tuple(float(v) for v in meta["image_std"].split(","))
    processor = ImageProcessor.clip(size)
    processor.image_mean, processor.image_std = mean, std
    images = photos() if images is None else images
    raw = np.stack([processor.center_crop(np.asarray(processor.resize(im.convert("RGB")))) for im in images])
    pixels = np.stack([processor.preprocess_one(im) for im in images])  # (B, S, S, 3), what MLX sees
    x = mx.array(pixels)
    reference = {  # the model interface (aim_mlx/registry.py): LiT's encode_image is its image-text space
        "image_embeds": np.array(model.encode_image(x), np.float32),
        "last_hidden_state": np.array(model.forward_intermediates(x, indices=[-1], norm=True)[0], np.float32),
    }
    main_input = next(iter(program.functions["main"].inputs))
    feed = raw if main_input == "image" else pixels
    got = [run_program(program, {main_input: f.transpose(2, 0, 1)[None].astype(np.float32)}) for f in feed]
    figures = _compare(got, reference)
    metric, bound = tolerance(meta.get("precision", "float16"), meta.get("compression", "none"))
    value = figures[metric]
    tokens = (
        f", tokens {figures['tokens_cosine']:.6g}"
        if metric == "cosine" and "tokens_cosine" in figures
        else ""
    )
    report = {
        **figures,
        "metric": metric,
        "bound": bound,
        "passed": _passes(figures, metric, bound),
        "images": len(images),
        "summary": f"{metric} {value:.3g}{tokens} ({'<=' if metric == 'max_rel_error' else '>='} {bound} "
        f"needed) on {len(images)} photos",
        "predict": "skipped: Core ML predicts only on macOS",
    }
    problem = input_problem(spec, meta)
    if problem:
        report.update(passed=False, summary=problem)
    if sys.platform == "darwin":
        mlmodel, feeds = _mac_feeds(package, main_input, raw, pixels)
        predicted = _compare([mlmodel.predict(f) for f in feeds], reference)
        report["predict"] = predicted
        report["passed"] = report["passed"] and _passes(predicted, metric, bound)
        report["summary"] += f"; MLModel.predict {metric} {predicted[metric]:.3g}"
        # Not run on this project's machines (Linux): written to coremltools' documented API, untested.
        outputs, devices = neural_engine_run(package, feeds)
        report["predict_cpu_and_ne"] = _compare(outputs, reference)
        report["placement"] = devices
        report["passed"] = report["passed"] and _passes(report["predict_cpu_and_ne"], metric, bound)
        report["summary"] += (
            f"; CPU_AND_NE {metric} {report['predict_cpu_and_ne'][metric]:.3g}; {placement_line(devices)}"
        )
    logger.info("checked %s: %s", package, report["summary"])
    return report


def check_text_package(package: str | Path, model, texts: list[str]) -> dict:
    """A LiT text package (numpy evaluator; on macOS also MLModel.predict) against `model.encode_text`."""
    spec, program = load_program(package)
    meta = dict(spec.description.metadata.userDefined)
    ids = np.asarray(model.tokenizer(texts), np.int32)  # (B, 77), padded with the end-of-text id
    reference = np.array(model.encode_text(ids), np.float32)
    got = np.concatenate([run_program(program, {"input_ids": row[None]})["text_embeds"] for row in ids])
    figures = _compare([{"image_embeds": got}], {"image_embeds": reference})
    metric, bound = tolerance(meta.get("precision", "float16"), meta.get("compression", "none"))
    value = figures[metric]
    passed = value <= bound if metric == "max_rel_error" else value >= bound
    report = {**figures, "metric": metric, "bound": bound, "passed": bool(passed), "texts": len(texts)}
    report["summary"] = f"{metric} {value:.3g} on {len(texts)} texts"
    if sys.platform == "darwin":
        import coremltools as ct

        mlmodel = ct.models.MLModel(str(package))
        predicted = np.concatenate([mlmodel.predict({"input_ids": row[None]})["text_embeds"] for row in ids])
        report["predict"] = _compare([{"image_embeds": predicted}], {"image_embeds": reference})
        ok = (
            report["predict"][metric] <= bound
            if metric == "max_rel_error"
            else report["predict"][metric] >= bound
        )
        report["passed"] = bool(passed and ok)
        # Not run on this project's machines (Linux), as in check_package.
        outputs, devices = neural_engine_run(package, [{"input_ids": row[None]} for row in ids])
        got_ne = np.concatenate([o["text_embeds"] for o in outputs])
        report["predict_cpu_and_ne"] = _compare([{"image_embeds": got_ne}], {"image_embeds": reference})
        report["placement"] = devices
        report["passed"] = report["passed"] and _passes(report["predict_cpu_and_ne"], metric, bound)
        report["summary"] += f"; CPU_AND_NE {metric} {report['predict_cpu_and_ne'][metric]:.3g}; " + (
            placement_line(devices)
        )
    return report


def _passes(figures: dict, metric: str, bound: float) -> bool:
    """float32: max |error| over every output; otherwise the pooled cosine and, where the package has
    tokens, their lowest per-token cosine (see MIN_COSINE)."""
    if metric == "max_rel_error":
        return bool(figures[metric] <= bound)
    return bool(figures["cosine"] >= bound and figures.get("tokens_cosine", bound) >= bound)


def input_problem(spec, meta: dict) -> str | None:
    """One line saying how the package's input description disagrees with its metadata, or None: an image
    package takes one RGB image of exactly image_size x image_size, a tensor package (1, 3, S, S)."""
    from coremltools.proto import FeatureTypes_pb2

    size = int(meta["image_size"])
    if len(spec.description.input) != 1:
        return f"the package has {len(spec.description.input)} inputs; an image encoder takes one"
    (feature,) = spec.description.input
    kind = feature.type.WhichOneof("Type")
    if meta.get("input", "image") == "image":
        if kind != "imageType":
            return f"input {feature.name!r} is a {kind}, but the metadata says the package takes an image"
        image = feature.type.imageType
        space = FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(image.colorSpace)
        if space != "RGB":
            return f"input {feature.name!r} has colour layout {space}; the model expects RGB"
        if (image.width, image.height) != (size, size):
            return f"input {feature.name!r} is {image.width}x{image.height}; the metadata says {size}x{size}"
        return None
    if kind != "multiArrayType":
        return f"input {feature.name!r} is a {kind}, but the metadata says the package takes a tensor"
    shape = list(feature.type.multiArrayType.shape)
    if shape != [1, 3, size, size]:
        return f"input {feature.name!r} has shape {shape}; the metadata says (1, 3, {size}, {size})"
    return None


DEVICES = {
    "MLNeuralEngineComputeDevice": "Neural Engine",
    "MLGPUComputeDevice": "GPU",
    "MLCPUComputeDevice": "CPU",
}


def placement(plan) -> dict[str, int]:
    """Ops of an MLComputePlan's main function (nested blocks included) per preferred compute device. Ops
    the plan gives no device usage for (constants) are not counted."""
    counts: dict[str, int] = {}

    def walk(block):
        for op in block.operations:
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            if usage is not None:
                name = type(usage.preferred_compute_device).__name__
                name = DEVICES.get(name, name)
                counts[name] = counts.get(name, 0) + 1
            for inner in op.blocks:
                walk(inner)

    walk(plan.model_structure.program.functions["main"].block)
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def placement_line(counts: dict[str, int]) -> str:
    """E.g. 'Neural Engine 812 ops, GPU 3, CPU 2'."""
    parts = [f"{device} {n}" for device, n in counts.items()]
    return (parts[0] + " ops" + "".join(f", {p}" for p in parts[1:])) if parts else "no ops placed"


def neural_engine_run(package, feeds: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """macOS only: predictions with ComputeUnit.CPU_AND_NE and the ops per preferred device of the compute
    plan Core ML makes for those units. Never run on this project's Linux machines."""
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan

    mlmodel = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_AND_NE)
    outputs = [mlmodel.predict(f) for f in feeds]
    plan = MLComputePlan.load_from_path(mlmodel.get_compiled_model_path(), ct.ComputeUnit.CPU_AND_NE)
    return outputs, placement(plan)


def _compare(outputs: list[dict], reference: dict) -> dict:
    """Lowest per-image cosine of image_embeds, lowest per-token cosine of last_hidden_state (when there)
    and max |error| / max |reference| over the outputs given."""
    embeds = np.concatenate([o["image_embeds"] for o in outputs]).astype(np.float32)
    figures = {"cosine": float(_cosines(embeds, reference["image_embeds"]).min())}
    if "last_hidden_state" in outputs[0]:
        tokens = np.concatenate([np.asarray(o["last_hidden_state"], np.float32) for o in outputs])
        d = tokens.shape[-1]
        figures["tokens_cosine"] = float(
            _cosines(tokens.reshape(-1, d), reference["last_hidden_state"].reshape(-1, d)).min()
        )
    errors = []
    for name in ("image_embeds", "last_hidden_state"):
        if name in outputs[0]:
            got = np.concatenate([np.asarray(o[name], np.float32) for o in outputs])
            errors.append(np.abs(got - reference[name]).max() / np.abs(reference[name]).max())
    figures["max_rel_error"] = float(max(errors))
    return figures


def check_lit(folder: str | Path, net, texts=("a photo of a cat", "a photo of a rocket", "coffee")) -> dict:
    """A LiT export folder against MLX: its image package on photos, its text package on prompts. The
    package names come from the folder's lit.json, as an app would read them."""
    folder = Path(folder)
    facts = json.loads((folder / "lit.json").read_text())
    image = check_package(folder / facts["image_package"], net)
    text = check_text_package(folder / facts["text_package"], net, list(texts))
    report = {
        "passed": image["passed"] and text["passed"],
        "image": image,
        "text": text,
        "summary": f"image: {image['summary']}; text: {text['summary']}",
        "predict": image["predict"],
    }
    if "classifier_package" in facts:  # with --labels; the labels and prompt are in label_embeddings.json
        table = json.loads((folder / "label_embeddings.json").read_text())
        classifier = check_classifier(
            folder / facts["classifier_package"], net, table["labels"], table["template"]
        )
        report["classifier"] = classifier
        report["passed"] = report["passed"] and classifier["passed"]
        report["summary"] += f"; classifier: {classifier['summary']}"
    return report


# (precision, compression) -> the largest |probability difference| a classifier package may show against
# MLX float32 zero-shot on the photos. This project's choice, like the 4-bit cosines: float32 must agree to
# float32 rounding; float16 and 8-bit within a few hundredths; the 4-bit bound only catches broken weights.
# With every probability within b, the top label can differ from MLX's only where its top two are within 2b.
MAX_PROB_ERROR_FP32 = 1e-4
MAX_PROB_ERROR = {"none": 0.01, "int8": 0.03, "palettize8": 0.03, "palettize6": 0.05}
MAX_PROB_ERROR_DEFAULT = 0.25  # int4, palettize4


def prob_tolerance(precision: str, compression: str) -> float:
    if precision == "float32" and compression == "none":
        return MAX_PROB_ERROR_FP32
    return MAX_PROB_ERROR.get(compression, MAX_PROB_ERROR_DEFAULT)


def _mac_feeds(package, main_input: str, raw, pixels):
    """macOS only: the package as an MLModel, and its inputs for the photos (PIL images, or tensors)."""
    import coremltools as ct
    from PIL import Image

    if main_input == "image":
        feeds = [{"image": Image.fromarray(r)} for r in raw]
    else:
        feeds = [{"pixel_values": p.transpose(2, 0, 1)[None]} for p in pixels]
    return ct.models.MLModel(str(package)), feeds


def check_classifier(package: str | Path, model, labels: list[str], template: str, images=None) -> dict:
    """A zero-shot classifier package (numpy evaluator; on macOS also MLModel.predict) against MLX's zero-shot
    on real photos: `aim_mlx.tasks.zeroshot.predict` on `model`'s image embeddings and the labels' prompt
    embeddings. Reports each photo's top label from both and the largest probability difference."""
    import mlx.core as mx

    from aim_mlx.tasks.zeroshot import predict

    spec, program = load_program(package)
    meta = dict(spec.description.metadata.userDefined)
    images = photos() if images is None else images
    raw, pixels = _photo_inputs(meta, images)
    image = np.array(model.encode_image(mx.array(pixels)), np.float32)  # (B, P)
    ids = np.asarray(model.tokenizer([template.format(label) for label in labels]), np.int32)
    text = np.array(model.encode_text(ids), np.float32)  # (L, P)
    reference = predict(image, text, labels, float(model.logit_scale), top_k=len(labels))
    main_input = next(iter(program.functions["main"].inputs))
    feed = raw if main_input == "image" else pixels
    got = [run_program(program, {main_input: f.transpose(2, 0, 1)[None].astype(np.float32)}) for f in feed]
    bound = prob_tolerance(meta.get("precision", "float16"), meta.get("compression", "none"))
    report = {**_compare_classes(got, reference, labels), "bound": bound, "images": len(images)}
    report["passed"] = report["max_prob_error"] <= bound
    report["predict"] = "skipped: Core ML predicts only on macOS"
    if sys.platform == "darwin":
        mlmodel, feeds = _mac_feeds(package, main_input, raw, pixels)
        report["predict"] = _compare_classes([mlmodel.predict(f) for f in feeds], reference, labels)
        report["passed"] = bool(report["passed"] and report["predict"]["max_prob_error"] <= bound)
    report["summary"] = (
        f"max |probability error| {report['max_prob_error']:.3g} (<= {bound} needed), top label as MLX's on "
        f"{report['top_agrees']} of {len(images)} photos"
    )
    return report


def _photo_inputs(meta: dict, images) -> tuple[np.ndarray, np.ndarray]:
    """(raw (B, S, S, 3) uint8 resized and cropped: what an `image` input takes; pixels (B, S, S, 3): what MLX
    and a `pixel_values` input take), for the size, mean and std in a package's metadata."""
    from aim_mlx.inputs.preprocess import ImageProcessor

    processor = ImageProcessor.clip(int(meta["image_size"]))
    if "resize_shortest_edge" in meta:  # AIMv1: ml-aim resizes to 256 before the 224 crop
        processor.size = {"shortest_edge": int(meta["resize_shortest_edge"])}
    processor.image_mean = tuple(float(v) for v in meta["image_mean"].split(","))
    processor.image_std = tuple(float(v) for v in meta["image_std"].split(","))
    raw = np.stack([processor.center_crop(np.asarray(processor.resize(im.convert("RGB")))) for im in images])
    return raw, np.stack([processor.preprocess_one(im) for im in images])


def _compare_classes(outputs: list[dict], reference: list, labels: list[str]) -> dict:
    """Classifier outputs (classLabel, classLabel_probs) against zero-shot Predictions of all labels."""
    top = [o["classLabel"] for o in outputs]
    errors = [
        abs(o["classLabel_probs"][label] - p)
        for o, ref in zip(outputs, reference, strict=True)
        for label, p in zip(ref.labels, ref.probs, strict=True)
    ]
    return {
        "top_labels": top,
        "reference_top_labels": [ref.labels[0] for ref in reference],
        "top_agrees": sum(t == ref.labels[0] for t, ref in zip(top, reference, strict=True)),
        "max_prob_error": float(max(errors)),
        "labels": len(labels),
    }


def check_head_classifier(package: str | Path, model, images=None) -> dict:
    """A classifier package exported from a model with a trained head (AIMv1's ImageNet-1k probe) against
    the MLX model's `classify` on real photos, through the numpy evaluator (on macOS also MLModel.predict):
    the package's labels must be the head's (repeated names made distinct: heads.distinct_head_labels), its
    logits (what its softmax takes) within the float32 bound or cosine of MLX's, its probabilities within
    the classifier bound of the softmax of MLX's logits; top-1 and top-5 agreement are reported."""
    import mlx.core as mx

    from aim_mlx.tasks.heads import distinct_head_labels

    spec, program = load_program(package)
    meta = dict(spec.description.metadata.userDefined)
    images = photos() if images is None else images
    raw, pixels = _photo_inputs(meta, images)
    logits = np.array(model.classify(mx.array(pixels)).astype(mx.float32), np.float64)  # (B, classes)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = distinct_head_labels(model)
    main_input = next(iter(program.functions["main"].inputs))
    feed = raw if main_input == "image" else pixels
    name = classifier_logits(program)
    got = [
        run_program(program, {main_input: f.transpose(2, 0, 1)[None].astype(np.float32)}, extra=[name])
        for f in feed
    ]
    precision, compression = meta.get("precision", "float16"), meta.get("compression", "none")
    metric, bound = tolerance(precision, compression)
    prob_bound = prob_tolerance(precision, compression)
    figures = _compare_head(got, name, logits, probs, labels)
    report = {**figures, "metric": metric, "bound": bound, "prob_bound": prob_bound, "images": len(images)}
    report["passed"] = _head_passes(figures, metric, bound, prob_bound)
    report["predict"] = "skipped: Core ML predicts only on macOS"
    if sys.platform == "darwin":  # not run on this project's machines (Linux): no logits from predict
        mlmodel, feeds = _mac_feeds(package, main_input, raw, pixels)
        predicted = _compare_head([mlmodel.predict(f) for f in feeds], None, logits, probs, labels)
        report["predict"] = predicted
        report["passed"] = report["passed"] and _head_passes(predicted, None, bound, prob_bound)
    report["summary"] = (
        f"logits {metric} {figures[metric]:.3g} ({'<=' if metric == 'max_rel_error' else '>='} {bound} "
        f"needed), max |probability error| {figures['max_prob_error']:.3g} (<= {prob_bound}), top-1 as "
        f"MLX's on {figures['top1_agrees']} of {len(images)} photos, top-5 in order on "
        f"{figures['top5_agrees']}"
    )
    if classifier_classes(program) != labels:  # label i must name logit i
        report.update(passed=False, summary="the package's labels are not the head's classes, in order")
    logger.info("checked %s: %s", package, report["summary"])
    return report


def _compare_head(outputs, logits_name, logits, probs, labels) -> dict:
    """A classifier package's outputs against a head's (B, classes) logits and probabilities. Without
    `logits_name` (MLModel.predict gives no logits) only the probabilities and ranks are compared."""
    got = np.array([[o["classLabel_probs"][label] for label in labels] for o in outputs])  # (B, classes)
    order = np.argsort(-probs, axis=1, kind="stable")
    top5 = [[labels[i] for i in row[:5]] for row in order]
    got_top5 = [
        sorted(o["classLabel_probs"], key=o["classLabel_probs"].get, reverse=True)[:5] for o in outputs
    ]
    figures = {
        "top_labels": [o["classLabel"] for o in outputs],
        "reference_top_labels": [row[0] for row in top5],
        "top1_agrees": sum(o["classLabel"] == row[0] for o, row in zip(outputs, top5, strict=True)),
        "top5_agrees": sum(g == row for g, row in zip(got_top5, top5, strict=True)),
        "max_prob_error": float(np.abs(got - probs).max()),
    }
    if logits_name is not None:
        ours = np.concatenate([np.asarray(o[logits_name], np.float64).reshape(1, -1) for o in outputs])
        figures["cosine"] = float(_cosines(ours, logits).min())
        figures["max_rel_error"] = float(np.abs(ours - logits).max() / np.abs(logits).max())
    return figures


def _head_passes(figures: dict, metric: str | None, bound: float, prob_bound: float) -> bool:
    """Probabilities within `prob_bound`; the logits (when there) within the float32 bound or the cosine."""
    if figures["max_prob_error"] > prob_bound:
        return False
    if metric is None:
        return True
    value = figures[metric]
    return bool(value <= bound if metric == "max_rel_error" else value >= bound)
