"""Core ML export: packages read back and run by the numpy evaluator match aim-mlx (MLX) on real photos.

Tiny random-weight checkpoints in the published layouts; every precision and compression; the compressed-
weight ops checked against coremltools' own decompression; metadata; the native checkpoint; refusals.
Core ML itself predicts only on macOS: those checks are skipped elsewhere.
"""

import json
import logging
import os
import sys
from pathlib import Path

import mlx.nn as nn
import numpy as np
import pytest
import torch
from aim_mlx.convert.coreml import check as coreml_check
from aim_mlx.convert.coreml import evaluator
from aim_mlx.convert.coreml import export as coreml
from aim_mlx.convert.coreml.check import check_classifier, check_lit, check_package, tolerance
from aim_mlx.convert.coreml.compress import kmeans_1d
from aim_mlx.convert.coreml.evaluator import load_program, run_program
from aim_mlx.convert.coreml.export import export_coreml, model_name
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from typer.testing import CliRunner

import aim_mlx
from aim_mlx.checkpoints.variants import CLIP_MEAN, CLIP_STD
from aim_mlx.cli import app
from aim_mlx.errors import AimMlxError, ConfigError, ModelNotFoundError

ct = pytest.importorskip("coremltools")
logging.getLogger("coremltools").setLevel(logging.ERROR)
MAC = sys.platform == "darwin"


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-aimv2")
    write_checkpoint(make_reference(seed=1, image_size=56, **TINY["large"]), folder, layout="apple")
    write_processor(folder)
    return folder


@pytest.fixture(scope="module")
def mlx_model(checkpoint):
    return aim_mlx.load(str(checkpoint), dtype="float32")[0]


@pytest.fixture(scope="module")
def photos():
    return coreml_check.photos()


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("packages")


CASES = [  # (precision, compression, target)
    ("float32", "none", "iOS17"),
    ("float16", "none", "iOS17"),
    ("float16", "int8", "iOS17"),  # iOS16 constexpr_affine_dequantize
    ("float16", "int4", "macOS15"),  # iOS18 constexpr_blockwise_shift_scale
    ("float16", "palettize6", "iOS17"),  # iOS16 constexpr_lut_to_dense
    ("float16", "palettize4", "iOS18"),  # iOS18 constexpr_lut_to_dense
]


@pytest.fixture(scope="module")
def packages(checkpoint, out):
    made = {}
    for precision, compress, target in CASES:
        path = out / f"{precision}-{compress}-{target}.mlpackage"
        export_coreml(
            str(checkpoint),
            path,
            precision=precision,
            compress=compress,
            target=target,
            outputs="pooled,tokens",
        )
        made[precision, compress, target] = path
    return made


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_package_matches_mlx_on_photos(case, packages, mlx_model, photos):
    report = check_package(packages[case], mlx_model, photos)
    metric, bound = tolerance(*case[:2])
    assert report["metric"] == metric and report["bound"] == bound
    if metric == "max_rel_error":  # float32: every output, tokens included
        assert report["max_rel_error"] <= 1e-4, report
    else:
        assert report["cosine"] >= bound, report
    assert report["passed"], report
    if MAC:
        assert isinstance(report["predict"], dict), report
    else:
        assert report["predict"].startswith("skipped"), report


def test_issue_thresholds():
    assert tolerance("float32", "none") == ("max_rel_error", 1e-4)
    assert tolerance("float16", "none")[1] >= 0.999
    assert tolerance("float16", "int8")[1] >= 0.995
    assert tolerance("float16", "palettize6")[1] >= 0.99


EXPECTED_OPS = {
    ("float16", "int8", "iOS17"): "constexpr_affine_dequantize",
    ("float16", "int4", "macOS15"): "constexpr_blockwise_shift_scale",
    ("float16", "palettize6", "iOS17"): "constexpr_lut_to_dense",
    ("float16", "palettize4", "iOS18"): "constexpr_lut_to_dense",
}


