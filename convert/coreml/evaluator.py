"""A numpy evaluator of saved Core ML programs, for where Core ML cannot run.

Core ML predicts only on macOS. This reads a package back (its MIL program and weight file, through
coremltools' milproto loader) and executes each op with numpy, the compressed-weight ops too. Every op
computes in float32 and rounds its result to the dtype the program declares for it, so a float16 package is
evaluated with float16 activations between ops (and float32 accumulation inside them, as Core ML's GPU and
Neural Engine do). It evaluates the program as written, not Core ML's compiler or kernels. check.py uses it
to verify packages against MLX.
"""

import math
from pathlib import Path

import numpy as np

from aim_mlx.errors import AimMlxError
from aim_mlx.extras import require


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
