"""Core ML export of AIMv1's ImageNet classifier: the saved package, read back and run by the numpy evaluator,
is a Core ML classifier over the head's 1000 labels whose logits and top-5 are the MLX model's `classify`.

Tiny random-weight AIMv1 checkpoints (tests/aimv1_checkpoints.py); float32 and float16; a float16 probed mean
whose plain sum would overflow; options that do not apply. Core ML itself predicts only on macOS.
"""

import logging

import mlx.core as mx
import numpy as np
import pytest
import torch
from aim_mlx.convert.coreml import check as coreml_check
from aim_mlx.convert.coreml.check import check_head_classifier
from aim_mlx.convert.coreml.evaluator import classifier_classes, classifier_logits, load_program, run_program
from aim_mlx.convert.coreml.export import export_coreml, model_name
from aimv1_checkpoints import TINY, make_reference, write_checkpoint
from typer.testing import CliRunner

import aim_mlx
from aim_mlx.cli import app
from aim_mlx.errors import AimMlxError, ConfigError
from aim_mlx.inputs.preprocess import ImageProcessor
from aim_mlx.tasks.heads import distinct_head_labels
from aim_mlx.tasks.zeroshot import imagenet_classes

ct = pytest.importorskip("coremltools")
logging.getLogger("coremltools").setLevel(logging.ERROR)


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 600M-shaped tiny checkpoint probing blocks 1, 3, 4 of eight: blocks 5-7 must not be built."""
    reference = make_reference(seed=3, probe_layers=(1, 3, 4), **TINY["600M"])
    return write_checkpoint(reference, tmp_path_factory.mktemp("tiny-aimv1"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return aim_mlx.load(str(checkpoint), dtype="float32")[0]


@pytest.fixture(scope="module")
def photos():
    return coreml_check.photos()


@pytest.fixture(scope="module")
def packages(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("aimv1-packages")
    made = {}
    for case in CASES:
        precision, compress, kind, target = case
        path = out / f"AIMv1_{'_'.join(case)}.mlpackage"
        export_coreml(
            str(checkpoint), path, precision=precision, compress=compress, input_kind=kind, target=target
        )
        made[case] = path
    return made


CASES = [  # (precision, compression, input, target): iOS18 has the fused attention op
    ("float32", "none", "image", "iOS17"),
    ("float16", "none", "image", "iOS17"),
    ("float16", "int8", "tensor", "iOS17"),
    ("float16", "none", "image", "iOS18"),
]


def _ml_aim_inputs(photos):
    """The photos as ml-aim preprocesses them (shortest side 256, crop 224): uint8 crops and MLX's pixels."""
    processor = ImageProcessor.aimv1(224)
    raw = [processor.center_crop(np.asarray(processor.resize(im.convert("RGB")))) for im in photos]
    return raw, np.stack([processor.preprocess_one(im) for im in photos])


def test_package_is_a_classifier_over_the_heads_labels(packages):
    spec = ct.utils.load_spec(str(packages[CASES[0]]))
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.predictedProbabilitiesName == "classLabel_probs"
    assert [o.type.WhichOneof("Type") for o in spec.description.output] == ["stringType", "dictionaryType"]
    meta = spec.description.metadata
    assert (
        "AIMv1 ImageNet-1k classifier" in meta.shortDescription and "blocks 1, 3, 4" in meta.shortDescription
    )
    assert "AIMv1 weights" in meta.author
    user = meta.userDefined
    assert user["labels"] == "1000" and user["model_family"] == "AIMv1" and user["probe_layers"] == "1,3,4"
    assert user["resize_shortest_edge"] == "256" and user["image_size"] == "224"
    assert "shortest side to 256" in spec.description.input[0].shortDescription
    _, program = load_program(packages[CASES[0]])
    ops = [op.op_type for op in program.functions["main"].operations]
    assert ops.count("gelu") == 5  # blocks 0-4: the three after the last probed one are not built
    labels = classifier_classes(program)
    names = imagenet_classes()
    assert len(labels) == len(set(labels)) == 1000
    # CLIP's ImageNet names repeat two; those carry their WordNet id, the others are as the head's labels
    changed = [(i, label) for i, (label, name) in enumerate(zip(labels, names, strict=True)) if label != name]
    assert changed == [
        (657, "missile (n03773504)"),
        (744, "missile (n04008634)"),
        (836, "sunglasses (n04355933)"),
        (837, "sunglasses (n04356056)"),
    ]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_evaluator_matches_mlx_logits_and_top5(case, packages, model, photos):
    """The package's logits (its softmax's input) and top-5, by the numpy evaluator, against MLX float32's
    `classify` on ml-aim-preprocessed photos."""
    _, program = load_program(packages[case])
    raw, pixels = _ml_aim_inputs(photos)
    expected = np.array(model.classify(mx.array(pixels)), np.float64)  # (B, 1000)
    feed = raw if case[2] == "image" else list(pixels)
    name, main = classifier_logits(program), next(iter(program.functions["main"].inputs))
    got = [run_program(program, {main: f.transpose(2, 0, 1)[None].astype(np.float32)}, [name]) for f in feed]
    logits = np.concatenate([np.asarray(g[name], np.float64).reshape(1, -1) for g in got])
    rel = np.abs(logits - expected).max() / np.abs(expected).max()
    assert rel < {"float32": 1e-4, "float16": 1e-2}[case[0]] * (5 if case[1] == "int8" else 1), rel
    labels = distinct_head_labels(model)
    index = {label: i for i, label in enumerate(labels)}
    slack = 2 * np.abs(logits - expected).max()  # float32: exact ranks; otherwise near-ties may swap
    for g, row in zip(got, expected, strict=True):
        top5 = [labels[i] for i in np.argsort(-row)[:5]]
        probs = g["classLabel_probs"]
        ours = sorted(probs, key=probs.get, reverse=True)[:5]
        if case[0] == "float32":
            assert ours == top5 and g["classLabel"] == top5[0]
        else:  # each of our top 5 is within the error of MLX's top 5
            assert all(row[index[label]] >= np.sort(row)[-5] - slack for label in ours), (ours, top5)
        softmax = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert max(abs(probs[label] - p) for label, p in zip(labels, softmax, strict=True)) < 1e-3
    report = check_head_classifier(packages[case], model, photos)
    assert report["passed"] and report["top1_agrees"] == len(photos), report["summary"]