@pytest.mark.parametrize("case", list(EXPECTED_OPS), ids=["-".join(c) for c in EXPECTED_OPS])
def test_compressed_ops_match_coremltools_decompression(case, packages):
    """The evaluator's dequantization of each compressed weight equals coremltools' own."""
    _, program = load_program(packages[case])
    ops = [op for op in program.functions["main"].operations if op.op_type.startswith("constexpr_")]
    assert ops and {op.op_type for op in ops} == {EXPECTED_OPS[case]}
    # Every linear weight (7 per block) is compressed.
    assert len(ops) >= 7 * 2
    for op in ops:
        env = {v.name: v.val for v in op.inputs.values()}
        expected = np.asarray(op.materialized_val_inference())
        got = _run_one(op, env).astype(expected.dtype)
        # coremltools computes in the weight's dtype, the evaluator in float32 then rounds: one ulp apart.
        ulp = np.finfo(expected.dtype).eps
        np.testing.assert_allclose(got, expected, rtol=ulp, atol=np.abs(expected).max() * ulp)


def _run_one(op, env):
    """One constexpr op through the evaluator's own code."""
    args = {k: env[v.name] for k, v in op.inputs.items()}
    if op.op_type == "constexpr_lut_to_dense":
        return evaluator._lut_to_dense(args, op.outputs[0].shape)
    return evaluator.OPS[op.op_type](**args)


def test_compression_shrinks_package(packages):
    sizes = {case: _size(path) for case, path in packages.items()}
    fp16 = sizes["float16", "none", "iOS17"]
    assert sizes["float32", "none", "iOS17"] > 1.8 * fp16
    assert sizes["float16", "int8", "iOS17"] < 0.6 * fp16
    assert sizes["float16", "int4", "macOS15"] < sizes["float16", "int8", "iOS17"]
    assert sizes["float16", "palettize4", "iOS18"] < sizes["float16", "palettize6", "iOS17"]


def _size(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_check_catches_a_wrong_model(packages, photos):
    """The comparison can fail: another model's MLX output is far from this package."""
    other_folder = packages["float32", "none", "iOS17"].parent / "other"
    write_checkpoint(make_reference(seed=2, image_size=56, **TINY["large"]), other_folder, layout="hf")
    other = aim_mlx.load(str(other_folder), dtype="float32")[0]
    report = check_package(packages["float32", "none", "iOS17"], other, photos[:2])
    assert not report["passed"] and report["max_rel_error"] > 1e-2


def test_float16_rmsnorm_cannot_overflow(tmp_path, photos):
    """Residual streams in the thousands: x² overflows float16 (max 65504), the exported norm does not."""
    reference = make_reference(seed=4, image_size=56, **TINY["large"])
    with torch.no_grad():
        reference.embeddings.position_embedding.weight.mul_(3000)
    folder = write_checkpoint(reference, tmp_path / "loud", layout="hf")
    model = aim_mlx.load(str(folder), dtype="float32")[0]
    hidden = np.asarray(model.embed_patches(aim_mlx.load(str(folder))[1](photos[:1])))
    with np.errstate(over="ignore"):  # the naive form overflows
        assert not np.isfinite((hidden.astype(np.float16) ** 2).sum(-1)).all()
    path = export_coreml(str(folder), tmp_path / "loud.mlpackage", precision="float16").path
    report = check_package(path, model, photos)
    assert report["cosine"] >= 0.999, report


def test_metadata_and_interface(packages, checkpoint):
    spec = ct.utils.load_spec(str(packages["float16", "none", "iOS17"]))
    meta = spec.description.metadata
    assert "Apple" in meta.author and meta.license and meta.versionString and meta.shortDescription
    user = dict(meta.userDefined)
    assert user["source_model"] == str(checkpoint) and user["source_revision"] == "local"
    assert [float(v) for v in user["image_mean"].split(",")] == pytest.approx(CLIP_MEAN)
    assert [float(v) for v in user["image_std"].split(",")] == pytest.approx(CLIP_STD)
    assert user["image_size"] == "56" and user["embedding_size"] == str(TINY["large"]["hidden_size"])
    assert user["aim_mlx_version"] == aim_mlx.__version__
    assert user["precision"] == "float16" and user["compression"] == "none"
    (image,) = spec.description.input
    assert image.name == "image" and image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.width, image.type.imageType.height) == (56, 56)
    assert image.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert "56x56" in image.shortDescription
    outputs = {o.name: o.type.multiArrayType for o in spec.description.output}
    assert list(outputs) == ["image_embeds", "last_hidden_state"]
    described = {o.name: o.shortDescription for o in spec.description.output}
    d = TINY["large"]["hidden_size"]
    assert described["image_embeds"].startswith(f"(1, {d}) float32")
    assert described["last_hidden_state"].startswith(f"(1, 16, {d}) float32")  # 56 px: 4x4 patches
    assert all(t.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32 for t in outputs.values())


