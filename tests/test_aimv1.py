"""AIMv1 against a torch model written from the architecture (aimv1_checkpoints.py): every block, the probed
mean, the head's features and the logits, on both backends (the MLX blocks; the numpy backend, float32 on a
CPU); probe sets; stop_early; loading from a hub cache; preprocessing; `aim-mlx classify` and `embed` end to
end; bad inputs. The numpy backend's AIMv1 parts alone: test_aimv1_numpy.py."""

import json

import mlx.core as mx
import numpy as np
import pytest
import skimage.data
import torch
from aimv1_checkpoints import TINY, make_reference, write_checkpoint
from emulation import tolerance
from fakehub import add_folder
from PIL import Image
from typer.testing import CliRunner

from aim_mlx.checkpoints import layouts, weights
from aim_mlx.checkpoints.variants import AIMV1_SIZES, PROBES, VARIANTS, aimv1_probe_layers, find_variant
from aim_mlx.cli import app
from aim_mlx.cli import common as cli
from aim_mlx.errors import ConfigError, ModelNotFoundError, WeightsError
from aim_mlx.inputs.preprocess import ImageProcessor
from aim_mlx.loading import default_dtype, load
from aim_mlx.models import aimv2
from aim_mlx.platform import blas, numpy_blocks
from aim_mlx.tasks.zeroshot import imagenet_classes

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def pixels(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture
def tiny(tmp_path):
    """A 600M-shaped tiny checkpoint (eight blocks, the last six probed) and its reference."""
    ref = make_reference(seed=3, **TINY["600M"])
    return write_checkpoint(ref, tmp_path / "tiny"), ref


@pytest.mark.parametrize("size", list(TINY))
@pytest.mark.parametrize("probe", [(2, 3, 4, 5, 6, 7), (1, 3, 4)])
def test_every_block_features_and_logits_match_the_reference(tmp_path, size, probe, backend, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CPU_WORKERS", "2")  # numpy: a batch of 2 runs in two shares, 1 in one trunk
    ref = make_reference(seed=len(size), probe_layers=probe, **TINY[size])
    model, _ = load(str(write_checkpoint(ref, tmp_path)))
    assert model.family == "aimv1" and model.info.backend == backend
    tol = tolerance(model, 1e-4)  # loaded in the default dtype: float16 where the GPU is the default device
    for shape in [(2, 28, 42, 3), (1, 56, 28, 3)]:  # non-square grids: rows and columns must not swap
        x = pixels(shape, seed=len(size))
        expected = ref.outputs(x)
        blocks = model.forward_intermediates(mx.array(x))
        assert len(blocks) == len(expected["blocks"]) == 8
        for i, (ours, theirs) in enumerate(zip(blocks, expected["blocks"], strict=True)):
            assert rel_err(ours, theirs) < tol, f"block {i}"
        final = model.forward_intermediates(mx.array(x), indices=[-1], norm=True)[0]
        assert rel_err(final, expected["final"]) < tol
        assert rel_err(model.probed(mx.array(x)), expected["probed"]) < tol
        assert rel_err(model.encode_image(mx.array(x)), expected["features"]) < tol
        assert rel_err(model.classify(mx.array(x)), expected["logits"]) < tol
        assert model(mx.array(x)).shape == (shape[0], 1000)


def test_a_config_without_probe_layers_probes_the_last_six_as_ml_aim_does(tmp_path):
    ref = make_reference(seed=4, num_blocks=9, probe_layers=range(3, 9), **TINY["1B"])
    model, _ = load(str(write_checkpoint(ref, tmp_path, probe_layers=None)))
    assert model.dims["probe_layers"] == [3, 4, 5, 6, 7, 8]
    x = pixels((1, 28, 28, 3))
    assert rel_err(model.classify(mx.array(x)), ref.outputs(x)["logits"]) < tolerance(model, 1e-4)


def test_the_probed_mean_does_not_overflow_in_float16(tmp_path):
    """A channel of ~2e4 in every block's output (each in float16's range) sums past 65504 over the six
    probed blocks: their mean must still come out (Apple GPUs run float16 by default)."""
    ref = make_reference(seed=3, **TINY["600M"])
    with torch.no_grad():
        ref.preprocessor.patchifier.norm.bias[0] = 2e4  # carried by the residual stream through every block
    model, _ = load(str(write_checkpoint(ref, tmp_path)), dtype="float16")
    x = pixels((1, 28, 28, 3))
    expected = ref.outputs(x)
    assert max(np.abs(b).max() for b in expected["blocks"]) < 65504 < 6 * np.abs(expected["probed"]).max()
    probed = model.probed(mx.array(x))
    assert probed.dtype == mx.float16 and rel_err(probed, expected["probed"]) < tolerance("float16", 0)


def test_only_the_blocks_up_to_the_highest_probed_one_run(tmp_path, monkeypatch, backend):
    """Counted on the blocks that run: the MLX blocks' calls, or the numpy backend's GELUs (one per block
    for one image)."""
    ref = make_reference(seed=5, probe_layers=(1, 3), **TINY["600M"])
    model, _ = load(str(write_checkpoint(ref, tmp_path)))
    assert model.info.backend == backend
    calls = []
    real, real_gelu = aimv2.Block.__call__, numpy_blocks._gelu
    monkeypatch.setattr(aimv2.Block, "__call__", lambda self, x: calls.append(1) or real(self, x))
    monkeypatch.setattr(numpy_blocks, "_gelu", lambda *args: calls.append(1) or real_gelu(*args))
    x = mx.array(pixels((1, 28, 28, 3)))
    mx.eval(model.classify(x))
    assert len(calls) == 4  # blocks 0-3 of 8
    calls.clear()
    mx.eval(model.forward_intermediates(x, indices=[2], stop_early=True))
    assert len(calls) == 3
    calls.clear()
    mx.eval(model.forward_intermediates(x, indices=[2]))
    assert len(calls) == 8


def test_probe_sets_are_ml_aims():
    # ml-aim aim-v1/aim/v1/constants.py LAYERS_BEST; "last" is its probe_layers=6.
    best = {"600M": range(14, 20), "1B": range(12, 18), "3B": range(12, 18), "7B": range(14, 20)}
    last = {"600M": range(18, 24), "1B": range(18, 24), "3B": range(18, 24), "7B": range(26, 32)}
    for size in AIMV1_SIZES:
        assert aimv1_probe_layers(size, "best") == tuple(best[size])
        assert aimv1_probe_layers(size, "last") == tuple(last[size])
    assert values(cli.Probe) == list(PROBES)


def values(enum) -> list[str]:
    return [member.value for member in enum]


def test_the_probe_choice_must_be_the_head_the_checkpoint_holds(tiny):
    folder, _ = tiny  # a tiny shape: only "last" (its last six blocks) has a meaning
    model, _ = load(str(folder), probe="last")
    assert model.dims["probe_layers"] == [2, 3, 4, 5, 6, 7]
    with pytest.raises(ConfigError, match="best probe layers are known for the published AIMv1 sizes only"):
        load(str(folder), probe="best")
    with pytest.raises(ConfigError, match="unknown probe 'middle'; choose best or last"):
        load(str(folder), probe="middle")


def hub_600m(tmp_path, cache, probe_layers=range(14, 20)):
    """A tiny checkpoint with the 600M's depth-relevant probe layers, cached as apple/aim-600M at main."""
    ref = make_reference(seed=6, num_blocks=20, probe_layers=probe_layers, **TINY["600M"])
    add_folder(cache, "apple/aim-600M", COMMIT, write_checkpoint(ref, tmp_path / "hub"))
    return ref


def test_loads_from_the_hub_cache_by_id_and_by_ml_aims_name(tmp_path, cache):
    ref = hub_600m(tmp_path, cache)
    x = pixels((1, 28, 28, 3))
    for name in ["apple/aim-600M", "apple/AIM-600M", "aim-600M-2B-imgs", "AIM-600M"]:
        model, processor = load(name, probe="best" if name.startswith("aim-") else None)
        assert (model.info.source, model.info.revision) == ("apple/aim-600M", COMMIT), name
        assert model.dims["probe_layers"] == list(range(14, 20))
        assert rel_err(model.classify(mx.array(x)), ref.outputs(x)["logits"]) < tolerance(model, 1e-4)
    assert processor.crop_offset == "round" and processor.image_mean == (0.485, 0.456, 0.406)
    with pytest.raises(ConfigError) as error:
        load("apple/aim-600M", probe="last")
    assert str(error.value).startswith(
        "this AIM-600M checkpoint's head reads blocks [14, 15, 16, 17, 18, 19], not the last layers "
        "[18, 19, 20, 21, 22, 23]; the hub repos hold only the best-layers heads"
    )


def test_the_variants_are_the_four_hub_repos():
    for size, (width, heads, mlp, depth) in AIMV1_SIZES.items():
        variant = VARIANTS[f"apple/aim-{size}"]
        assert find_variant(f"apple/aim-{size}") is variant and variant.family == "aimv1"
        assert variant.config_dict()["probe_layers"] == list(aimv1_probe_layers(size, "best"))
        assert (variant.dims, mlp, variant.revision) == ((width, heads, mlp, depth), 4 * width, "main")
    assert find_variant("aim-7B-5B-imgs") is VARIANTS["apple/aim-7B"]
    assert [VARIANTS[f"apple/aim-{s}"].published_top1 for s in AIMV1_SIZES] == [79.4, 82.3, 83.3, 84.0]
    assert round(VARIANTS["apple/aim-600M"].num_params / 1e6) == 679  # blocks: 24 x (4 D^2 + 8 D^2)


def test_the_hub_repos_pickle_only_weights_are_named_not_read(tmp_path, cache):
    ref = make_reference(seed=7, num_blocks=20, probe_layers=range(14, 20), **TINY["600M"])
    folder = write_checkpoint(ref, tmp_path / "published", weights="pickle")
    with pytest.raises(ModelNotFoundError, match="has no safetensors weights"):
        load(str(folder))
    with pytest.raises(
        WeightsError, match="only pickled weights .pytorch_model.bin.; aim-mlx never unpickles"
    ):
        weights.read_folder(folder)
    add_folder(cache, "apple/aim-600M", COMMIT, folder)
    with pytest.raises(ModelNotFoundError, match="publishes its weights only as pytorch_model.bin, a pickle"):
        load("apple/aim-600M")


def test_sanitize_is_safe_twice_and_takes_the_mlx_conv_layout(tiny):
    folder, ref = tiny
    state = weights.read_folder(folder)
    assert "head.bn.num_batches_tracked" in state
    once = layouts.sanitize_aimv1(state)
    assert "head.bn.num_batches_tracked" not in once and once["patch_embed.proj.weight"].shape == (
        96,
        14,
        14,
        3,
    )
    twice = layouts.sanitize_aimv1(once)
    assert twice.keys() == once.keys()
    assert all(mx.array_equal(once[k], twice[k]) for k in once)
    ohwi = dict(state)  # ml-aim's torch_weights_to_mlx: conv OHWI, no step counter
    ohwi["preprocessor.patchifier.proj.weight"] = state["preprocessor.patchifier.proj.weight"].transpose(
        0, 2, 3, 1
    )
    del ohwi["head.bn.num_batches_tracked"]
    assert mx.array_equal(
        layouts.sanitize_aimv1(ohwi)["patch_embed.proj.weight"], once["patch_embed.proj.weight"]
    )


def test_a_head_that_does_not_fit_the_backbone_is_named(tiny):
    from safetensors.torch import load_file, save_file

    folder, _ = tiny
    state = load_file(folder / "model.safetensors")
    wider = make_reference(seed=8, **TINY["1B"]).state_dict()  # a head trained on a 128-wide backbone
    state.update({k: v for k, v in wider.items() if k.startswith("head.")})
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError) as error:
        load(str(folder))
    assert "mis-shaped: head.bn.running_mean (128,) != (96,), head.bn.running_var (128,) != (96,)" in str(
        error.value
    )
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "probe_layers": [7, 8]}))
    with pytest.raises(ConfigError, match=r"probe_layers \[7, 8\] must name blocks among the 8"):
        load(str(folder))


