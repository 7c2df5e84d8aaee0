"""`aim-mlx convert`: converted folders load with the same outputs, quantized layers, sharding, refusals.

The reference for every converted folder is the unconverted checkpoint loaded by aim-mlx itself (which
test_load.py checks against transformers), run on the same pixels.
"""

import fnmatch
import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import skimage.data
from aim_mlx.convert import convert as convert_module
from aim_mlx.convert.convert import convert
from checkpoints import TINY, make_reference, write_checkpoint
from fakehub import add_folder
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from mlx.utils import tree_flatten
from PIL import Image
from typer.testing import CliRunner

import aim_mlx
from aim_mlx.checkpoints import folder as names
from aim_mlx.cli import app
from aim_mlx.errors import ConfigError, ModelNotFoundError, WeightsError
from aim_mlx.inputs.preprocess import ImageProcessor
from aim_mlx.models import quantized

SIZE = 56
# The large family's head count and width ratio, with an MLP width every group size divides, and three
# blocks so that a mixed recipe has a middle block.
DIMS = dict(hidden_size=128, num_attention_heads=8, intermediate_size=384, num_hidden_layers=3)
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.fc3")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
runner = CliRunner()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    ref = make_reference(seed=31, image_size=SIZE, **DIMS)
    root = tmp_path_factory.mktemp("src")
    return {layout: write_checkpoint(ref, root / layout, layout) for layout in ("hf", "apple", "mlx")}


@pytest.fixture(scope="module")
def source(sources):
    return sources["hf"]


@pytest.fixture(scope="module")
def pixels():
    """Two real photos, preprocessed as the checkpoints expect."""
    photos = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee())]
    return ImageProcessor.clip(SIZE)(photos)


@pytest.fixture(scope="module")
def float_model(source):
    return aim_mlx.load(str(source), dtype="float32")[0]


def outputs(folder, pixels, dtype="float32") -> np.ndarray:
    model, _ = aim_mlx.load(str(folder), dtype=dtype)
    return np.asarray(model(pixels).last_hidden_state.astype(mx.float32))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def stored(folder) -> dict[str, mx.array]:
    tensors, metadata = mx.load(str(folder / "model.safetensors"), return_metadata=True)
    assert metadata == {"format": "mlx"}
    return tensors


