"""`aim-mlx classify`: failed images in --json and the exit codes, a BOM in --labels-file, a single label,
the progress bars."""

import json

import pytest
import skimage.data
from aimv1_checkpoints import TINY, make_reference, write_checkpoint
from checkpoints import write_processor
from fake_bars import Bars
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image
from typer.testing import CliRunner

from aim_mlx.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "aim-mlx-cache"))


@pytest.fixture(scope="module")
def lit_folder(tmp_path_factory):
    return write_processor(
        write_lit_checkpoint(make_lit_reference(seed=5), tmp_path_factory.mktemp("tiny-lit"))
    )


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(skimage.data.coffee()).save(folder / "c.jpg")
    return folder


def classify(*args):
    return runner.invoke(app, ["classify", *map(str, args)])


def test_json_lists_every_image_in_input_order_failed_ones_with_their_error(lit_folder, photos):
    missing = photos / "missing.png"
    result = classify(photos, missing, "--labels", "cat,dog", "-m", lit_folder, "--json")
    assert result.exit_code == 3
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == [
        str(photos / name) for name in ("a.png", "b.jpg", "c.jpg", "missing.png")
    ]
    assert [sorted(r) for r in rows] == [["path", "predictions"], ["error", "path"]] * 2
    assert "b.jpg" in rows[1]["error"] and "no such file" in rows[3]["error"]
    assert {p["label"] for p in rows[0]["predictions"]} == {"cat", "dog"}
    assert result.stderr.splitlines()[-1] == "2 of 4 images failed"

    result = classify(photos, "--labels", "cat,dog", "-m", lit_folder)
    assert result.exit_code == 3
    assert [line for line in result.stdout.splitlines() if not line.startswith(" ")] == [
        str(photos / "a.png"),
        str(photos / "c.jpg"),
    ]


def test_when_every_image_fails_the_exit_code_is_1_and_nothing_is_printed(lit_folder, photos):
    result = classify(
        photos / "b.jpg", photos / "missing.png", "--labels", "cat,dog", "-m", lit_folder, "--json"
    )
    assert result.exit_code == 1 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: none of the 2 images could be read"]


def test_a_bom_in_the_labels_file_is_not_part_of_the_first_label(lit_folder, photos, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n", encoding="utf-8-sig")  # as Notepad writes UTF-8
    assert labels.read_bytes().startswith(b"\xef\xbb\xbf")
    result = classify(photos / "a.png", "--labels-file", labels, "-m", lit_folder, "--json")
    assert result.exit_code == 0, result.output
    assert sorted(p["label"] for p in json.loads(result.stdout)[0]["predictions"]) == ["cat", "dog"]


def test_a_single_label_warns_that_probabilities_need_two(lit_folder, photos):
    result = classify(photos / "a.png", "--labels", "cat", "-m", lit_folder)
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        "warning: with one label every probability is 100%; give two or more labels to compare"
    ]
    assert "100.00%  cat" in result.stdout


def test_bad_labels_are_refused_before_the_warning_and_the_model(photos, monkeypatch):
    monkeypatch.setattr("aim_mlx.loading.load", lambda *a, **k: pytest.fail("loaded a model"))
    result = classify(photos, "--labels", "cat", "--template", "a photo")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "exactly one {}" in line


@pytest.fixture
def bars(monkeypatch):
    from aim_mlx.cli import classify as classify_cli

    recorder = Bars()
    monkeypatch.setattr(classify_cli, "progress", recorder)
    return recorder


def test_an_aimv1_head_shows_a_bar_per_image(bars, photos, tmp_path):
    reference = make_reference(seed=2, num_blocks=2, probe_layers=(1,), **TINY["600M"])
    folder = write_checkpoint(reference, tmp_path / "aimv1")
    result = classify(photos, "-m", folder, "--batch-size", 1, "--json")
    assert result.exit_code == 3, result.output  # b.jpg is not an image
    [bar] = bars.made
    assert bar.tasks == [{"description": "images", "total": 3}]
    assert [u["completed"] for u in bar.updates] == [1, 2, 3]  # each image, the failed one too


def test_zero_shot_shows_a_bar_per_image_after_the_prompts(bars, lit_folder, photos):
    result = classify(photos, "--labels", "cat,dog", "-m", lit_folder, "--json")
    assert result.exit_code == 3, result.output
    prompts, images = bars.made
    assert prompts.tasks[0]["total"] == 2
    assert images.tasks == [{"description": "images", "total": 3}]
    assert [u["completed"] for u in images.updates] == [1, 2, 3]
