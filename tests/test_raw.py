"""RAW photos (inputs/raw.py) and what photos say about themselves (inputs/metadata.py), on DNGs written at
test time from scikit-image photos (tests/media.py): the embedded preview against Pillow's decoding of the
JPEG put there, the demosaic against the photo the mosaic was sampled from, orientation, capture time and
camera, bad files, the missing extra, and `aim-mlx embed photo.dng`."""

import sys
from datetime import datetime
from io import BytesIO

import numpy as np
import pytest
import skimage.data
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from media import jpeg_bytes, write_dng
from PIL import Image
from typer.testing import CliRunner

import aim_mlx
from aim_mlx.cli import app
from aim_mlx.errors import ImageError
from aim_mlx.inputs import metadata, raw
from aim_mlx.inputs.images import find_images, load_image
from aim_mlx.inputs.metadata import Metadata, read_metadata

ASTRONAUT = skimage.data.astronaut()  # (512, 512, 3): the sensor's photo
CHELSEA = skimage.data.chelsea()  # (300, 451, 3): the preview's, so that one cannot pass for the other


def half(photo: np.ndarray) -> np.ndarray:
    """The photo at half size, each 2x2 block averaged: what a half-size demosaic sees."""
    return np.asarray(Image.fromarray(photo).reduce(2), np.float64)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


@pytest.fixture(scope="module")
def dngs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    preview = jpeg_bytes(CHELSEA)
    return {
        "plain": write_dng(folder / "plain.dng", ASTRONAUT),
        "preview": write_dng(folder / "preview.dng", ASTRONAUT, preview=preview),
        "rotated": write_dng(folder / "rotated.dng", ASTRONAUT, preview=preview, orientation=6),
        "rotated-plain": write_dng(folder / "rotated-plain.dng", ASTRONAUT, orientation=6),
        # 120 px on its long side: below half the sensor's 512, so not worth using
        "thumbnail": write_dng(
            folder / "thumbnail.dng", ASTRONAUT, preview=jpeg_bytes(CHELSEA[::4, ::4].copy())
        ),
        "jpeg": preview,
    }


def test_the_embedded_preview_is_what_pillow_decodes_from_the_jpeg_put_there(dngs):
    got = np.asarray(load_image(dngs["preview"]))
    with Image.open(BytesIO(dngs["jpeg"])) as jpeg:
        expected = np.asarray(jpeg.convert("RGB"))
    np.testing.assert_array_equal(got, expected)


def test_an_uncompressed_preview_is_used_as_it_is_and_turned_upright(tmp_path):
    path = write_dng(tmp_path / "bitmap.dng", ASTRONAUT, preview=CHELSEA)
    np.testing.assert_array_equal(np.asarray(load_image(path)), CHELSEA)
    turned = write_dng(tmp_path / "turned.dng", ASTRONAUT, preview=CHELSEA, orientation=6)
    np.testing.assert_array_equal(np.asarray(load_image(turned)), np.rot90(CHELSEA, k=-1))


def test_without_a_preview_the_mosaic_is_demosaiced_at_half_size(dngs):
    got = np.asarray(load_image(dngs["plain"]))
    assert got.shape == (256, 256, 3)
    expected = half(ASTRONAUT)
    for channel in range(3):  # each channel, not only the brightness
        assert correlation(got[..., channel], expected[..., channel]) > 0.97
    other = np.stack([skimage.data.camera()] * 3, axis=-1)  # (512, 512, 3) as well
    assert abs(correlation(got, half(other))) < 0.5  # not just any photo's


def test_a_preview_too_small_to_use_is_passed_over_for_the_demosaic(dngs):
    got = np.asarray(load_image(dngs["thumbnail"]))
    assert got.shape == (256, 256, 3) and correlation(got, half(ASTRONAUT)) > 0.97


def test_the_orientation_is_applied_on_both_paths(dngs):
    # EXIF orientation 6: the camera was turned a quarter clockwise; upright is the stored image turned so
    upright = np.asarray(load_image(dngs["rotated"]))
    np.testing.assert_array_equal(upright, np.rot90(np.asarray(load_image(dngs["preview"])), k=-1))
    demosaiced = np.asarray(load_image(dngs["rotated-plain"]))
    assert correlation(demosaiced, np.rot90(half(ASTRONAUT), k=-1)) > 0.97