def test_tensor_input(checkpoint, mlx_model, photos, tmp_path):
    path = export_coreml(
        str(checkpoint), tmp_path / "t.mlpackage", precision="float32", input_kind="tensor"
    ).path
    _, program = load_program(path)
    assert list(program.functions["main"].inputs) == ["pixel_values"]
    assert [o.name for o in program.functions["main"].outputs] == ["image_embeds"]
    assert check_package(path, mlx_model, photos)["max_rel_error"] <= 1e-4


def test_native_checkpoint_one_size_per_package(tmp_path, photos):
    folder = write_checkpoint(
        make_reference(seed=5, image_size=224, is_native=True, **TINY["large"]), tmp_path / "native"
    )
    model = aim_mlx.load(str(folder), dtype="float32")[0]
    assert model.config.is_native
    for size in (168, 196):  # 144 and 196 patches; the sin-cos table differs per grid
        path = export_coreml(
            str(folder), tmp_path / f"n{size}.mlpackage", precision="float32", image_size=size
        )
        spec = ct.utils.load_spec(str(path.path))
        assert spec.description.input[0].type.imageType.width == size
        assert check_package(path.path, model, photos[:2])["max_rel_error"] <= 1e-4
    for bad in (100, 140, 910):  # not a multiple of 14; 100 patches; 4225 patches
        # 154 = 14 * 11 (121 patches, the fewest >= 112); 896 = 14 * 64 (4096 patches)
        with pytest.raises(ConfigError, match="--image-size .* 112-4096 patches, i.e. 154 to 896"):
            export_coreml(str(folder), tmp_path / "bad.mlpackage", image_size=bad)
    assert not (tmp_path / "bad.mlpackage").exists()


def test_quantized_mlx_folder_is_dequantized(checkpoint, tmp_path, photos):
    """A folder from `aim-mlx convert -q` exports; the package matches that quantized MLX model."""
    from aim_mlx.convert.convert import convert

    folder = tmp_path / "q8"
    convert(str(checkpoint), folder, quantize=True, q_bits=8, q_group_size=32)
    model = aim_mlx.load(str(folder), dtype="float32")[0]
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    path = export_coreml(str(folder), tmp_path / "q8.mlpackage", precision="float32").path
    meta = ct.utils.load_spec(str(path)).description.metadata.userDefined
    recorded = json.loads((folder / "config.json").read_text())["source_model"]
    assert meta["source_model"] == recorded and recorded != str(folder)
    assert check_package(path, model, photos[:2])["max_rel_error"] <= 1e-4


def test_fixed_checkpoint_refuses_other_sizes(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="learned position table"):
        export_coreml(str(checkpoint), tmp_path / "x.mlpackage", image_size=112)


@pytest.mark.parametrize(
    "option, value, match",
    [
        ("precision", "bfloat16", "--precision"),
        ("compress", "int2", "--compress"),
        ("target", "iOS16", "--min-deployment-target"),
        ("input_kind", "video", "--input"),
        ("outputs", "tokens", "--outputs"),
    ],
)
def test_unknown_options(checkpoint, tmp_path, option, value, match):
    with pytest.raises(ConfigError, match=match):
        export_coreml(str(checkpoint), tmp_path / "x.mlpackage", **{option: value})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["iOS17", "macOS14"])
def test_int4_needs_ios18(checkpoint, tmp_path, target):
    with pytest.raises(ConfigError, match="macOS15 or iOS18"):
        export_coreml(str(checkpoint), tmp_path / "x.mlpackage", compress="int4", target=target)


