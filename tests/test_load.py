"""aim_mlx.load(): local folders in each layout, dtypes, native detection, the processor, hub ids offline."""

import json
import logging

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TINY, make_reference, reference_outputs, write_checkpoint
from fakehub import add_folder
from mlx.utils import tree_flatten
from PIL import Image
from transformers import CLIPImageProcessorPil

import aim_mlx
from aim_mlx.checkpoints import hub
from aim_mlx.checkpoints.variants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from aim_mlx.errors import ConfigError, ModelNotFoundError
from aim_mlx.loading import DTYPES, default_dtype

DIMS = TINY["large"]
SIZE = 56  # a 4x4 patch grid
LAYOUTS = ("hf", "apple", "mlx")
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours.astype(mx.float32)) if isinstance(ours, mx.array) else ours
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def ref():
    return make_reference(seed=21, image_size=SIZE, **DIMS)


@pytest.fixture(scope="module")
def native_ref():
    return make_reference(seed=22, is_native=True, **DIMS)


@pytest.fixture(scope="module")
def folders(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {layout: write_checkpoint(ref, root / layout, layout) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)


def photo(width: int = 90, height: int = 130, seed: int = 0) -> Image.Image:
    """A smooth colour image (gradients plus noise), so that resampling matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin((x + y) / 9)], axis=-1)
    noisy = rgb + rng.normal(0, 12, rgb.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def dtypes(model) -> set:
    return {v.dtype for _, v in tree_flatten(model.parameters())}


# --- local folders in the three published layouts ------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_matches_the_transformers_reference(ref, folders, pixels, layout, backend):
    model, _ = aim_mlx.load(str(folders[layout]), dtype="float32")
    assert not model.config.is_native
    assert dtypes(model) == {mx.float32}
    expected = reference_outputs(ref, pixels)["last_hidden_state"]
    x = mx.array(pixels)
    out = model(x)
    assert out.last_hidden_state.shape == expected.shape == (2, (SIZE // 14) ** 2, DIMS["hidden_size"])
    assert rel_err(out.last_hidden_state, expected) < 1e-4
    assert rel_err(out.pooler_output, expected.mean(axis=1)) < 1e-4
    assert rel_err(model.encode_image(x), expected.mean(axis=1)) < 1e-4


def test_the_three_layouts_give_identical_outputs(folders, pixels):
    x = mx.array(pixels)
    outs = [aim_mlx.load(str(folders[layout]), dtype="float32")[0](x) for layout in LAYOUTS]
    for out in outs[1:]:
        assert mx.array_equal(out.last_hidden_state, outs[0].last_hidden_state)
        assert mx.array_equal(out.pooler_output, outs[0].pooler_output)


def test_path_forms(folders, monkeypatch):
    """A Path-like string, a relative path and `~` all name the same folder."""
    folder = folders["hf"]
    monkeypatch.chdir(folder.parent)
    monkeypatch.setenv("HOME", str(folder.parent))
    for spelling in (str(folder), "./hf", "hf", "~/hf"):
        model, _ = aim_mlx.load(spelling, dtype="float32")
        assert model.config.hidden_size == DIMS["hidden_size"]


# --- dtypes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 3e-2), ("float16", 1e-2)])
def test_low_precision_dtypes(folders, pixels, dtype, tol):
    full, _ = aim_mlx.load(str(folders["apple"]), dtype="float32")
    half, _ = aim_mlx.load(str(folders["apple"]), dtype=dtype)
    assert dtypes(half) == {getattr(mx, dtype)}
    x = mx.array(pixels)  # float32 pixels: the model casts them
    expected, out = full(x), half(x)
    assert out.last_hidden_state.dtype == getattr(mx, dtype)
    err = rel_err(out.last_hidden_state, np.asarray(expected.last_hidden_state))
    assert 0 < err < tol  # close, and really computed at the lower precision
    assert rel_err(half.encode_image(x), np.asarray(full.encode_image(x))) < tol


def test_half_precision_on_a_cpu_warns_once(folders, monkeypatch, caplog):
    from aim_mlx import log

    if mx.default_device() != mx.cpu:
        pytest.skip("the warning is for CPUs")
    monkeypatch.setattr(log, "_said", set())
    monkeypatch.delenv("AIM_MLX_DTYPE", raising=False)  # its choice is not warned about (see below)
    with caplog.at_level(logging.WARNING, logger="aim_mlx"):
        aim_mlx.load(str(folders["hf"]), dtype="float32")
        assert "slower" not in caplog.text
        aim_mlx.load(str(folders["hf"]), dtype="float16")
        aim_mlx.load(str(folders["hf"]), dtype="float16")
    warnings = [r.getMessage() for r in caplog.records if "20-30x slower" in r.getMessage()]
    assert (
        len(warnings) == 1
        and "float16 on a CPU" in warnings[0]
        and "float32 is the fast dtype" in warnings[0]
    )


def test_model_info_names_what_was_loaded(cache, folders, tmp_path):
    """info: family, source, revision (hub commit) or the local files; `key` changes with what changes the
    embeddings (the files, the dtype) and only with that."""
    add_folder(cache, "someone/tiny-aimv2", COMMIT, folders["hf"])
    hub_model, _ = aim_mlx.load("someone/tiny-aimv2", dtype="float32")
    assert (hub_model.info.family, hub_model.info.source) == ("aimv2", "someone/tiny-aimv2")
    assert hub_model.info.revision == COMMIT and hub_model.info.files == []
    local, _ = aim_mlx.load(str(folders["hf"]), dtype="float32")
    assert local.info.revision is None and local.info.source == str(folders["hf"].resolve())
    assert local.info.key == aim_mlx.load(str(folders["hf"]), dtype="float32")[0].info.key
    assert local.info.key != aim_mlx.load(str(folders["hf"]), dtype="float16")[0].info.key
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folders["hf"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    before = aim_mlx.load(str(copy), dtype="float32")[0].info.key
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")  # an edited checkpoint
    assert aim_mlx.load(str(copy), dtype="float32")[0].info.key != before
    assert local.info.backend in ("numpy", "mlx") and local.info.dims["embed_dim"] == DIMS["hidden_size"]


def test_default_dtype(folders, monkeypatch):
    """float16 on an Apple GPU, float32 on a CPU, unless AIM_MLX_DTYPE says otherwise."""
    monkeypatch.delenv("AIM_MLX_DTYPE", raising=False)
    model, _ = aim_mlx.load(str(folders["hf"]))
    expected = "float16" if mx.default_device() == mx.gpu else "float32"
    assert default_dtype() == model.info.dtype == expected and dtypes(model) == {DTYPES[expected]}


@pytest.mark.parametrize("setting, dtype", [("bfloat16", "bfloat16"), (" Float16 ", "float16"), ("", None)])
def test_aim_mlx_dtype_sets_the_default(folders, monkeypatch, caplog, setting, dtype):
    """The environment's choice, made once, is not warned about as half precision on a CPU, also when a
    caller passes it on (bench, a photo library reloading its model); another half dtype is. An explicit
    dtype wins."""
    from aim_mlx import log

    monkeypatch.setattr(log, "_said", set())
    monkeypatch.setenv("AIM_MLX_DTYPE", setting)
    expected = dtype or ("float16" if mx.default_device() == mx.gpu else "float32")  # empty: as if unset
    with caplog.at_level(logging.WARNING, logger="aim_mlx"):
        model, _ = aim_mlx.load(str(folders["hf"]))
        assert aim_mlx.load(str(folders["hf"]), dtype=expected)[0].info.dtype == expected
        assert "slower" not in caplog.text
        assert aim_mlx.load(str(folders["hf"]), dtype="float32")[0].info.dtype == "float32"
        other = "float16" if expected == "bfloat16" else "bfloat16"
        assert aim_mlx.load(str(folders["hf"]), dtype=other)[0].info.dtype == other
    assert model.info.dtype == expected and dtypes(model) == {DTYPES[expected]}
    if mx.default_device() == mx.cpu:
        assert f"{other} on a CPU runs 20-30x slower" in caplog.text


def test_a_mistyped_aim_mlx_dtype_names_the_variable_and_the_choices(folders, monkeypatch):
    monkeypatch.setenv("AIM_MLX_DTYPE", "fp16")
    with pytest.raises(ConfigError) as info:
        aim_mlx.load(str(folders["hf"]))
    assert str(info.value) == "AIM_MLX_DTYPE='fp16' is not a dtype; use float32, float16, bfloat16"
    assert aim_mlx.load(str(folders["hf"]), dtype="float32")[0].info.dtype == "float32"  # not read then


@pytest.mark.parametrize("dtype", ["int8", "fp16", "float64", "Float32"])
def test_unknown_dtype(folders, dtype):
    with pytest.raises(ConfigError) as info:
        aim_mlx.load(str(folders["hf"]), dtype=dtype)
    message = str(info.value)
    assert repr(dtype) in message
    assert all(choice in message for choice in ("float32", "float16", "bfloat16"))
    with pytest.raises(ConfigError, match="unknown dtype"):  # checked before the path is looked at
        aim_mlx.load("/no/such/folder", dtype=dtype)


# --- native-resolution detection ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["apple", "mlx", "hf"])
def test_native_checkpoint_is_detected(native_ref, tmp_path, layout):
    folder = write_checkpoint(native_ref, tmp_path, layout)
    config = json.loads((folder / "config.json").read_text())
    assert ("is_native" in config) == (layout == "hf")  # Apple's configs carry no flag
    model, processor = aim_mlx.load(str(folder), dtype="float32")
    assert model.config.is_native and processor.native
    assert "pos_embed" not in dict(tree_flatten(model.parameters()))
    hw = (70, 42)  # a 5x3 grid, not square and not the config's image_size
    x = np.random.default_rng(1).standard_normal((1, *hw, 3)).astype(np.float32)
    expected = reference_outputs(native_ref, x)["last_hidden_state"]
    out = model(mx.array(x))
    assert out.last_hidden_state.shape == (1, 15, DIMS["hidden_size"])
    assert rel_err(out.last_hidden_state, expected) < 1e-4
    assert rel_err(out.pooler_output, expected.mean(axis=1)) < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fixed_size_checkpoint_is_not_native(folders, layout):
    model, processor = aim_mlx.load(str(folders[layout]), dtype="float32")
    assert not model.config.is_native and not processor.native
    assert dict(tree_flatten(model.parameters()))["pos_embed"].shape == (
        (SIZE // 14) ** 2,
        DIMS["hidden_size"],
    )
    with pytest.raises(ValueError, match=f"takes {SIZE}x{SIZE} images"):
        model(mx.zeros((1, 70, 42, 3)))


def test_native_processor_keeps_the_aspect_ratio(native_ref, tmp_path):
    folder = write_checkpoint(native_ref, tmp_path, "apple")
    model, processor = aim_mlx.load(str(folder), dtype="float32")
    pixels = processor([photo(300, 200)])
    _, height, width, _ = pixels.shape
    assert height % 14 == 0 and width % 14 == 0
    assert (height // 14) * (width // 14) >= 112
    assert abs((width / height) / 1.5 - 1) < 0.1  # no center crop to a square
    assert model(pixels).last_hidden_state.shape == (1, (height // 14) * (width // 14), DIMS["hidden_size"])


# --- the processor --------------------------------------------------------------------------------------


def test_processor_without_preprocessor_config_is_clip_at_image_size(folders, tmp_path, caplog):
    folder = folders["apple"]
    assert not (folder / "preprocessor_config.json").exists()
    with caplog.at_level(logging.WARNING, logger="aim_mlx"):
        model, processor = aim_mlx.load(str(folder), dtype="float32")
    assert "no preprocessor_config.json" in caplog.text
    image = photo()
    clip = CLIPImageProcessorPil(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    expected = clip(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = processor.preprocess_one(image)
    assert isinstance(ours, np.ndarray) and ours.shape == (SIZE, SIZE, 3)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    path = tmp_path / "photo.png"
    image.save(path)
    batch = processor([image, str(path)])
    assert isinstance(batch, mx.array) and batch.dtype == mx.float32 and batch.shape == (2, SIZE, SIZE, 3)
    assert np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))
    assert model.encode_image(batch).shape == (2, DIMS["hidden_size"])


def test_processor_reads_the_folders_preprocessor_config(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "hf")
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 84},
        "resample": 2,
        "do_center_crop": True,
        "crop_size": {"height": 70, "width": 98},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    _, processor = aim_mlx.load(str(folder), dtype="float32")
    image = photo(160, 120)
    assert processor([image]).shape == (1, 70, 98, 3)
    expected = CLIPImageProcessorPil(**config)(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(processor.preprocess_one(image), expected.transpose(1, 2, 0), atol=1e-5)


def test_bad_preprocessor_config_is_a_config_error(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "hf")
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="preprocessor_config.json is not valid JSON"):
        aim_mlx.load(str(folder), dtype="float32")


# --- hub ids through a fake local Hugging Face cache -----------------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "apple"])
def test_hub_id_loads_offline_from_the_cache(cache, folders, pixels, layout):
    snapshot = add_folder(cache, "someone/tiny-aimv2", COMMIT, folders[layout])
    assert hub.resolve("someone/tiny-aimv2") == snapshot
    model, processor = aim_mlx.load("someone/tiny-aimv2", dtype="float32")
    local, _ = aim_mlx.load(str(folders[layout]), dtype="float32")
    x = mx.array(pixels)
    assert mx.array_equal(model(x).last_hidden_state, local(x).last_hidden_state)
    assert processor([photo()]).shape == (1, SIZE, SIZE, 3)
    again, _ = aim_mlx.load("someone/tiny-aimv2", revision=COMMIT, dtype="float32")
    assert mx.array_equal(again(x).last_hidden_state, local(x).last_hidden_state)


def test_hub_id_reads_the_native_flag_from_the_cached_checkpoint(cache, native_ref, tmp_path):
    folder = write_checkpoint(native_ref, tmp_path / "native", "apple")
    add_folder(cache, "someone/tiny-aimv2-native", COMMIT, folder)
    model, processor = aim_mlx.load("someone/tiny-aimv2-native", dtype="float32")
    assert model.config.is_native and processor.native


def test_uncached_hub_id(cache, folders):
    add_folder(cache, "someone/tiny-aimv2", COMMIT, folders["hf"])
    for model_id, revision in (("someone/not-cached", None), ("someone/tiny-aimv2", "v2")):
        with pytest.raises(ModelNotFoundError) as info:
            aim_mlx.load(model_id, revision=revision, dtype="float32")
        message = str(info.value)
        assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
        assert "pass a local folder" in message


def test_missing_folder(cache, tmp_path):
    for path in (tmp_path / "missing", "./missing-checkpoint", "~/missing-checkpoint"):
        with pytest.raises(ModelNotFoundError) as info:
            aim_mlx.load(str(path), dtype="float32")
        assert "does not exist" in str(info.value) and "pass a folder holding config.json" in str(info.value)


def test_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json, safetensors weights"):
        aim_mlx.load(str(tmp_path), dtype="float32")


def test_revision_with_a_local_folder(folders):
    with pytest.raises(ConfigError, match="only to hub ids"):
        aim_mlx.load(str(folders["hf"]), revision="main", dtype="float32")