def test_capture_time_and_camera_of_a_raw_file(dngs, monkeypatch):
    expected = Metadata(datetime(2021, 7, 4, 9, 30, 15), None, None, "Acme R1")
    assert read_metadata(dngs["plain"]) == expected
    assert read_metadata(dngs["preview"]) == expected
    # without exifread (as for CR3 and RAF, which are not TIFF-based): the preview's EXIF, else LibRaw's
    # own reading of the time (the camera then unknown)
    real = metadata.optional
    monkeypatch.setattr(metadata, "optional", lambda name: None if name == "exifread" else real(name))
    assert read_metadata(dngs["preview"]) == expected
    assert read_metadata(dngs["plain"]) == Metadata(datetime(2021, 7, 4, 9, 30, 15))


def exif(taken: str, lat: tuple, lat_ref: str, lon: tuple, lon_ref: str) -> Image.Exif:
    found = Image.Exif()
    found[271], found[272] = "Canon", "Canon EOS R5"
    found.get_ifd(0x8769)[36867] = taken
    gps = found.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = lat_ref, lat, lon_ref, lon
    return found


@pytest.mark.parametrize("suffix", [".jpg", ".heic"])
def test_capture_time_place_and_camera_of_a_jpeg_and_a_heic(tmp_path, suffix):
    if suffix == ".heic":
        import pillow_heif

        pillow_heif.register_heif_opener()
    path = tmp_path / f"photo{suffix}"
    tags = exif("2023:06:14 18:30:05", (48.0, 51.0, 29.6), "N", (2.0, 17.0, 40.2), "W")
    Image.fromarray(CHELSEA).save(path, exif=tags.tobytes())
    found = read_metadata(path)
    assert found.taken == datetime(2023, 6, 14, 18, 30, 5)
    assert found.latitude == pytest.approx(48 + 51 / 60 + 29.6 / 3600)  # degrees + minutes + seconds
    assert found.longitude == pytest.approx(-(2 + 17 / 60 + 40.2 / 3600))  # west is negative
    assert found.camera == "Canon EOS R5"  # the make once


def test_files_that_do_not_say_give_empty_fields_never_the_mtime(tmp_path):
    Image.fromarray(CHELSEA).save(tmp_path / "plain.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert read_metadata(tmp_path / "plain.png") == Metadata()
    assert read_metadata(tmp_path / "broken.jpg") == Metadata()
    assert read_metadata(tmp_path / "missing.dng") == Metadata()


def test_a_corrupt_or_truncated_raw_is_one_line_naming_it(dngs, tmp_path):
    (tmp_path / "noise.nef").write_bytes(np.random.default_rng(0).bytes(4096))
    data = dngs["plain"].read_bytes()
    (tmp_path / "cut.dng").write_bytes(data[:300])  # the header, cut inside its tags
    for name in ("noise.nef", "cut.dng"):
        with pytest.raises(ImageError, match=rf"^{tmp_path / name}: not a RAW file LibRaw can read") as err:
            load_image(tmp_path / name)
        assert "\n" not in str(err.value)


def test_without_rawpy_a_raw_file_names_the_extra(dngs, monkeypatch):
    monkeypatch.setitem(sys.modules, "rawpy", None)  # import rawpy now fails as if it were not installed
    with pytest.raises(ImageError, match=r"plain.dng: reading RAW photos needs rawpy; .*aim-mlx\[raw\]"):
        load_image(dngs["plain"])


def test_folders_are_walked_for_raw_files(dngs):
    assert dngs["plain"] in find_images([dngs["plain"].parent])
    assert {".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"} == raw.RAW_SUFFIXES


def test_embed_reads_raw_files_and_skips_a_bad_one(dngs, tmp_path):
    folder = tmp_path / "tiny"
    write_checkpoint(make_reference(seed=3, image_size=56, **TINY["large"]), folder, layout="hf")
    write_processor(folder)
    (tmp_path / "bad.cr2").write_bytes(b"II*\x00 this is no raw file")
    out = tmp_path / "e.npz"
    args = ["embed", dngs["plain"], tmp_path / "bad.cr2", dngs["preview"], "-m", folder, "-o", out]
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 3, result.output  # some skipped, the rest written
    assert f"skipped {tmp_path / 'bad.cr2'}: not a RAW file LibRaw can read" in result.stderr
    written = np.load(out)
    assert list(written["paths"]) == [str(dngs["plain"]), str(dngs["preview"])]
    model, processor = aim_mlx.load(str(folder))
    expected = [np.asarray(model.encode_image(processor([load_image(p)]))[0]) for p in written["paths"]]
    np.testing.assert_allclose(written["embeddings"], np.stack(expected), rtol=1e-4, atol=1e-5)