@pytest.mark.skipif(not blas.loaded(), reason="the numpy backend needs the fast BLAS (Linux)")
def test_the_backends_agree_on_aimv1_and_half_precision_stays_on_mlx(tiny, monkeypatch):
    """float32 on the CPU takes the numpy backend by default; both backends give every block and the logits
    to float rounding on the same model; float16 runs the MLX blocks, and AIM_MLX_BACKEND=numpy says why."""
    folder, _ = tiny
    monkeypatch.delenv("AIM_MLX_BACKEND", raising=False)
    model, _ = load(str(folder), dtype="float32")
    assert model.info.backend == "numpy"
    x = mx.array(pixels((2, 28, 28, 3), seed=1))
    on_numpy = [*model.forward_intermediates(x), model.classify(x)]
    monkeypatch.setenv("AIM_MLX_BACKEND", "mlx")
    on_mlx_blocks, _ = load(str(folder), dtype="float32")
    assert on_mlx_blocks.info.backend == "mlx"
    on_mlx = [*on_mlx_blocks.forward_intermediates(x), on_mlx_blocks.classify(x)]
    for i, (a, b) in enumerate(zip(on_mlx, on_numpy, strict=True)):
        assert rel_err(a, np.asarray(b)) < 1e-5, f"output {i}"
    monkeypatch.delenv("AIM_MLX_BACKEND")
    half, _ = load(str(folder), dtype="float16")
    assert half.info.backend == "mlx"
    monkeypatch.setenv("AIM_MLX_BACKEND", "numpy")
    with pytest.raises(ConfigError) as error:
        load(str(folder), dtype="float16")
    assert str(error.value) == (
        "AIM_MLX_BACKEND=numpy cannot run this model: it computes in float32 only, not float16; unset it, "
        "or set AIM_MLX_BACKEND=mlx"
    )