def test_refusals_write_nothing(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"\.mlpackage"):
        export_coreml(str(checkpoint), tmp_path / "x.mlmodel")
    with pytest.raises(ModelNotFoundError):
        export_coreml(str(tmp_path / "missing"), tmp_path / "x.mlpackage")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_error(checkpoint, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(AimMlxError, match="cannot write"):
        export_coreml(str(checkpoint), tmp_path / "file" / "m.mlpackage")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_existing_output_needs_force(checkpoint, tmp_path):
    target = tmp_path / "m.mlpackage"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(ConfigError, match="--force"):
        export_coreml(str(checkpoint), target)
    assert (target / "keep").read_text() == "old"
    export_coreml(str(checkpoint), target, force=True)
    assert not (target / "keep").exists() and (target / "Manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]  # no temporary left


def test_failed_check_writes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(coreml_check.MIN_COSINE, "none", 1.5)  # a bound no package can meet
    with pytest.raises(AimMlxError, match="--check failed, nothing written"):
        export_coreml(str(checkpoint), tmp_path / "m.mlpackage", check=True)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _private(folder) -> list[str]:
    """Everything under `folder` (itself included) that the group or others cannot read (or enter)."""
    paths = [folder, *folder.rglob("*")]
    return [str(p) for p in paths if p.stat().st_mode & 0o077 != (0o055 if p.is_dir() else 0o044)]


def test_package_has_normal_permissions(checkpoint, tmp_path, umask_022):
    """Not the private modes of coremltools' temporary package (0700 folders, 0600 model.mlmodel)."""
    path = export_coreml(str(checkpoint), tmp_path / "m.mlpackage").path
    assert path.stat().st_mode & 0o077 == 0o055
    assert (path / "Data" / "com.apple.CoreML" / "model.mlmodel").is_file()
    assert _private(path) == []


def test_missing_coremltools_is_one_error(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # `import coremltools` now fails
    with pytest.raises(AimMlxError) as caught:
        export_coreml(str(checkpoint), tmp_path / "m.mlpackage")
    assert str(caught.value) == "coremltools is not installed; pip install 'aim-mlx[coreml]'"
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(
        app, ["export", "coreml", "-m", str(checkpoint), "-o", str(tmp_path / "m.mlpackage")]
    )
    assert result.exit_code == 1 and result.output.strip().splitlines() == [f"error: {caught.value}"]


def test_missing_scikit_image_is_one_error_for_check(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    # Found missing before the model loads (minutes for a real one), not when --check starts.
    monkeypatch.setattr(coreml, "load", lambda *args, **kwargs: pytest.fail("loaded before checking"))
    message = "scikit-image is not installed; pip install 'aim-mlx[coreml]'"
    with pytest.raises(AimMlxError) as caught:
        export_coreml(str(checkpoint), tmp_path / "m.mlpackage", check=True)
    assert str(caught.value) == message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(AimMlxError, match="scikit-image is not installed"):
        coreml_check.photos()


def test_kmeans_1d_against_brute_force():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(-3, 0.1, 300), rng.normal(0, 0.1, 300), rng.normal(5, 0.1, 300)])
    centroids, indices = kmeans_1d(values, 3)
    np.testing.assert_allclose(np.sort(centroids), [-3, 0, 5], atol=0.05)
    # Each value goes to its nearest centroid, and each centroid is the mean of its values.
    assert (indices == np.abs(values[:, None] - centroids[None]).argmin(1)).all()
    for k in range(3):
        assert centroids[k] == pytest.approx(values[indices == k].mean())


def test_evaluator_refuses_unknown_inputs(packages):
    _, program = load_program(packages["float32", "none", "iOS17"])
    with pytest.raises(AimMlxError, match="needs input 'image'"):
        run_program(program, {"pixels": np.zeros((1, 3, 56, 56), np.float32)})


def test_cli_export_and_errors(checkpoint, tmp_path):
    runner = CliRunner()
    path = tmp_path / "cli.mlpackage"
    args = ["export", "coreml", "-m", str(checkpoint), "-o", str(path)]
    result = runner.invoke(app, [*args, "--precision", "float32", "--check"])
    assert result.exit_code == 0, result.output
    assert path.is_dir() and "max_rel_error" in result.output and "wrote" in result.output
    for extra, message, code in [
        ([], "already exists; pass --force", 1),
        (["--force", "--precision", "float8"], "Invalid value for '--precision'", 2),  # a choice: usage
        (["--force", "--compress", "int4"], "--compress int4 needs", 1),
    ]:
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == code, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines[0].startswith("error: ") and message in lines[0], result.output
        assert lines[1:] == ([] if code == 1 else ["Try 'aim-mlx export coreml -h' for help."])


@pytest.mark.skipif(
    not MAC, reason="Core ML predicts only on macOS; the numpy evaluator covers this platform"
)
def test_mlmodel_predict_matches_mlx(packages, mlx_model, photos):
    report = check_package(packages["float16", "none", "iOS17"], mlx_model, photos)
    assert report["predict"]["cosine"] >= 0.999, report


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    from lit_checkpoints import make_lit_reference, write_lit_checkpoint

    folder = write_lit_checkpoint(make_lit_reference(seed=6), tmp_path_factory.mktemp("tiny-lit"), "apple")
    return folder, aim_mlx.load(str(folder), dtype="float32")[0]


@pytest.mark.parametrize("precision, compress", [("float32", "none"), ("float16", "int8")])
def test_lit_exports_image_and_text_packages(lit, tmp_path, precision, compress):
    folder, model = lit
    labels = ["cat", "rocket", "cup of coffee"]
    out = export_coreml(
        str(folder), tmp_path / "lit", precision=precision, compress=compress, labels=labels
    ).path
    report = check_lit(out, model)
    assert report["passed"], report["summary"]
    if precision == "float32":  # the text tower pooled at the first end-of-text token, exactly
        assert report["text"]["max_rel_error"] <= 1e-4 and report["image"]["max_rel_error"] <= 1e-4
    facts = json.loads((out / "lit.json").read_text())
    assert facts["logit_scale"] == pytest.approx(float(np.array(model.logit_scale)))
    assert facts["eos_token_id"] == 49407 and facts["context_length"] == 77
    for name in facts["tokenizer_files"]:
        assert (out / "tokenizer" / name).read_bytes() == (folder / name).read_bytes()
    assert {"vocab.json", "merges.txt"} <= set(facts["tokenizer_files"])
    text = ct.utils.load_spec(str(out / facts["text_package"])).description
    (ids,) = text.input
    assert ids.name == "input_ids" and list(ids.type.multiArrayType.shape) == [1, 77]
    assert ids.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
    assert [o.name for o in text.output] == ["text_embeds"]
    image = ct.utils.load_spec(str(out / facts["image_package"])).description
    assert image.metadata.userDefined["embedding_size"] == str(facts["embedding_size"])
    # The precomputed label embeddings are what the text package gives for the same prompts.
    table = json.loads((out / "label_embeddings.json").read_text())
    assert table["labels"] == labels
    _, program = load_program(out / facts["text_package"])
    prompts = model.tokenizer([table["template"].format(label) for label in labels])
    packaged = np.concatenate(
        [run_program(program, {"input_ids": row[None]})["text_embeds"] for row in prompts]
    )
    cosines = (packaged * np.asarray(table["embeddings"])).sum(-1) / np.linalg.norm(packaged, axis=-1)
    assert cosines.min() >= (0.99999 if precision == "float32" else report["text"]["bound"])


def test_text_package_without_an_end_of_text_token_pools_as_mlx(lit, tmp_path):
    """Ids with no end-of-text token: MLX pools at position 0; the package must too, not return NaN."""
    folder, model = lit
    out = export_coreml(str(folder), tmp_path / "lit", precision="float32").path
    facts = json.loads((out / "lit.json").read_text())
    _, program = load_program(out / facts["text_package"])
    ids = np.asarray(model.tokenizer(["a photo of a cat", "x"]), np.int32)
    ids[ids == 49407] = 320  # every end-of-text token replaced: no EOS anywhere
    for row in ids:
        got = run_program(program, {"input_ids": row[None]})["text_embeds"]
        expected = np.asarray(model.encode_text(row[None]))
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_lit_json_holds_numbers(lit, tmp_path, umask_022):
    """lit.json is for apps: numbers as JSON numbers (the package metadata must be strings, lit.json not)."""
    folder, model = lit
    out = export_coreml(str(folder), tmp_path / "lit", precision="float32").path
    facts = json.loads((out / "lit.json").read_text())
    assert facts["logit_scale"] == pytest.approx(float(np.array(model.logit_scale)))
    for key in ("context_length", "bos_token_id", "eos_token_id", "pad_token_id", "image_size"):
        assert type(facts[key]) is int, (key, facts[key])
    assert facts["image_size"] == model.config.vision.image_size
    assert facts["embedding_size"] == model.text_projector.weight.shape[0]
    assert facts["image_mean"] == pytest.approx(CLIP_MEAN) and facts["image_std"] == pytest.approx(CLIP_STD)
    assert all(type(v) is float for v in facts["image_mean"] + facts["image_std"] + [facts["logit_scale"]])
    # ... while the packages' metadata stays Core ML's strings, the same facts written as before.
    meta = ct.utils.load_spec(str(out / facts["image_package"])).description.metadata.userDefined
    assert meta["image_size"] == str(facts["image_size"])
    assert [float(v) for v in meta["image_mean"].split(",")] == pytest.approx(CLIP_MEAN)
    assert _private(out) == []  # the folder and both packages have the user's normal permissions


def test_lit_output_is_a_folder(lit, checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="without .mlpackage"):
        export_coreml(str(lit[0]), tmp_path / "lit.mlpackage")
    with pytest.raises(ConfigError, match="no text tower"):
        export_coreml(str(checkpoint), tmp_path / "v.mlpackage", labels=["cat"])
    assert list(tmp_path.iterdir()) == []


def test_hub_id_records_source_and_license(checkpoint, cache, tmp_path):
    from fakehub import add_folder

    from aim_mlx.checkpoints.variants import VARIANTS

    variant = VARIANTS["apple/aimv2-large-patch14-224"]
    add_folder(cache, variant.repo_id, variant.revision, checkpoint)
    path = export_coreml("aimv2-large-patch14-224", tmp_path / "hub.mlpackage").path
    meta = ct.utils.load_spec(str(path)).description.metadata
    assert meta.userDefined["source_model"] == variant.repo_id
    assert meta.userDefined["source_revision"] == variant.revision
    assert "apple-amlr" in meta.license and variant.revision[:12] in meta.versionString


def _constants(package) -> dict:
    """The saved program's constants of rank >= 2 by what consumes them: (op type, parameter) -> the set of
    (how the constant is stored, its shape); stored as 'const fp16' (plain float) or a constexpr op type."""
    from coremltools.converters.mil.mil import types

    _, program = load_program(package)
    found = {}
    for op in program.functions["main"].operations:
        if op.op_type in ("const", "classify") or op.op_type.startswith("constexpr_"):
            continue  # classify's one constant is its list of labels
        for param, var in op.inputs.items():
            if isinstance(var, (list, tuple)) or var.op is None or var.rank < 2:
                continue
            if var.op.op_type == "const":
                kind = f"const {types.builtin_to_string(var.dtype)}"
            elif var.op.op_type.startswith("constexpr_"):
                kind = var.op.op_type
            else:
                continue  # an activation
            found.setdefault((op.op_type, param), set()).add((kind, tuple(var.shape)))
    return found


@pytest.fixture(scope="module")
def checkpoint_84(tmp_path_factory):
    """84 px: a (36, 128) position table, above coremltools' 2048-element compression threshold."""
    folder = tmp_path_factory.mktemp("tiny-aimv2-84")
    write_checkpoint(make_reference(seed=1, image_size=84, **TINY["large"]), folder, layout="apple")
    return folder


COMPRESSED_AS = {  # compression -> (target, the constexpr op holding a compressed weight)
    "int8": ("iOS17", "constexpr_affine_dequantize"),
    "int4": ("iOS18", "constexpr_blockwise_shift_scale"),
    "palettize6": ("iOS17", "constexpr_lut_to_dense"),
}


def _assert_linear_weights_compressed(weights: set, compress: str, constexpr: str) -> None:
    """Every linear weight is compressed; int4 only where its input width holds whole blocks of 32 (the
    tiny text MLP's 176 does not; the published widths all do)."""
    for kind, (_, width) in weights:
        whole_blocks = compress != "int4" or width % 32 == 0
        assert kind == (constexpr if whole_blocks else "const fp16"), (kind, width)
    assert any(kind == constexpr for kind, _ in weights)


@pytest.mark.parametrize("compress", list(COMPRESSED_AS))
def test_compression_touches_only_weights(compress, checkpoint_84, lit, tmp_path, caplog):
    """Linear weights (and the patch conv, except int4's blocks of 32 that its 3 channels cannot hold) are
    compressed; the position tables, the causal mask and the token embeddings stay float16 constants."""
    target, constexpr = COMPRESSED_AS[compress]
    fp16 = "const fp16"
    with caplog.at_level(logging.WARNING):
        vision = export_coreml(
            str(checkpoint_84), tmp_path / "v.mlpackage", compress=compress, target=target
        ).path
    assert not [r for r in caplog.records if "block" in r.getMessage()]  # int4 tried no conv blocks
    found = _constants(vision)
    _assert_linear_weights_compressed(found.pop(("linear", "weight")), compress, constexpr)
    conv = found.pop(("conv", "weight"))
    assert {kind for kind, _ in conv} == {fp16 if compress == "int4" else constexpr}
    assert (fp16, (1, 36, 128)) in found["add", "y"]  # the position table
    assert {kind for kinds in found.values() for kind, _ in kinds} == {fp16}, found

    labels = [f"thing {i}" for i in range(50)]  # a (48, 50) label table: above the threshold too
    folder = export_coreml(
        str(lit[0]), tmp_path / "lit", compress=compress, target=target, labels=labels
    ).path
    facts = json.loads((folder / "lit.json").read_text())
    for package in (facts["image_package"], facts["text_package"], facts["classifier_package"]):
        found = _constants(folder / package)
        _assert_linear_weights_compressed(found.pop(("linear", "weight")), compress, constexpr)
        found.pop(("conv", "weight"), None)  # the image towers', as above
        if package == facts["text_package"]:
            assert (fp16, (49408, 64)) in found["gather", "x"]  # the token embeddings
            assert (fp16, (1, 77, 64)) in found["add", "y"]  # the positions
            # The causal mask: added to the scores, or from iOS18 the fused attention's attn_mask.
            assert (fp16, (1, 1, 77, 77)) in set().union(*found.values())
        if package == facts["classifier_package"]:
            assert (fp16, (48, 50)) in found["matmul", "y"]  # the scaled label embeddings
        assert {kind for kinds in found.values() for kind, _ in kinds} == {fp16}, (package, found)


@pytest.mark.parametrize(
    "source, native_size, name",
    [
        ("apple/aimv2-large-patch14-224-lit", None, "AIMv2LargePatch14_224LiT"),
        ("apple/aimv2-1B-patch14-448", None, "AIMv2_1BPatch14_448"),
        ("apple/aimv2-large-patch14-224-distilled", None, "AIMv2LargePatch14_224Distilled"),
        ("apple/aimv2-large-patch14-native", 336, "AIMv2LargePatch14Native_336"),
        ("/data/my.model-v2/", None, "MyModelV2"),
        ("2024-model", None, "AIM_2024Model"),  # an identifier cannot start with a digit
    ],
)
def test_model_name(source, native_size, name):
    assert model_name(source, native_size) == name


def test_every_published_checkpoint_has_its_own_swift_name():
    from aim_mlx.checkpoints.variants import VARIANTS

    names = [model_name(repo_id) for repo_id in VARIANTS]
    assert len(set(names)) == len(names) == len(VARIANTS)
    assert all(coreml.SWIFT_IDENTIFIER.fullmatch(name) for name in names)


def test_default_names_come_from_the_checkpoint(checkpoint, cache, lit, tmp_path, monkeypatch):
    """No -o: a vision package named after the model in the current folder; the LiT folder's packages are
    named after the model too, and lit.json says so."""
    from fakehub import add_folder

    from aim_mlx.checkpoints.variants import VARIANTS

    variant = VARIANTS["apple/aimv2-large-patch14-224"]
    add_folder(cache, variant.repo_id, variant.revision, checkpoint)
    monkeypatch.chdir(tmp_path)
    assert export_coreml("aimv2-large-patch14-224").path == Path("AIMv2LargePatch14_224.mlpackage")
    assert (tmp_path / "AIMv2LargePatch14_224.mlpackage" / "Manifest.json").is_file()

    name = model_name(str(lit[0]))  # a local folder: its own name
    out = export_coreml(str(lit[0]), labels=["cat", "dog"]).path
    assert out == Path(name) and (tmp_path / name / "lit.json").is_file()
    facts = json.loads((out / "lit.json").read_text())
    assert facts["image_package"] == f"{name}ImageEncoder.mlpackage"
    assert facts["text_package"] == f"{name}TextEncoder.mlpackage"
    assert facts["classifier_package"] == f"{name}Classifier.mlpackage"
    assert sorted(p.name for p in out.glob("*.mlpackage")) == sorted(
        facts[k] for k in ("classifier_package", "image_package", "text_package")
    )


def test_output_that_is_not_a_swift_identifier_warns(checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="aim_mlx"):
        export_coreml(str(checkpoint), tmp_path / "AIMv2L.mlpackage")
    assert not [r for r in caplog.records if "Swift" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="aim_mlx"):
        export_coreml(str(checkpoint), tmp_path / "aim-v2 large.mlpackage")
    (warning,) = [r.getMessage() for r in caplog.records if "Swift" in r.getMessage()]
    assert "'aim-v2 large' is not a Swift identifier" in warning
    assert f"{model_name(str(checkpoint))}.mlpackage" in warning


def test_cli_output_is_optional(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export", "coreml", "-m", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == [f"{model_name(str(checkpoint))}.mlpackage"]


def _classify_photos(package, photos):
    """The classifier package's outputs on each photo, through the numpy evaluator."""
    from aim_mlx.inputs.preprocess import ImageProcessor

    _, program = load_program(package)
    size = program.functions["main"].inputs["image"].shape[-1]
    processor = ImageProcessor.clip(size)
    raw = [processor.center_crop(np.asarray(processor.resize(im.convert("RGB")))) for im in photos]
    return [run_program(program, {"image": r.transpose(2, 0, 1)[None].astype(np.float32)}) for r in raw]


def test_lit_classifier_package_matches_mlx_zero_shot(lit, tmp_path, photos):
    """With labels, a Core ML classifier whose top labels and probabilities on photos are MLX zero-shot's."""
    from aim_mlx.tasks.zeroshot import DEFAULT_TEMPLATE, zero_shot

    folder, model = lit
    labels = ["cat", "rocket", "cup of coffee", "astronaut"]
    out = export_coreml(str(folder), tmp_path / "lit", precision="float32", labels=labels).path
    package = out / json.loads((out / "lit.json").read_text())["classifier_package"]
    spec = ct.utils.load_spec(str(package))
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.predictedProbabilitiesName == "classLabel_probs"
    assert [o.type.WhichOneof("Type") for o in spec.description.output] == ["stringType", "dictionaryType"]
    assert "one of 4 labels" in spec.description.metadata.shortDescription
    assert spec.description.metadata.userDefined["labels"] == "4"
    processor = aim_mlx.load(str(folder), dtype="float32")[1]
    expected = zero_shot(model, processor, photos, labels, top_k=len(labels), cache=False)
    got = _classify_photos(package, photos)
    assert [g["classLabel"] for g in got] == [e.labels[0] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert set(g["classLabel_probs"]) == set(labels)
        for label, prob in zip(e.labels, e.probs, strict=True):
            assert g["classLabel_probs"][label] == pytest.approx(prob, abs=1e-4)
    report = check_classifier(package, model, labels, DEFAULT_TEMPLATE, photos)
    assert report["passed"] and report["top_agrees"] == len(photos), report
    # The check can fail: against another prompt, MLX's label embeddings are not the package's.
    other = check_classifier(package, model, labels, "a drawing of the {}, in the dark", photos)
    assert not other["passed"] and other["max_prob_error"] > 1e-2, other


def test_check_lit_checks_the_classifier(lit, tmp_path, monkeypatch):
    folder, model = lit
    out = export_coreml(str(folder), tmp_path / "lit", labels=["cat", "rocket"], check=True).path
    report = check_lit(out, model)
    assert report["passed"] and "classifier:" in report["summary"], report["summary"]
    monkeypatch.setattr(coreml_check, "MAX_PROB_ERROR", {"none": -1.0})  # a bound nothing meets
    assert not check_lit(out, model)["passed"]


def test_bench_finds_the_packages_a_lit_folder_names(tmp_path):
    from aim_mlx.tasks.bench.coreml_engine import coreml_packages

    folder = tmp_path / "lit"
    folder.mkdir()
    names = {"image_package": "XImageEncoder.mlpackage", "text_package": "XTextEncoder.mlpackage"}
    (folder / "lit.json").write_text(json.dumps({**names, "logit_scale": 100.0}))
    assert coreml_packages(folder) == [folder / names["image_package"], folder / names["text_package"]]
    (tmp_path / "m.mlpackage").mkdir()
    assert coreml_packages(tmp_path / "m.mlpackage") == [tmp_path / "m.mlpackage"]
    with pytest.raises(ConfigError, match="neither a .mlpackage nor a LiT export folder"):
        coreml_packages(tmp_path)
    with pytest.raises(ConfigError, match="no such package"):
        coreml_packages(tmp_path / "missing.mlpackage")


def test_default_name_of_a_native_folder_holds_its_size(tmp_path, monkeypatch):
    """Apple's native config.json says nothing of positions (only its weights lack a table): the default name
    still ends with the one size the package takes."""
    reference = make_reference(seed=5, image_size=224, is_native=True, **TINY["large"])
    folder = write_checkpoint(reference, tmp_path / "native-apple", layout="apple")
    assert "is_native" not in json.loads((folder / "config.json").read_text())
    monkeypatch.chdir(tmp_path)
    path = export_coreml(str(folder), image_size=168).path
    assert path == Path("NativeApple_168.mlpackage") and path.is_dir()