def test_check_catches_a_wrong_model(packages, tmp_path, photos):
    """The check can fail: another AIMv1 model's logits are far from this package's."""
    other = write_checkpoint(make_reference(seed=9, probe_layers=(1, 3, 4), **TINY["600M"]), tmp_path)
    report = check_head_classifier(
        packages[CASES[0]], aim_mlx.load(str(other), dtype="float32")[0], photos[:2]
    )
    assert not report["passed"] and report["max_rel_error"] > 1e-2, report["summary"]


def test_check_catches_labels_out_of_order(packages, model, photos, monkeypatch):
    from aim_mlx.tasks import heads

    real = heads.distinct_head_labels
    monkeypatch.setattr(heads, "distinct_head_labels", lambda m: real(m)[::-1])
    report = check_head_classifier(packages[CASES[0]], model, photos[:1])
    assert (
        not report["passed"]
        and report["summary"] == "the package's labels are not the head's classes, in order"
    )


def test_float16_probed_mean_cannot_overflow(tmp_path, photos):
    """A channel of ~2e4 in every block's output fits float16, but the sum over the probed blocks passes
    65504 (and its square in a LayerNorm passes it in every block): the package computes the mean as a sum
    of x / L, and its norms divide by max|x| first."""
    reference = make_reference(seed=3, **TINY["600M"])  # the last six of eight blocks probed
    with torch.no_grad():
        reference.preprocessor.patchifier.norm.bias[0] = 2e4  # carried by the residual stream
    folder = write_checkpoint(reference, tmp_path / "loud")
    model = aim_mlx.load(str(folder), dtype="float32")[0]
    probed = np.asarray(model.probed(mx.array(_ml_aim_inputs(photos[:1])[1])))
    assert 6 * np.abs(probed).max() > 65504 > np.abs(probed).max()
    path = export_coreml(str(folder), tmp_path / "Loud.mlpackage", precision="float16").path
    report = check_head_classifier(path, model, photos[:2])
    assert report["passed"] and report["cosine"] >= 0.999, report["summary"]


def test_check_option_and_default_name(checkpoint, tmp_path, monkeypatch):
    """--check runs the classifier check; without -o the package is named after the model, + Classifier."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["export", "coreml", "-m", str(checkpoint), "--precision", "float32", "--check"]
    )
    assert result.exit_code == 0, result.output
    name = f"{model_name(str(checkpoint))}Classifier.mlpackage"
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (
        "check:" in result.output
        and "top-5 in order on 4" in result.output
        and f"wrote {name}" in result.output
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", "cat,dog"], "its labels are its head's ImageNet-1k classes; drop --labels"),
        (["--outputs", "pooled,tokens"], "exports as a classifier"),
        (["--image-size", "336"], "trained on 224x224 crops; drop --image-size"),
        (["-o", "x"], "name the output *.mlpackage"),
    ],
)
def test_options_that_do_not_apply_are_one_line_errors(checkpoint, tmp_path, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export", "coreml", "-m", str(checkpoint), *extra])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert list(tmp_path.iterdir()) == []


def test_failed_check_writes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(coreml_check, "MAX_PROB_ERROR_FP32", -1.0)  # a bound nothing meets
    with pytest.raises(AimMlxError, match="--check failed, nothing written"):
        export_coreml(str(checkpoint), tmp_path / "X.mlpackage", precision="float32", check=True)
    assert not (tmp_path / "X.mlpackage").exists()


def test_not_an_aimv1_model_is_refused():
    from aim_mlx.convert.coreml.aimv1 import aimv1_weights

    with pytest.raises(ConfigError, match="takes an AIMv1 model"):
        aimv1_weights(object())


def test_a_quantized_mlx_folder_exports_dequantized(tmp_path, photos):
    """`aim-mlx convert -q` quantizes the trunk's and the head's Linear layers; the package holds them
    dequantized (Core ML compression is --compress's job) and matches the quantized MLX model."""
    reference = make_reference(seed=4, num_blocks=3, probe_layers=(1, 2), **TINY["1B"])  # 4-bit groups of 64
    source = write_checkpoint(reference, tmp_path / "src")
    result = CliRunner().invoke(
        app, ["convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "q"), "-q"]
    )
    assert result.exit_code == 0, result.output
    model = aim_mlx.load(str(tmp_path / "q"), dtype="float32")[0]
    assert model.head.linear.__class__.__name__ == "QuantizedLinear"
    path = export_coreml(str(tmp_path / "q"), tmp_path / "Q.mlpackage", precision="float32").path
    report = check_head_classifier(path, model, photos[:2])
    assert report["passed"] and report["max_rel_error"] <= 1e-4, report["summary"]
