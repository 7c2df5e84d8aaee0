"""`aim-mlx eval imagenet`: accuracy on a tiny ImageFolder set against torch references (AIMv1 written from
the architecture; transformers' Aimv2Model for LiT), the JSON report, the published figure, the progress
bar over the class prompts, and one line for each bad folder."""

import json

import numpy as np
import pytest
import skimage.data
import torch
from aimv1_checkpoints import TINY, make_reference, write_checkpoint
from checkpoints import make_reference as make_aimv2
from checkpoints import write_checkpoint as write_aimv2
from checkpoints import write_processor
from fake_bars import Bars
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPTokenizer
from typer.testing import CliRunner

from aim_mlx import load
from aim_mlx.cli import app
from aim_mlx.tasks import evaluate, zeroshot

runner = CliRunner()
PHOTOS = {
    "astronaut": skimage.data.astronaut,
    "coffee": skimage.data.coffee,
    "chelsea": skimage.data.chelsea,
    "rocket": skimage.data.rocket,
}


@pytest.fixture(autouse=True)
def text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "aim-mlx-cache"))


def eval_imagenet(*args):
    return runner.invoke(app, ["eval", "imagenet", *map(str, args)])


def photo_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, photo in PHOTOS.items():
        paths[name] = folder / f"{name}.png"
        Image.fromarray(photo()).save(paths[name])
    return paths


def image_folder(root, photos, ranked):
    """An ImageFolder set whose labels make the expected accuracy known: per photo its classes `ranked` best
    first, the photo filed under its 1st (astronaut, by wnid; rocket, by index), its 3rd (coffee: a top-5 hit
    only) and its last class (chelsea: a miss); a class two photos share keeps its first folder name.
    Returns (set folder, classes, expected top-1 %, expected top-5 %)."""
    wnids = evaluate.imagenet_wnids()
    targets = {  # photo -> (class index, by wnid)
        "astronaut": (ranked["astronaut"][0], True),
        "coffee": (ranked["coffee"][2], True),
        "chelsea": (ranked["chelsea"][-1], False),
        "rocket": (ranked["rocket"][0], False),
    }
    folders = {}
    for name, (index, by_wnid) in targets.items():
        folder = folders.setdefault(index, wnids[index] if by_wnid else str(index))
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / f"{name}.png").write_bytes(photos[name].read_bytes())
    return root, len(folders), 50.0, 75.0


@pytest.fixture(scope="module")
def aimv1(tmp_path_factory):
    """A tiny AIMv1 checkpoint, its torch reference, and a set labelled from the reference's own ranking."""
    tmp = tmp_path_factory.mktemp("aimv1")
    ref = make_reference(seed=7, **TINY["600M"])
    folder = write_checkpoint(ref, tmp / "model")
    photos = photo_files(tmp / "photos")
    _, processor = load(str(folder))
    pixels = np.asarray(processor([photos[name] for name in PHOTOS]))  # (4, 224, 224, 3), as eval sees them
    logits = ref.outputs(pixels)["logits"]  # (4, 1000), the torch reference's
    ranked = {name: np.argsort(-row).tolist() for name, row in zip(PHOTOS, logits, strict=True)}
    data, classes, top1, top5 = image_folder(tmp / "val", photos, ranked)
    assert classes == 4  # distinct classes with 1000 to draw from: the subset count below is known
    return folder, data, top1, top5


def test_wnids_are_imagenet_1k_in_class_index_order():
    wnids = evaluate.imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    assert wnids == sorted(wnids)  # class indices follow the sorted training folders
    assert wnids[683] == "n03838899"  # oboe, as in the published class index


def test_aimv1_top1_and_top5_match_the_torch_reference(aimv1):
    folder, data, top1, top5 = aimv1
    result = eval_imagenet("--data", data, "-m", folder, "--json", "--batch-size", 3)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["top1"], report["top5"]) == (top1, top5)
    assert report["images"] == 4 and report["classes"] == 4 and report["failed"] == 0
    assert report["subset"] is True and report["method"] == "head"