# Preprocessing: ml-aim's val_transforms. torchvision is not a test dependency; when it is installed the
# transform itself is checked too.
def val_transforms_reference(image: Image.Image) -> np.ndarray:
    """ml-aim's definition done by hand: shortest side to ceil(224 / 0.875) = 256 bicubic with Pillow (long
    side truncated, as torchvision), centre crop 224 at torchvision's rounded offset, /255, ImageNet
    mean/std."""
    image = image.convert("RGB")
    w, h = image.size
    scale = 256 / min(w, h)
    size = (256, int(h * scale)) if w <= h else (int(w * scale), 256)
    if (w, h) != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = int(round((arr.shape[0] - 224) / 2.0)), int(round((arr.shape[1] - 224) / 2.0))
    arr = arr[top : top + 224, left : left + 224].astype(np.float32) / np.float32(255)
    return (arr - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def photos():
    """Real photos, and crops whose resized long side leaves an odd margin that rounds up (where torchvision's
    centre crop and a floored one differ by a pixel)."""
    images = {
        name: Image.fromarray(getattr(skimage.data, name)()) for name in ["astronaut", "coffee", "camera"]
    }
    images["coffee-599"] = Image.fromarray(skimage.data.coffee()[:, :599])  # 256 x 383: margin 159
    images["astronaut-405"] = Image.fromarray(skimage.data.astronaut()[:, :405])  # 323 x 256: margin 99
    return images


def test_preprocessing_is_ml_aims_val_transforms_on_photos(photos):
    processor = ImageProcessor.aimv1()
    for name, image in photos.items():
        np.testing.assert_allclose(
            processor.preprocess_one(image), val_transforms_reference(image), atol=2e-6, err_msg=name
        )
    floored = ImageProcessor.aimv1()
    floored.crop_offset = "floor"
    odd = [
        name
        for name, image in photos.items()
        if not np.array_equal(floored.preprocess_one(image), processor.preprocess_one(image))
    ]
    assert odd == ["coffee-599", "astronaut-405"]


def test_preprocessing_matches_torchvision_when_installed(photos):
    transforms = pytest.importorskip("torchvision.transforms")
    import math

    size = math.ceil(224 / 0.875)
    pipeline = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    processor = ImageProcessor.aimv1()
    for name, image in photos.items():
        theirs = pipeline(image.convert("RGB")).numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(processor.preprocess_one(image), theirs, atol=2e-6, err_msg=name)


# The command line, end to end on a tiny model.
@pytest.fixture
def photo_files(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.png")
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
    return sorted(folder.iterdir())


def expected_top5(ref, paths) -> list[list[tuple[str, float]]]:
    labels = imagenet_classes()
    out = []
    for path in paths:
        logits = ref.outputs(ImageProcessor.aimv1().preprocess_one(path)[None])["logits"][0].astype(
            np.float64
        )
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = np.argsort(-probs)[:5]
        out.append([(labels[i], float(probs[i])) for i in best])
    return out


def test_cli_classify_prints_the_heads_top_imagenet_labels(tiny, photo_files):
    """In float32: a tiny random head's 1000 probabilities are too close for float16 to keep their order."""
    folder, ref = tiny
    args = ["-m", str(folder), "--dtype", "float32"]
    result = runner.invoke(app, ["classify", *map(str, photo_files), *args, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == [str(p) for p in photo_files]
    for row, expected in zip(rows, expected_top5(ref, photo_files), strict=True):
        assert [p["label"] for p in row["predictions"]] == [label for label, _ in expected]
        np.testing.assert_allclose(
            [p["prob"] for p in row["predictions"]], [p for _, p in expected], rtol=1e-4
        )
    result = runner.invoke(app, ["classify", str(photo_files[0]), *args, "--top-k", "2", "--probe", "last"])
    assert result.exit_code == 0, result.output
    label, prob = expected_top5(ref, photo_files[:1])[0][0]
    assert result.stdout.splitlines() == [
        str(photo_files[0]),
        f"  {prob:7.2%}  {label}",
        result.stdout.splitlines()[2],
    ]


def test_cli_embed_gives_the_heads_features(tiny, photo_files, tmp_path):
    folder, ref = tiny
    out = tmp_path / "features.npy"
    result = runner.invoke(app, ["embed", *map(str, photo_files), "-m", str(folder), "-o", str(out)])
    assert result.exit_code == 0, result.output
    expected = [
        ref.outputs(ImageProcessor.aimv1().preprocess_one(p)[None])["features"][0] for p in photo_files
    ]
    assert rel_err(np.load(out), np.stack(expected)) < tolerance(default_dtype(), 1e-4)  # the CLI's dtype


@pytest.mark.parametrize(
    "args, line",
    [
        (["--probe", "middle"], "'--probe': Value error, 'middle' is not one of 'best', 'last'."),
        (["--probe", "best"], "the best probe layers are known for the published AIMv1 sizes only"),
        (["--labels", "cat,dog"], "{model} classifies into the ImageNet-1k classes of its trained head"),
    ],
)
def test_cli_bad_inputs_give_one_clear_line(tiny, photo_files, args, line):
    folder, _ = tiny
    result = runner.invoke(app, ["classify", str(photo_files[0]), "-m", str(folder), *args])
    assert result.exit_code in (1, 2) and result.stdout == ""
    first = result.stderr.splitlines()[0]  # a usage error adds Click's "Try ... -h" line
    assert first.startswith("error: ") and line.format(model=folder) in first


def test_cli_classify_refuses_labels_for_a_hub_aimv1_before_loading(photo_files, cache):
    result = runner.invoke(app, ["classify", str(photo_files[0]), "-m", "apple/aim-1B", "--imagenet"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: apple/aim-1B classifies into the ImageNet-1k classes of its trained head; drop --labels, "
        "--labels-file, --imagenet and --template(s), which are for zero-shot (LiT) models"
    ]


def test_probe_on_a_model_without_a_probe_head_is_an_error(tmp_path):
    from checkpoints import make_reference as make_aimv2
    from checkpoints import write_checkpoint as write_aimv2

    folder = write_aimv2(
        make_aimv2(
            seed=1, image_size=28, **{"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
        ),
        tmp_path,
    )
    with pytest.raises(ConfigError, match="has no attention-probe head; --probe applies to AIMv1 models"):
        load(str(folder), probe="best")
