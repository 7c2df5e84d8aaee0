"""Core ML op formulations (issue #18): RMSNorm through `layer_norm`, the fused attention op from iOS18, the
evaluator's new ops and input-description checks, and the macOS compute-plan summary.

Packages are read back and run by the numpy evaluator against MLX float32 on real photos, as in
test_coreml.py; the evaluator's new ops are checked against torch and coremltools' own value inference.
Core ML's compiler, kernels and compute plan run only on macOS and are not exercised here.
"""

import json
import logging
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from aim_mlx.convert.coreml import check as coreml_check
from aim_mlx.convert.coreml import evaluator, placement
from aim_mlx.convert.coreml import lit as coreml_lit
from aim_mlx.convert.coreml import vision as coreml_vision
from aim_mlx.convert.coreml.check import check_lit, check_package, tolerance
from aim_mlx.convert.coreml.evaluator import load_program, run_program
from aim_mlx.convert.coreml.export import export_coreml
from aim_mlx.convert.coreml.layers import rms_norm
from checkpoints import TINY, make_reference, write_checkpoint, write_processor

import aim_mlx

ct = pytest.importorskip("coremltools")
logging.getLogger("coremltools").setLevel(logging.ERROR)
LAYERS = 2  # the tiny checkpoints' depth (checkpoints.make_reference)


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TQDM_DISABLE", "1")
        yield


@pytest.fixture(scope="module")
def photos():
    return coreml_check.photos()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-aimv2")
    write_checkpoint(make_reference(seed=1, image_size=56, **TINY["large"]), folder, layout="apple")
    write_processor(folder)
    return folder, aim_mlx.load(str(folder), dtype="float32")[0]


@pytest.fixture(scope="module")
def loud(tmp_path_factory):
    """A residual stream in the thousands (position table x 3000): x² overflows float16, and layer_norm's
    epsilon would act at eps·m² after the max-scaling."""
    reference = make_reference(seed=4, image_size=56, **TINY["large"])
    with torch.no_grad():
        reference.embeddings.position_embedding.weight.mul_(3000)
    folder = write_checkpoint(reference, tmp_path_factory.mktemp("loud"), layout="hf")
    write_processor(folder)
    return folder, aim_mlx.load(str(folder), dtype="float32")[0]


def _export(folder, path, monkeypatch, norm, precision, target, **kw):
    """export_coreml with the program builders' `norm` chosen (the builders are its one place)."""
    monkeypatch.setattr(coreml_vision, "build_program", partial(BUILD_IMAGE, norm=norm))
    monkeypatch.setattr(coreml_lit, "build_text_program", partial(BUILD_TEXT, norm=norm))
    return export_coreml(str(folder), path, precision=precision, target=target, **kw).path


BUILD_IMAGE, BUILD_TEXT = coreml_vision.build_program, coreml_lit.build_text_program


def _op_counts(path) -> dict[str, int]:
    counts = {}
    for op in load_program(path)[1].functions["main"].operations:
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return counts


CASES = [  # (norm, precision, target)
    ("layer_norm", "float32", "iOS17"),
    ("layer_norm", "float16", "iOS17"),
    ("reduce", "float32", "iOS17"),
    ("reduce", "float16", "iOS17"),
    ("layer_norm", "float32", "iOS18"),
    ("layer_norm", "float16", "macOS15"),
]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_formulations_match_mlx_on_photos(case, tiny, photos, tmp_path, monkeypatch):
    """Both RMSNorm formulations, with and without the fused attention op, in float32 and float16: the saved
    program holds the ops asked for and evaluates equal to MLX within the package's bound, tokens included."""
    norm, precision, target = case
    folder, model = tiny
    path = _export(folder, tmp_path / "p.mlpackage", monkeypatch, *case, outputs="pooled,tokens")
    ops = _op_counts(path)
    norms = 2 * LAYERS + 2  # two per block, the patch embedding's, the final one
    assert ops.get("layer_norm", 0) == (norms if norm == "layer_norm" else 0), ops
    assert ops.get("rsqrt", 0) == (norms if norm == "reduce" else 0), ops
    fused = target in ("iOS18", "macOS15")
    assert ops.get("scaled_dot_product_attention", 0) == (LAYERS if fused else 0), ops
    assert ops.get("softmax", 0) == (0 if fused else LAYERS), ops

    report = check_package(path, model, photos)
    metric, bound = tolerance(precision, "none")
    assert report["passed"], report["summary"]
    if precision == "float32":
        assert report["max_rel_error"] <= bound, report
    else:
        assert report["cosine"] >= bound and report["tokens_cosine"] >= bound, report


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_layer_norm_formulation_on_large_activations(loud, photos, tmp_path, monkeypatch, precision):
    folder, model = loud
    path = _export(folder, tmp_path / "p.mlpackage", monkeypatch, "layer_norm", precision, "iOS18")
    report = check_package(path, model, photos)
    assert report["passed"], report["summary"]
    if precision == "float32":
        assert report["max_rel_error"] <= 1e-4, report


