"""The `aim-mlx` command line: embed with good and bad files, output formats, exit codes, models, --help."""

import json
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from PIL import Image
from typer.testing import CliRunner

import aim_mlx
from aim_mlx.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-aimv2")
    write_checkpoint(make_reference(seed=3, image_size=56, **TINY["large"]), folder, layout="hf")
    write_processor(folder)
    return folder


@pytest.fixture(scope="module")
def expected(checkpoint):
    """Pooled embeddings of the Python API, the CLI's reference."""
    model, processor = aim_mlx.load(str(checkpoint))

    def embed(*paths):
        return np.asarray(model.encode_image(processor(list(paths))))

    return embed


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(skimage.data.astronaut()).save(folder / "b.png")
    Image.fromarray(skimage.data.coffee()).save(folder / "a.jpg")
    Image.fromarray(skimage.data.camera()).save(folder / "sub" / "c.png")
    return folder


def embed(*args):
    return runner.invoke(app, ["embed", *map(str, args)])


def test_embed_writes_rows_in_input_order(checkpoint, expected, photos, tmp_path):
    out = tmp_path / "emb.npy"
    extra = photos / "b.png"
    result = embed(extra, photos, "--model", checkpoint, "--batch-size", 2, "-o", out)
    assert result.exit_code == 0, result.output
    order = [extra, photos / "a.jpg", photos / "b.png", photos / "sub" / "c.png"]
    np.testing.assert_allclose(np.load(out), expected(*order), rtol=1e-4, atol=1e-5)


def test_embed_npz_jsonl_and_token_grids(checkpoint, expected, photos, tmp_path):
    images = [photos / "a.jpg", photos / "sub" / "c.png"]
    assert embed(*images, "-m", checkpoint, "-o", tmp_path / "e.npz").exit_code == 0
    npz = np.load(tmp_path / "e.npz")
    assert list(npz["paths"]) == [str(p) for p in images]
    np.testing.assert_allclose(npz["embeddings"], expected(*images), rtol=1e-4, atol=1e-5)

    assert embed(*images, "-m", checkpoint, "-o", tmp_path / "e.jsonl").exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in images]
    np.testing.assert_allclose([r["embedding"] for r in rows], expected(*images), rtol=1e-4, atol=1e-5)

    assert embed(*images, "-m", checkpoint, "--pool", "none", "-o", tmp_path / "t.npy").exit_code == 0
    tokens = np.load(tmp_path / "t.npy")
    assert tokens.shape == (2, 16, TINY["large"]["hidden_size"])  # 56 px / 14 = a 4x4 grid
    np.testing.assert_allclose(tokens.mean(axis=1), expected(*images), rtol=1e-4, atol=1e-5)


def test_embed_without_output_prints_a_summary(checkpoint, photos):
    result = embed(photos / "a.jpg", "-m", checkpoint)
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(photos / "a.jpg")) and "norm=" in lines[0]


def test_bad_files_are_reported_and_skipped(checkpoint, expected, photos, tmp_path):
    data = (photos / "a.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 4])
    (photos / "empty.png").write_bytes(b"")
    (photos / "notes.png").write_text("hello")
    out = tmp_path / "emb.npz"
    result = embed(photos, photos / "missing.jpg", "-m", checkpoint, "-o", out)
    assert result.exit_code == 2
    for name in ("truncated.jpg", "empty.png", "notes.png", "missing.jpg"):
        assert name in result.stderr
    assert "4 of 7 images failed" in result.stderr
    good = [photos / "a.jpg", photos / "b.png", photos / "sub" / "c.png"]
    npz = np.load(out)
    assert list(npz["paths"]) == [str(p) for p in good]
    np.testing.assert_allclose(npz["embeddings"], expected(*good), rtol=1e-4, atol=1e-5)


def test_user_errors_are_one_line(checkpoint, photos, tmp_path, monkeypatch):
    result = embed(photos, "-m", checkpoint, "-o", tmp_path / "out.csv")
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and ".npy" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    result = embed(photos, "-m", tmp_path / "no-such-model")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "no-such-model" in result.stderr

    monkeypatch.setenv("AIM_MLX_DEBUG", "1")
    result = embed(photos, "-m", checkpoint, "-o", tmp_path / "out.csv")
    assert result.exit_code == 1 and isinstance(result.exception, aim_mlx.errors.AimMlxError)


def test_models_json_lists_every_variant(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    from aim_mlx.variants import VARIANTS

    assert [r["id"] for r in rows] == [v.repo_id for v in VARIANTS.values()]
    assert all(len(r["revision"]) == 40 and r["cached"] is False for r in rows)
    protocols = {r["id"]: r["imagenet_top1_protocol"] for r in rows}
    assert protocols.pop("apple/aimv2-large-patch14-224-lit") == "zero-shot"
    assert set(protocols.values()) == {"attentive probe, frozen trunk"}
    assert runner.invoke(app, ["models"]).stdout.count("apple/aimv2") == len(VARIANTS)


def test_help_imports_nothing_heavy():
    """`aim-mlx --help` must answer at once: neither MLX nor numpy nor torch may load for it."""
    code = (
        "import sys\n"
        "from aim_mlx.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('mlx.core', 'numpy', 'torch', 'PIL', 'huggingface_hub')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "embed" in done.stdout and done.stdout.strip().endswith("[]")