def test_the_json_report_has_every_field_and_o_writes_the_same(aimv1, tmp_path):
    folder, data, _, _ = aimv1
    out = tmp_path / "report.json"
    result = eval_imagenet("--data", data, "-m", folder, "--json", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    fields = {"model", "revision", "method", "images", "classes", "top1", "top5", "failed", "seconds"}
    assert fields | {"images_per_s", "subset", "published_top1", "failures"} == set(report)
    assert report["model"] == str(folder.resolve()) and report["published_top1"] is None
    written = json.loads(out.read_text())
    assert {k: v for k, v in written.items() if k not in ("seconds", "images_per_s")} == {
        k: v for k, v in report.items() if k not in ("seconds", "images_per_s")
    }
    again = eval_imagenet("--data", data, "-m", folder, "-o", out)
    assert again.exit_code == 1 and "already exists; pass --force" in again.stderr


def test_the_text_summary_says_subset_and_a_bad_image_is_skipped_counted_and_exits_3(aimv1, tmp_path):
    folder, data, top1, _ = aimv1
    bad_set = tmp_path / "val"
    for class_dir in data.iterdir():
        (bad_set / class_dir.name).mkdir(parents=True)
        for image in class_dir.iterdir():
            (bad_set / class_dir.name / image.name).write_bytes(image.read_bytes())
    (bad_set / class_dir.name / "broken.jpg").write_bytes(b"not a jpeg")
    result = eval_imagenet("--data", bad_set, "-m", folder)
    assert result.exit_code == 3
    assert "subset of 4 classes" in result.stdout and f"top-1 {top1:.2f}%" in result.stdout
    failed = [line for line in result.stderr.splitlines() if "broken.jpg" in line]
    assert len(failed) == 1 and failed[0].startswith("skipped ")
    assert result.stderr.splitlines()[-1] == "1 of 5 images failed"


@pytest.fixture(scope="module")
def lit_reference():
    return make_lit_reference(seed=5)


@pytest.fixture(scope="module")
def lit_folder(lit_reference, tmp_path_factory):
    return write_processor(write_lit_checkpoint(lit_reference, tmp_path_factory.mktemp("lit")))


def transformers_ranking(model, folder, photos, names) -> dict[str, list[int]]:
    """Per photo, the class indices best first by transformers' Aimv2Model zero-shot logits: its own image
    processor and CLIP tokenizer on the folder's files, the prompt 'a photo of a {}.', causal text (mask)."""
    processor = CLIPImageProcessorPil(**json.loads((folder / "preprocessor_config.json").read_text()))
    images = [Image.open(photos[name]).convert("RGB") for name in PHOTOS]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    text = CLIPTokenizer.from_pretrained(str(folder))(
        [f"a photo of a {name}." for name in names], padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**text, pixel_values=pixels).logits_per_image.numpy()  # (4, classes)
    return {name: np.argsort(-row).tolist() for name, row in zip(PHOTOS, logits, strict=True)}


def test_lit_zero_shot_accuracy_follows_the_transformers_ranking_among_the_class_names(
    lit_reference, lit_folder, tmp_path, monkeypatch
):
    names = zeroshot.imagenet_classes()[:10]  # 10 classes: the 1000 names x a template is slow on a CPU
    monkeypatch.setattr(evaluate, "imagenet_classes", lambda: names)
    photos = photo_files(tmp_path / "photos")
    ranked = transformers_ranking(lit_reference, lit_folder, photos, names)
    data, classes, top1, top5 = image_folder(tmp_path / "val", photos, ranked)
    result = eval_imagenet("--data", data, "-m", lit_folder, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["top1"], report["top5"], report["method"]) == (top1, top5, "zero-shot")
    assert report["classes"] == classes and report["images"] == 4


@pytest.mark.parametrize("templates, updates", [(None, [10]), ("imagenet", [256, 400])])
def test_the_class_prompts_show_a_progress_bar_unless_cached(
    lit_folder, tmp_path, monkeypatch, templates, updates
):
    """A bar over the prompts while they are encoded (a batch is 256): classes x templates in all; none when
    the class embeddings come from the cache."""
    from aim_mlx.cli import eval as eval_cli

    names = zeroshot.imagenet_classes()[: 10 if templates is None else 5]  # x 80 templates: 400 prompts
    monkeypatch.setattr(evaluate, "imagenet_classes", lambda: names)
    photo_files(tmp_path / "val" / "n01440764")
    args = ["--data", tmp_path / "val", "-m", lit_folder, "--json"]
    args += [] if templates is None else ["--templates", templates]
    for cached in (False, True):
        bars = Bars()
        monkeypatch.setattr(eval_cli, "progress", bars)
        result = eval_imagenet(*args)
        assert result.exit_code == 0, result.output
        prompts, images = bars.made
        assert prompts.tasks[0]["visible"] is False  # hidden until encoding starts
        if cached:
            assert prompts.updates == []
            continue
        assert [u["completed"] for u in prompts.updates] == updates
        assert {u["total"] for u in prompts.updates} == {updates[-1]}
        assert all(u["visible"] for u in prompts.updates)
        times = "" if templates is None else " x 80"
        assert prompts.updates[-1]["description"] == f"encoding {len(names)}{times} class prompts"
        assert images.tasks[0]["total"] == 4


def test_an_aimv1_head_shows_no_prompt_bar(aimv1, monkeypatch):
    from aim_mlx.cli import eval as eval_cli

    folder, data, _, _ = aimv1
    bars = Bars()
    monkeypatch.setattr(eval_cli, "progress", bars)
    assert eval_imagenet("--data", data, "-m", folder).exit_code == 0
    prompts, images = bars.made
    assert prompts.updates == [] and [u["completed"] for u in images.updates] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"cats": ["a.png"]}, "class folder 'cats' in "),
        ({"1000": ["a.png"]}, "class folder '1000' in "),
        ({}, "has no class folders"),
        ({"n01440764": [], "7": []}, "no images in the 2 class folders of"),
        ({"n01440764": ["a.png"], "0": ["b.png"]}, "class folders '0' and 'n01440764' are both class 0"),
    ],
)
def test_a_bad_folder_is_one_line(tmp_path, layout, message):
    data = tmp_path / "val"
    data.mkdir()
    for folder, files in layout.items():
        (data / folder).mkdir()
        for name in files:
            Image.fromarray(skimage.data.coffee()).save(data / folder / name)
    result = eval_imagenet("--data", data, "-m", tmp_path / "no-model-needed")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line