def entries(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- float conversions --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "apple", "mlx"])
def test_float32_conversion_gives_identical_outputs(sources, pixels, tmp_path, layout):
    out = tmp_path / "out"
    done = convert(str(sources[layout]), out)
    assert entries(out) == {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    assert entries(tmp_path) == {"out"}  # no staging folder left behind
    assert done.dtype == "float32" and not done.quantized
    assert done.bytes_after == (out / "model.safetensors").stat().st_size
    assert all(
        k.startswith(("blocks.", "patch_embed.", "pos_embed", "post_trunk_norm.")) for k in stored(out)
    )
    np.testing.assert_array_equal(outputs(out, pixels), outputs(sources[layout], pixels))


@pytest.mark.parametrize("dtype, tolerance", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_conversion(source, pixels, tmp_path, dtype, tolerance):
    out = tmp_path / dtype
    convert(str(source), out, dtype=dtype)
    assert {str(v.dtype) for v in stored(out).values()} == {f"mlx.core.{dtype}"}
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == dtype and "quantization" not in config
    # Rounded once to `dtype` on the way in, the weights compute exactly as the source cast at load time ...
    np.testing.assert_array_equal(outputs(out, pixels, dtype), outputs(source, pixels, dtype))
    # ... and in float32 (the CPU default) they stay within the dtype's precision of the float32 model.
    ours, ref = outputs(out, pixels), outputs(source, pixels)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < tolerance


# --- quantized conversions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, bits, target",
    [  # bits: (block, layer) -> the width that layer must get
        (dict(q_bits=8), lambda i, name: 8, 0.999),
        (dict(q_bits=4), lambda i, name: 4, 0.99),
        (dict(q_bits=4, q_group_size=32), lambda i, name: 4, 0.99),
        (dict(quant_predicate="mixed_4_8"), lambda i, name: 8 if name.startswith("attn.") else 4, 0.99),
        (dict(quant_predicate="ends_4_8"), lambda i, name: 8 if i in (0, 2) else 4, 0.99),
    ],
)
def test_quantized_conversion(source, float_model, pixels, tmp_path, options, bits, target):
    out = tmp_path / "q"
    done = convert(str(source), out, quantize=True, **options)
    group = options.get("q_group_size", 64)
    expected = {f"blocks.{i}.{name}": bits(i, name) for i in range(3) for name in LINEARS}
    assert {path: q["bits"] for path, q in done.quantized.items()} == expected

    tensors = stored(out)
    floats = dict(tree_flatten(float_model.parameters()))
    for path, b in expected.items():  # each packed weight is MLX's own quantization of the float one
        packed = mx.quantize(floats[f"{path}.weight"], group_size=group, bits=b)
        for name, value in zip(("weight", "scales", "biases"), packed, strict=True):
            assert mx.array_equal(tensors[f"{path}.{name}"], value), f"{path}.{name}"
    float_keys = {k for k in tensors if not k.endswith((".scales", ".biases")) and k[:-7] not in expected}
    assert float_keys == {k for k in floats if k[: -len(".weight")] not in expected}
    assert all(tensors[k].dtype == mx.float32 for k in float_keys)  # conv, norms, positions stay float

    q = json.loads((out / "config.json").read_text())["quantization"]
    defaults = {"group_size": group, "bits": options.get("q_bits", 4), "mode": "affine"}
    if "quant_predicate" in options:  # mlx-lm's record: per-layer entries beside the defaults
        assert q == {
            **defaults,
            **{p: {"group_size": group, "bits": b, "mode": "affine"} for p, b in expected.items()},
        }
    else:
        assert q == defaults

    model, _ = aim_mlx.load(str(out))
    assert sum(isinstance(m, quantized.QuantizedLinear) for m in model.modules()) == len(expected)
    ours = np.asarray(model.encode_image(pixels))
    ref = np.asarray(float_model.encode_image(pixels))
    assert cosine(ours, ref).min() >= target
    assert not np.array_equal(ours, ref)  # quantization did change the weights


def test_lit_checkpoint_converts_with_its_head_and_projections_quantized(pixels, tmp_path):
    # A text MLP width that group size 32 divides; the vision tower's (352) takes 32 too.
    source = write_lit_checkpoint(
        make_lit_reference(seed=9, text=dict(intermediate_size=192)), tmp_path / "s"
    )
    reference, _ = aim_mlx.load(str(source))
    texts = ["a photo of a cat", "A DOG, running fast!"]
    ref_image, ref_text = np.asarray(reference.encode_image(pixels)), np.asarray(reference.encode_text(texts))

    convert(str(source), tmp_path / "f32")
    done = convert(str(source), tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    heads = {"image_encoder.head.k", "image_encoder.head.v", "image_encoder.head.linear"}
    towers = ("image_encoder", "text_encoder")
    trunks = {f"{tower}.blocks.{i}.{name}" for tower in towers for i in range(2) for name in LINEARS}
    assert set(done.quantized) == heads | {"image_projector", "text_projector"} | trunks
    assert {"vocab.json", "merges.txt", "preprocessor_config.json"} <= entries(tmp_path / "q8")
    card = (tmp_path / "q8" / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card and "aim-mlx classify" in card

    for folder, exact in (("f32", True), ("q8", False)):
        model, _ = aim_mlx.load(str(tmp_path / folder))
        image, text = np.asarray(model.encode_image(pixels)), np.asarray(model.encode_text(texts))
        if exact:
            np.testing.assert_array_equal(image, ref_image)
            np.testing.assert_array_equal(text, ref_text)
        else:
            assert cosine(image, ref_image).min() >= 0.999 and cosine(text, ref_text).min() >= 0.999
            assert not np.array_equal(image, ref_image)


@pytest.mark.parametrize("layout", ["hf", "apple"])
@pytest.mark.parametrize("options", [dict(dtype="float16"), dict(quantize=True)])
def test_conversion_peak_memory_stays_under_1_5x_the_source(layout, options, tmp_path):
    """The issue's bound (AIMv2-L: < 1.5x the float32 checkpoint) on a 13 MB model; MLX counts every buffer
    it allocates, so holding the source plus a full copy (2x) or casting all at once (1.5x+) fails."""
    ref = make_reference(seed=1, image_size=SIZE, **{**DIMS, "hidden_size": 256, "intermediate_size": 768})
    source = write_checkpoint(ref, tmp_path / "src", layout)
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    mx.clear_cache()
    mx.reset_peak_memory()
    held = mx.get_active_memory()  # what earlier tests keep alive (models, fixtures), not the conversion
    convert(str(source), tmp_path / "out", **options)
    assert mx.get_peak_memory() - held < 1.5 * source_bytes


def test_quantized_linear_weights_take_a_fifth_of_the_memory(source, float_model, tmp_path):
    out = tmp_path / "q4"
    convert(str(source), out, quantize=True)
    model, _ = aim_mlx.load(str(out))

    def linear_bytes(m):
        return sum(
            v.nbytes for k, v in tree_flatten(m.parameters()) if any(f".{name}." in k for name in LINEARS)
        )

    # 4 bits plus a scale and a bias per 64 weights, in the dtype loaded (float32: 5/32 of float32's bytes).
    scale_bits = {"float32": 32, "float16": 16, "bfloat16": 16}[model.info.dtype]
    expected = (4 + 2 * scale_bits / 64) / 32
    assert linear_bytes(model) / linear_bytes(float_model) == pytest.approx(expected, rel=1e-3)


def test_mixed_4_6_recipe_follows_mlx_lms_rule(source, tmp_path):
    done = convert(str(source), tmp_path / "q", quantize=True, quant_predicate="mixed_4_6")
    wide = {path for path, q in done.quantized.items() if q["bits"] == 6}
    # three blocks: the last eighth is block 2, and block 2 is also the first "every third" block
    assert wide == {"blocks.2.attn.proj", "blocks.2.mlp.fc2"}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_dequantize_path_matches_mlx_quantized_matmul(bits, group_size, bias):
    linear = nn.Linear(256, 96, bias=bias)
    if bias:
        linear.bias = mx.random.normal((96,), key=mx.random.key(1))
    x = mx.random.normal((3, 17, 256), key=mx.random.key(2))
    ours = quantized.QuantizedLinear.from_linear(linear, group_size, bits)
    theirs = nn.QuantizedLinear.from_linear(linear, group_size, bits)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(theirs(x)), rtol=1e-4, atol=1e-5)


def test_gpu_path_is_mlx_quantized_matmul(monkeypatch):
    linear = nn.Linear(128, 64, bias=True)
    x = mx.random.normal((5, 128), key=mx.random.key(3))
    ours = quantized.QuantizedLinear.from_linear(linear, 64, 4)
    theirs = nn.QuantizedLinear.from_linear(linear, 64, 4)
    kernel, calls = mx.quantized_matmul, []
    monkeypatch.setattr(mx, "quantized_matmul", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ours(x)
    assert calls == []  # the CPU path unpacks the weight instead
    monkeypatch.setattr(quantized.mx, "default_device", lambda: mx.gpu)
    assert np.array_equal(np.asarray(ours(x)), np.asarray(theirs(x)))  # the same kernel, bit for bit
    assert len(calls) == 2  # ours, then theirs


# --- the folder ---------------------------------------------------------------------------------------


def test_converted_folder_has_normal_permissions(source, tmp_path):
    """What lands is the user's, not the staging folder's private 0700 (mkdtemp's)."""
    old = os.umask(0o022)
    try:
        convert(str(source), tmp_path / "out")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o077 == 0o055
    assert all(p.stat().st_mode & 0o077 == 0o044 for p in out.iterdir())


def test_written_names_are_the_checkpoint_names_aim_mlx_reads():
    assert fnmatch.fnmatch(convert_module.SHARD_NAME.format(1, 2), names.SHARD_PATTERN)
    assert convert_module.WEIGHTS_FILE in names.SAFETENSORS_FILES
    assert set(convert_module.COPIED_FILES) == {names.PREPROCESSOR_FILE, *names.TOKENIZER_FILES}


def test_sharded_weights_with_an_index(source, float_model, pixels, tmp_path):
    out = tmp_path / "sharded"
    limit = 200_000
    done = convert(str(source), out, max_shard_bytes=limit)
    assert len(done.files) > 2 and done.files[0] == f"model-00001-of-{len(done.files):05d}.safetensors"
    assert "model.safetensors" not in entries(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    keys = set()
    for name in done.files:
        tensors, metadata = mx.load(str(out / name), return_metadata=True)
        assert metadata == {"format": "mlx"}
        assert len(tensors) == 1 or sum(v.nbytes for v in tensors.values()) <= limit
        assert all(index["weight_map"][k] == name for k in tensors)
        keys |= tensors.keys()
    assert keys == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(v.nbytes for _, v in tree_flatten(float_model.parameters()))
    np.testing.assert_array_equal(outputs(out, pixels), outputs(source, pixels))


def test_config_card_and_copied_files_from_a_hub_id(source, cache, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for p in source.iterdir():
        (repo / p.name).write_bytes(p.read_bytes())
    processor = ImageProcessor.clip(SIZE).to_dict() | {"crop_pct": 0.875}
    (repo / "preprocessor_config.json").write_text(json.dumps(processor))
    (repo / "vocab.json").write_text('{"a": 0}')
    add_folder(cache, "tester/tiny-aimv2", COMMIT, repo)

    out = tmp_path / "out"
    done = convert("tester/tiny-aimv2", out, quantize=True, quant_predicate="mixed_4_8")
    assert (done.source, done.revision) == ("tester/tiny-aimv2", COMMIT)
    for name in ("preprocessor_config.json", "vocab.json"):
        assert (out / name).read_bytes() == (repo / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((repo / "config.json").read_text())
    assert config["source_model"] == "tester/tiny-aimv2" and config["source_revision"] == COMMIT
    assert config["quantization_config"] == config["quantization"]
    assert {k: config[k] for k in source_config if k != "dtype"} == {
        k: v for k, v in source_config.items() if k != "dtype"
    }
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: mlx" in front and "base_model: tester/tiny-aimv2" in front
    assert (
        f"aim-mlx convert --hf-path tester/tiny-aimv2 --revision {COMMIT} --mlx-path out --dtype float32 "
        "-q --q-bits 4 --q-group-size 64 --quant-predicate mixed_4_8" in card
    )
    assert "aim-mlx embed photo.jpg --model out" in card
    assert 'aim_mlx.load("out")' in card


def test_preprocessor_config_written_when_the_source_has_none(source, tmp_path):
    out = tmp_path / "out"
    convert(str(source), out)
    _, processor = aim_mlx.load(str(out))
    assert processor == ImageProcessor.clip(SIZE)


# --- refusals and atomicity ---------------------------------------------------------------------------


def test_existing_output_is_refused_and_force_replaces_it(source, pixels, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists.*--force"):
        convert(str(source), out)
    assert entries(out) == {"keep.txt"}
    convert(str(source), out, force=True, quantize=True)
    assert "keep.txt" not in entries(out) and (out / "model.safetensors").is_file()
    assert entries(tmp_path) == {"out"}
    assert outputs(out, pixels).shape == (2, 16, DIMS["hidden_size"])


def test_output_that_is_a_file_is_refused(source, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        convert(str(source), out, force=True)
    assert out.read_text() == "x"


def test_a_failure_while_writing_leaves_the_old_output_and_no_staging(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(str(source), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr("aim_mlx.convert.convert.model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        convert(str(source), out, force=True, quantize=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert entries(tmp_path) == {"out"}


def copy_of(source, folder):
    folder.mkdir()
    for p in source.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def test_truncated_source_is_refused_and_nothing_is_written(source, tmp_path):
    bad = copy_of(source, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        convert(str(bad), tmp_path / "out")
    assert entries(tmp_path) == {"bad"}


def test_config_that_does_not_match_the_weights_is_refused(source, tmp_path):
    bad = copy_of(source, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 4}))
    with pytest.raises(WeightsError, match="does not match config.json.*missing: blocks.3"):
        convert(str(bad), tmp_path / "out")
    assert entries(tmp_path) == {"bad"}


def test_unknown_model_id_is_refused(cache, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such/model"):
        convert("no-such/model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_group_size_that_does_not_divide_a_layer_is_refused(tmp_path):
    # The real large family's MLP (2816) takes every group size; this stand-in's 352 only takes 32.
    src = write_checkpoint(make_reference(seed=32, image_size=SIZE, **TINY["large"]), tmp_path / "src")
    with pytest.raises(
        ConfigError, match=r"group size 64 does not divide the 352 inputs of blocks\.0\.mlp\.fc2; use 32"
    ):
        convert(str(src), tmp_path / "out", quantize=True)
    assert entries(tmp_path) == {"src"}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(quantize=True, q_bits=3), "--q-bits 3 is not supported; use 4 or 8"),
        (dict(quantize=True, q_group_size=48), "--q-group-size 48 is not supported"),
        (
            dict(quantize=True, quant_predicate="mixed_9"),
            "unknown quantization recipe 'mixed_9'; choose one of",
        ),
        (dict(quant_predicate="mixed_4_8"), "only applies when quantizing; add -q"),
        (dict(q_bits=8), "^--q-bits 8 only applies when quantizing; add -q/--quantize$"),
        (dict(q_bits=4), "^--q-bits 4 only applies"),  # the default value counts once given
        (dict(q_group_size=32), "^--q-group-size 32 only applies when quantizing; add -q/--quantize$"),
        (dict(quantize=False, quant_predicate="ends_4_8"), "^--quant-predicate ends_4_8 only applies"),
        (dict(dtype="float64"), "unknown dtype 'float64'"),
    ],
)
def test_bad_options_are_refused_before_reading_anything(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        convert(str(tmp_path / "not-read"), tmp_path / "out", **options)
    assert entries(tmp_path) == set()


def test_quantizing_defaults_to_4_bits_in_groups_of_64(source, tmp_path):
    done = convert(str(source), tmp_path / "q", quantize=True, q_bits=None, q_group_size=None)
    expected = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert done.quantized and all(q == expected for q in done.quantized.values())
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == expected


def test_an_already_quantized_source_is_refused(source, tmp_path):
    convert(str(source), tmp_path / "q", quantize=True)
    with pytest.raises(ConfigError, match="already quantized"):
        convert(str(tmp_path / "q"), tmp_path / "again", quantize=True)


def test_a_bad_quantization_block_is_a_config_error(source, tmp_path):
    out = tmp_path / "q"
    convert(str(source), out, quantize=True)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"quantization": {"group_size": 64, "bits": 7}}))
    with pytest.raises(ConfigError, match="7 bits is not supported"):
        aim_mlx.load(str(out))


# --- the command line ---------------------------------------------------------------------------------


def test_cli_converts_and_the_folder_embeds(source, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["convert", "--hf-path", str(source), "--mlx-path", str(out), "-q", "--q-bits", "8"]
    )
    assert result.exit_code == 0, result.output
    assert f"source:     {source.resolve()}" in result.stdout
    assert "quantized:  15 Linear layers: 15 at 8 bits (group size 64)" in result.stdout
    assert " MB -> " in result.stdout
    photo = tmp_path / "coffee.png"
    Image.fromarray(skimage.data.coffee()).save(photo)
    result = runner.invoke(app, ["embed", str(photo), "--model", str(out), "-o", str(tmp_path / "e.npy")])
    assert result.exit_code == 0, result.output
    model, processor = aim_mlx.load(str(out))
    np.testing.assert_allclose(
        np.load(tmp_path / "e.npy"), np.asarray(model.encode_image(processor([photo]))), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["-q", "--q-bits", "3"], "Invalid value for '--q-bits'", 2),  # a choice: a usage error
        (["-q", "--q-group-size", "48"], "Invalid value for '--q-group-size'", 2),
        (["-q", "--quant-predicate", "nope"], "Invalid value for '--quant-predicate'", 2),
        (["--q-bits", "8"], "--q-bits 8 only applies when quantizing; add -q/--quantize", 1),
        (["--force"], "is a file", 1),
    ],
)
def test_cli_errors_are_one_line(source, tmp_path, args, message, code):
    """Our errors exit 1, usage errors 2; either is one `error:` line (a usage error adds where help is)."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" if "--force" in args else tmp_path / "out"
    result = runner.invoke(app, ["convert", "--hf-path", str(source), "--mlx-path", str(out), *args])
    assert result.exit_code == code
    assert result.stderr.startswith("error: ") and message in result.stderr.splitlines()[0]
    extra = result.stderr.strip().splitlines()[1:]
    assert extra == ([] if code == 1 else ["Try 'aim-mlx convert -h' for help."])
    assert entries(tmp_path) == {"file"}