def _rms_norm_program(norm: str, d: int, eps: float):
    from coremltools.converters.mil import Builder as mb

    weight = np.linspace(0.5, 1.5, d, dtype=np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, d))])
    def program(x):
        return rms_norm(mb, x, weight, eps, norm)

    return program, weight


@pytest.mark.parametrize("norm", ["layer_norm", "reduce"])
def test_rms_norm_is_exact_where_eps_matters(norm):
    """Rows where eps matters after the max-scaling: one outlier of 3000 among values near 1 (mean(y²) about
    1/D, so layer_norm's own epsilon in place of eps/m² would be a 5e-3 error at D = 1024), a row of values
    near sqrt(eps) (m = 1, eps a third of the mean square) and a row of zeros."""
    d, eps = 1024, 1e-5
    program, weight = _rms_norm_program(norm, d, eps)
    rng = np.random.default_rng(0)
    x = np.stack([rng.uniform(-1, 1, d), rng.uniform(-1, 1, d) * np.sqrt(3 * 3 * eps), np.zeros(d)])
    x[0, 7] = 3000.0
    x = x[None].astype(np.float32)  # (1, 3, D)
    (got,) = run_program(program, {"x": x}).values()
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps) * weight
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6 * np.abs(expected).max())


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    from lit_checkpoints import make_lit_reference, write_lit_checkpoint

    folder = write_lit_checkpoint(make_lit_reference(seed=6), tmp_path_factory.mktemp("tiny-lit"), "apple")
    return folder, aim_mlx.load(str(folder), dtype="float32")[0]


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_lit_attention_is_fused_from_ios18(lit, tmp_path, monkeypatch, precision):
    """The LiT programs at iOS18: the causal text tower and the image tower's attention-pool head use the
    fused op (the text mask as its float attn_mask), and both still match MLX."""
    folder, model = lit
    out = _export(folder, tmp_path / "lit", monkeypatch, "layer_norm", precision, "iOS18")
    facts = json.loads((out / "lit.json").read_text())  # the packages are named after the model
    image, text = _op_counts(out / facts["image_package"]), _op_counts(out / facts["text_package"])
    assert image.get("scaled_dot_product_attention") == LAYERS + 1 and "softmax" not in image, image
    text_layers = model.config.text.num_hidden_layers
    assert text.get("scaled_dot_product_attention") == text_layers and "softmax" not in text, text
    report = check_lit(out, model)
    assert report["passed"], report["summary"]
    metric, bound = tolerance(precision, "none")
    for part in ("image", "text"):
        assert report[part][metric] <= bound if metric == "max_rel_error" else report[part][metric] >= bound


# The evaluator's new ops against independent implementations.


@pytest.mark.parametrize("axes", [[-1], [-2, -1]])
def test_evaluator_layer_norm_matches_torch(axes):
    rng = np.random.default_rng(1)
    x = rng.normal(3, 2, (2, 5, 6)).astype(np.float32)
    shape = x.shape[-len(axes) :]
    gamma, beta = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    got = evaluator.OPS["layer_norm"](x=x, axes=np.array(axes), gamma=gamma, beta=beta, epsilon=1e-3)
    expected = torch.nn.functional.layer_norm(
        torch.from_numpy(x), shape, torch.from_numpy(gamma), torch.from_numpy(beta), eps=1e-3
    )
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_evaluator_sdpa_matches_torch(mask):
    rng = np.random.default_rng(2)
    q, k, v = (rng.normal(size=(1, 2, n, 8)).astype(np.float32) for n in (5, 7, 7))
    attn_mask = {
        None: None,
        "float": rng.normal(size=(1, 1, 5, 7)).astype(np.float32),
        "bool": rng.uniform(size=(5, 7)) > 0.3,
    }[mask]
    if attn_mask is not None and attn_mask.dtype == bool:
        attn_mask[:, 0] = True  # every query attends somewhere
    got = evaluator.OPS["scaled_dot_product_attention"](query=q, key=k, value=v, attn_mask=attn_mask)
    t = [torch.from_numpy(a) for a in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(
        *t, attn_mask=None if attn_mask is None else torch.from_numpy(attn_mask)
    )
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args",
    [
        dict(begin=[0, 0, 0], end=[0, 0, 3], end_mask=[True, True, False]),
        dict(begin=[1, 0, -4], end=[2, 2, -1], stride=[1, 1, 2]),
        dict(
            begin=[0, 1, 2], end=[0, 0, 6], begin_mask=[True, False, False], squeeze_mask=[False, True, False]
        ),
    ],
)
def test_evaluator_slice_by_index_matches_coremltools(args):
    """coremltools computes a slice of a constant itself (value inference): the evaluator must agree."""
    from coremltools.converters.mil import Builder as mb

    x = np.arange(2 * 3 * 6, dtype=np.float32).reshape(2, 3, 6)
    expected = {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))])
    def _(y):
        mil_args = {k: np.array(v, np.bool_ if k.endswith("mask") else np.int32) for k, v in args.items()}
        expected["value"] = mb.slice_by_index(x=x, **mil_args).val
        return y

    got = evaluator.OPS["slice_by_index"](x=x, **{k: np.array(v) for k, v in args.items()})
    np.testing.assert_array_equal(got, expected["value"])