def test_a_data_folder_that_does_not_exist_is_one_line(tmp_path):
    result = eval_imagenet("--data", tmp_path / "nowhere", "-m", tmp_path / "no-model-needed")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line == f"error: --data {tmp_path / 'nowhere'} is not a folder; give the validation set's folder"


@pytest.mark.parametrize("where", ["known id", "local folder"])
def test_a_vision_only_model_has_neither_head_nor_text_tower(tmp_path, cache, where):
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    Image.fromarray(skimage.data.coffee()).save(tmp_path / "val" / "n01440764" / "a.png")
    model = "apple/aimv2-large-patch14-224"  # refused before loading: the offline cache does not hold it
    if where == "local folder":  # refused once loaded
        model = write_processor(write_aimv2(make_aimv2(seed=1), tmp_path / "aimv2"))
    result = eval_imagenet("--data", tmp_path / "val", "-m", model)
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "has neither a classification head nor a text tower" in line


def test_published_figures_for_known_checkpoints():
    class Info:
        source = "apple/aim-600M"

    class Model:
        family, info = "aimv1", Info()
        dims = {"hidden_size": 1536, "num_hidden_layers": 24, "probe_layers": list(range(14, 20))}

    assert evaluate.published_top1(Model()) == 79.4
    Model.dims = {**Model.dims, "probe_layers": list(range(18, 24))}  # the last-layers head
    assert evaluate.published_top1(Model()) == 78.5
    Info.source = "/home/me/aim-1b"  # a converted folder: known by its size
    Model.dims = {"hidden_size": 2048, "num_hidden_layers": 24, "probe_layers": list(range(12, 18))}
    assert evaluate.published_top1(Model()) == 82.3
    Model.dims = {**Model.dims, "hidden_size": 96}  # no published size
    assert evaluate.published_top1(Model()) is None
    Model.family, Info.source = "aimv2-lit", "apple/aimv2-large-patch14-224-lit"
    assert evaluate.published_top1(Model()) == 77.0
    Model.family, Info.source = "aimv2", "apple/aimv2-large-patch14-224"  # vision-only: no such figure
    assert evaluate.published_top1(Model()) is None


def test_the_summary_prints_the_published_figure_beside_ours():
    from aim_mlx.cli.eval import summary

    report = evaluate.Report(
        "apple/aim-600M", "main", "head", 50000, 1000, 79.412, 94.5, 0, 100.0, 500.0, False, 79.4
    )
    text = summary(report)
    assert "top-1 79.41% (published: 79.4)" in text and "50000 images, 1000 classes, head" in text
    assert "subset" not in text


def test_a_subset_labels_the_published_figure_as_the_full_sets():
    """On a subset the published figure is not comparable: it is labelled as the 1000-class figure."""
    from aim_mlx.cli.eval import summary

    report = evaluate.Report("apple/aim-600M", "main", "head", 500, 10, 90.0, 99.0, 0, 1.0, 500.0, True, 79.4)
    text = summary(report)
    assert "(published: 79.4)" not in text and "subset of 10 classes" in text
    line = next(line for line in text.splitlines() if line.startswith("top-1"))
    assert line == "top-1 90.00% (published 79.4 is on all 1000 classes: not comparable with this subset)"


def test_templates_are_refused_for_a_head(aimv1):
    folder, data, _, _ = aimv1
    result = eval_imagenet("--data", data, "-m", folder, "--templates", "imagenet")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "scores with its trained head; --templates is for zero-shot (LiT) models" in line
