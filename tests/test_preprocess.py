"""Preprocessing: parity with transformers' PIL CLIP processor on real photos, odd formats, bad files."""

import math

import mlx.core as mx
import numpy as np
import pytest
import skimage.data
from PIL import Image
from transformers import CLIPImageProcessorPil

from aim_mlx.checkpoints.variants import IMAGENET_MEAN, IMAGENET_STD, find_variant
from aim_mlx.errors import ConfigError, ImageError
from aim_mlx.inputs.images import find_images, load_image
from aim_mlx.inputs.preprocess import ImageProcessor, native_size

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field"]  # camera is greyscale


@pytest.fixture(scope="module")
def photos():
    return {name: Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS}


def reference(config: dict, image: Image.Image) -> np.ndarray:
    return CLIPImageProcessorPil(**config)(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


@pytest.mark.parametrize("model_id", ["apple/aimv2-large-patch14-224", "apple/aimv2-huge-patch14-336"])
def test_matches_transformers_on_photos(photos, model_id):
    config = find_variant(model_id).preprocessor_config()
    processor = ImageProcessor.from_dict(config)
    for name, image in photos.items():
        ours = processor.preprocess_one(image)
        ref = reference(config, image)
        assert ours.shape == ref.shape, name
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0, err_msg=name)


def test_imagenet_option_matches_transformers_with_the_same_recipe(photos):
    config = {
        "size": {"shortest_edge": 256},
        "crop_size": {"height": 224, "width": 224},
        "resample": 3,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    processor = ImageProcessor.imagenet(224)
    for name, image in photos.items():
        np.testing.assert_allclose(
            processor.preprocess_one(image), reference(config, image), atol=1e-5, err_msg=name
        )


def test_small_images_are_padded_like_transformers():
    image = Image.fromarray(skimage.data.astronaut()).resize((100, 60))
    config = {"size": {"height": 50, "width": 80}, "crop_size": {"height": 64, "width": 96}}
    processor = ImageProcessor.from_dict(config)
    np.testing.assert_allclose(processor.preprocess_one(image), reference(config, image), atol=1e-5)


def test_to_dict_round_trips(photos):
    processor = ImageProcessor.from_dict(find_variant("apple/aimv2-large-patch14-448").preprocessor_config())
    again = ImageProcessor.from_dict(processor.to_dict())
    image = photos["coffee"]
    np.testing.assert_array_equal(again.preprocess_one(image), processor.preprocess_one(image))


@pytest.mark.parametrize(
    "size", [(640, 480), (480, 640), (20, 20), (10000, 10), (10, 10000), (8000, 6000), (155, 99), (1, 1)]
)
def test_native_size_policy(size):
    width, height = size
    new_w, new_h = native_size(width, height)
    assert new_w % 14 == 0 and new_h % 14 == 0
    assert 112 <= (new_w // 14) * (new_h // 14) <= 4096
    if min(new_w, new_h) > 14 * 4:  # aspect ratio kept up to whole patches
        assert abs(math.log((new_w / new_h) / (width / height))) < 0.1


def test_native_keeps_grids_that_already_fit(photos):
    image = photos["astronaut"].resize((14 * 20, 14 * 12))
    config = find_variant("apple/aimv2-large-patch14-native").preprocessor_config()
    processor = ImageProcessor.from_dict(config, native=True)
    ours = processor.preprocess_one(image)
    assert ours.shape == (14 * 12, 14 * 20, 3)
    np.testing.assert_allclose(ours, reference(config, image), atol=1e-5)
    coffee = processor.preprocess_one(
        photos["coffee"]
    )  # 600x400: 600/14 = 42.9 and 400/14 = 28.6 round to 43x29
    assert coffee.shape == (29 * 14, 43 * 14, 3)


def test_call_batches_paths_and_pil(tmp_path, photos):
    path = tmp_path / "chelsea.png"
    photos["chelsea"].save(path)
    processor = ImageProcessor.clip(224)
    batch = processor([path, photos["rocket"], str(path)])
    assert isinstance(batch, mx.array) and batch.dtype == mx.float32 and batch.shape == (3, 224, 224, 3)
    np.testing.assert_array_equal(np.asarray(batch[0]), np.asarray(batch[2]))
    assert processor(photos["rocket"]).shape == (1, 224, 224, 3)
    native = ImageProcessor.clip(224, native=True)
    with pytest.raises(ConfigError, match="one at a time"):
        native([photos["coffee"], photos["astronaut"]])


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="size"):
        ImageProcessor.from_dict({"size": {"longest": 3}, "crop_size": 224})
    with pytest.raises(ConfigError, match="resample"):
        ImageProcessor.from_dict({"size": 224, "crop_size": 224, "resample": 99})


# --- odd formats -------------------------------------------------------------------------------------------


def test_modes_become_rgb(tmp_path):
    rgb = np.asarray(Image.fromarray(skimage.data.coffee()).resize((64, 48)))
    grey = rgb.mean(axis=2).astype(np.uint8)
    cases = {
        "grey.png": Image.fromarray(grey),
        "bilevel.png": Image.fromarray(grey).convert("1"),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "la.png": Image.fromarray(grey).convert("LA"),
        "rgba.png": Image.fromarray(rgb).convert("RGBA"),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        loaded = load_image(tmp_path / name)
        assert loaded.mode == "RGB" and loaded.size == (64, 48), name
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "grey.png"))[..., 1], grey)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "rgba.png")), rgb)