# The input description.


def _edit_spec(package, tmp_path, edit):
    """A copy of `package` whose model description is changed by `edit(spec)`."""
    copy = tmp_path / "edited.mlpackage"
    shutil.copytree(package, copy)
    spec = ct.utils.load_spec(str(copy))
    edit(spec)
    (copy / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(spec.SerializeToString())
    return copy


def _bgr(spec):
    spec.description.input[0].type.imageType.colorSpace = ct.proto.FeatureTypes_pb2.ImageFeatureType.BGR


def _wider(spec):
    spec.description.input[0].type.imageType.width = 70


def _metadata_says_tensor(spec):
    spec.description.metadata.userDefined["input"] = "tensor"


@pytest.mark.parametrize(
    "edit, line",
    [
        (_bgr, "input 'image' has colour layout BGR; the model expects RGB"),
        (_wider, "input 'image' is 70x56; the metadata says 56x56"),
        (
            _metadata_says_tensor,
            "input 'image' is a imageType, but the metadata says the package takes a tensor",
        ),
    ],
)
def test_check_fails_on_a_wrong_input_description(tiny, photos, tmp_path, edit, line):
    folder, model = tiny
    good = export_coreml(str(folder), tmp_path / "good.mlpackage", precision="float32").path
    assert check_package(good, model, photos[:1])["passed"]
    report = check_package(_edit_spec(good, tmp_path, edit), model, photos[:1])
    assert not report["passed"] and report["summary"] == line, report


def test_tensor_input_shape_is_checked(tiny, photos, tmp_path):
    folder, model = tiny
    good = export_coreml(str(folder), tmp_path / "t.mlpackage", precision="float32", input_kind="tensor").path
    assert check_package(good, model, photos[:1])["passed"]

    def taller(spec):
        spec.description.input[0].type.multiArrayType.shape[2] = 57

    report = check_package(_edit_spec(good, tmp_path, taller), model, photos[:1])
    assert (
        report["summary"] == "input 'pixel_values' has shape [1, 3, 57, 56]; the metadata says (1, 3, 56, 56)"
    )


def test_float16_tokens_have_their_own_bound():
    """A float16 package with tokens passes only if its worst token meets the bound too.

    Kept on the private helper: no package a test can build has a worst token below the bound while its
    pooled cosine meets it, so no public call shows the rule."""
    bound = tolerance("float16", "none")[1]
    assert coreml_check._passes({"cosine": 1.0, "max_rel_error": 1.0}, "cosine", bound)
    assert not coreml_check._passes({"cosine": 1.0, "tokens_cosine": bound - 1e-4}, "cosine", bound)
    assert coreml_check._passes({"cosine": bound, "tokens_cosine": bound}, "cosine", bound)


# macOS: the compute plan's device placement. Only the counting is tested here, on coremltools' own
# structure classes and device classes; MLComputePlan itself needs macOS and has not been run.


def test_placement_counts_ops_per_preferred_device():
    from types import SimpleNamespace

    from coremltools.models import compute_device as cd
    from coremltools.models import compute_plan as cp

    def op(name, blocks=()):
        return cp.MLModelStructureProgramOperation({}, name, [], list(blocks), None)

    def block(*ops):
        return cp.MLModelStructureProgramBlock([], list(ops), [])

    inner = block(op("add"))
    ops = [op("const"), op("conv"), op("layer_norm"), op("cond", [inner]), op("softmax"), op("gather")]
    main = cp.MLModelStructureProgramFunction([], block(*ops))
    structure = cp.MLModelStructure(None, cp.MLModelStructureProgram({"main": main}), None)
    device = {name: object.__new__(getattr(cd, name)) for name in placement.DEVICES}
    preferred = {
        "conv": "MLNeuralEngineComputeDevice",
        "layer_norm": "MLNeuralEngineComputeDevice",
        "add": "MLNeuralEngineComputeDevice",
        "softmax": "MLGPUComputeDevice",
        "cond": "MLCPUComputeDevice",
        "gather": "MLCPUComputeDevice",
    }

    def usage(operation):  # MLComputePlan gives constants no device usage
        name = preferred.get(operation.operator_name)
        return None if name is None else cp.MLComputePlanDeviceUsage(device[name], [device[name]])

    plan = SimpleNamespace(model_structure=structure, get_compute_device_usage_for_mlprogram_operation=usage)
    counts = placement.placement(plan)
    assert counts == {"Neural Engine": 3, "CPU": 2, "GPU": 1}
    assert placement.placement_line(counts) == "Neural Engine 3 ops, CPU 2, GPU 1"