def test_transparency_is_composited_on_white(tmp_path):
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[..., 0] = 200  # red, fully transparent on the left half, half transparent on the right
    pixels[:, 4:, 3] = 128
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png")).astype(int)
    assert (out[:, :4] == 255).all()
    expected_g = round(255 * (1 - 128 / 255))
    assert abs(out[0, 6, 0] - round(200 * 128 / 255 + 255 * (1 - 128 / 255))) <= 1
    assert abs(out[0, 6, 1] - expected_g) <= 1
    indices = np.zeros((8, 8), np.uint8)
    indices[:, 4:] = 1
    palette = Image.fromarray(indices, "P")
    palette.putpalette([0, 0, 0, 200, 0, 0])
    palette.save(tmp_path / "p.png", transparency=0)  # index 0 transparent, index 1 opaque red
    out = np.asarray(load_image(tmp_path / "p.png"))
    assert (out[:, :4] == 255).all() and (out[:, 4:] == [200, 0, 0]).all()


def test_16_bit_grey_is_scaled(tmp_path):
    values = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    out = np.asarray(load_image(tmp_path / "deep.png"))
    assert out.dtype == np.uint8 and out.shape == (32, 64, 3)
    np.testing.assert_allclose(out[..., 0], values / 257, atol=0.5 + 1e-9)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(tmp_path / "rotated.jpg"))
    assert upright.shape == (40, 20, 3)
    assert upright[:15].mean() > 200 and upright[25:].mean() < 50  # the white half is now on top


# --- bad files ---------------------------------------------------------------------------------------------


def test_bad_files_raise_one_line_errors(tmp_path):
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image\n")
    cases = {
        "missing.jpg": "no such file",
        "empty.png": "empty",
        "notes.jpg": "not an image",
        "truncated.jpg": "truncated",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageError, match=reason) as info:
            load_image(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


# Over the limit Pillow warns, over twice the limit it raises: both are refused.
@pytest.mark.parametrize("factor", [1.5, 3])
def test_decompression_bombs_are_refused(tmp_path, monkeypatch, factor):
    Image.new("L", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(100 * 100 / factor))
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(Image.new("L", (100, 100)))


def test_find_images_walks_folders_in_order(tmp_path):
    for rel in ["b/2.png", "b/1.jpg", "a.jpeg", "c/.hidden.png", ".cache/x.png", "b/readme.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    explicit = tmp_path / "b" / "readme.txt"
    found = find_images([explicit, tmp_path, tmp_path / "missing.png"])
    rel = [str(p.relative_to(tmp_path)) for p in found]
    assert rel == ["b/readme.txt", "a.jpeg", "b/1.jpg", "b/2.png", "missing.png"]
