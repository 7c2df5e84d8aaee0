"""`aim-mlx embed` and `aim-mlx models`: outputs against the Python API, exit codes, checks made before the
model loads, text embeddings, library warnings, and --help staying instant."""

import json
import logging
import subprocess
import sys
from itertools import islice

import mlx.core as mx
import numpy as np
import pytest
import skimage.data
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from emulation import not_on_apple, tolerance
from fakehub import add_folder
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image
from typer.testing import CliRunner

import aim_mlx
from aim_mlx import loading, log
from aim_mlx.checkpoints.variants import DEFAULT_TEXT_MODEL, PINNED_REVISIONS
from aim_mlx.cli import app
from aim_mlx.tasks.embed import NATIVE_TOKENS

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-aimv2")
    write_checkpoint(make_reference(seed=3, image_size=56, **TINY["large"]), folder, layout="hf")
    write_processor(folder)
    return folder


@pytest.fixture(scope="module")
def api(checkpoint):
    """The Python API's model and processor, loaded as the CLI loads them: in the default dtype."""
    return aim_mlx.load(str(checkpoint))


@pytest.fixture(scope="module")
def expected(api):
    """Pooled embeddings of the Python API, the CLI's reference."""
    model, processor = api

    def embed(*paths):
        return np.asarray(model.encode_image(processor(list(paths))).astype(mx.float32))

    return embed


def same(ours, theirs, model) -> None:
    """The CLI's result against the API's: equal up to the rounding of the model's dtype (batches of other
    sizes can take other kernels)."""
    tol = tolerance(model, 1e-4)
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol / 10)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(skimage.data.astronaut()).save(folder / "b.png")
    Image.fromarray(skimage.data.coffee()).save(folder / "a.jpg")
    Image.fromarray(skimage.data.camera()).save(folder / "sub" / "c.png")
    return folder


@pytest.fixture
def no_load(monkeypatch):
    """Fails a test whose command got as far as loading a model."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(loading, "load", load)


def embed(*args):
    return runner.invoke(app, ["embed", *map(str, args)])


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_embed_writes_rows_in_input_order(checkpoint, api, expected, photos, tmp_path):
    out = tmp_path / "emb.npy"
    extra = photos / "b.png"
    result = embed(extra, photos, "--model", checkpoint, "--batch-size", 2, "-o", out)
    assert result.exit_code == 0, result.output
    order = [extra, photos / "a.jpg", photos / "b.png", photos / "sub" / "c.png"]
    same(np.load(out), expected(*order), api[0])
    assert one_line(result.stderr) == f"wrote 4 embeddings to {out}"


def test_embed_npz_jsonl_and_token_grids(checkpoint, api, expected, photos, tmp_path):
    images = [photos / "a.jpg", photos / "sub" / "c.png"]
    assert embed(*images, "-m", checkpoint, "-o", tmp_path / "e.npz").exit_code == 0
    npz = np.load(tmp_path / "e.npz")
    assert list(npz["paths"]) == [str(p) for p in images]
    same(npz["embeddings"], expected(*images), api[0])

    assert embed(*images, "-m", checkpoint, "-o", tmp_path / "e.jsonl").exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in images]
    same([r["embedding"] for r in rows], expected(*images), api[0])

    assert embed(*images, "-m", checkpoint, "--pool", "none", "-o", tmp_path / "t.npy").exit_code == 0
    tokens = np.load(tmp_path / "t.npy")
    assert tokens.shape == (2, 16, TINY["large"]["hidden_size"])  # 56 px / 14 = a 4x4 grid
    same(tokens.mean(axis=1), expected(*images), api[0])


def test_one_embedding_is_singular(checkpoint, photos, tmp_path):
    result = embed(photos / "a.jpg", "-m", checkpoint, "-o", tmp_path / "one.npy")
    assert result.exit_code == 0 and one_line(result.stderr) == f"wrote 1 embedding to {tmp_path / 'one.npy'}"


def test_embed_without_output_prints_a_summary(checkpoint, photos):
    result = embed(photos / "a.jpg", "-m", checkpoint)
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(photos / "a.jpg")) and "norm=" in lines[0]


def test_some_bad_files_are_named_and_skipped_with_exit_3(checkpoint, api, expected, photos, tmp_path):
    data = (photos / "a.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 4])
    (photos / "empty.png").write_bytes(b"")
    (photos / "notes.png").write_text("hello")
    out = tmp_path / "emb.npz"
    result = embed(photos, photos / "missing.jpg", "-m", checkpoint, "-o", out)
    assert result.exit_code == 3
    for name in ("truncated.jpg", "empty.png", "notes.png", "missing.jpg"):
        assert name in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "4 of 7 images failed"
    good = [photos / "a.jpg", photos / "b.png", photos / "sub" / "c.png"]
    npz = np.load(out)
    assert list(npz["paths"]) == [str(p) for p in good]
    same(npz["embeddings"], expected(*good), api[0])


def test_when_every_image_fails_nothing_is_written_and_the_exit_code_is_1(checkpoint, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("hello")
    out = tmp_path / "emb.npy"
    result = embed(
        tmp_path / "empty.png", tmp_path / "notes.jpg", tmp_path / "gone.png", "-m", checkpoint, "-o", out
    )
    assert result.exit_code == 1 and not out.exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: none of the 3 images could be read"]


def test_user_errors_are_one_line(checkpoint, photos, tmp_path, monkeypatch):
    result = embed(photos, "-m", checkpoint, "-o", tmp_path / "out.csv")
    assert result.exit_code == 1 and one_line(result.stderr).startswith("error: ") and ".npy" in result.stderr

    result = embed(photos, "-m", tmp_path / "no-such-model")
    assert result.exit_code == 1 and "no-such-model" in one_line(result.stderr)

    monkeypatch.setenv("AIM_MLX_DEBUG", "1")
    result = embed(photos, "-m", checkpoint, "-o", tmp_path / "out.csv")
    assert result.exit_code == 1 and isinstance(result.exception, aim_mlx.errors.AimMlxError)


@pytest.mark.parametrize(
    "output, message",
    [
        ("photos", "-o {tmp}/photos is a folder; name a file to write"),
        ("no-such-folder/e.npy", "folder {tmp}/no-such-folder does not exist; create it first"),
        ("old.npy", "{tmp}/old.npy already exists; pass --force to replace it"),
    ],
)
def test_the_output_is_checked_before_loading(photos, tmp_path, no_load, output, message):
    (tmp_path / "old.npy").write_bytes(b"keep")
    result = embed(photos, "-o", tmp_path / output)
    assert result.exit_code == 1
    assert one_line(result.stderr) == "error: " + message.format(tmp=tmp_path)
    assert (tmp_path / "old.npy").read_bytes() == b"keep"


def test_force_replaces_an_existing_output(checkpoint, api, expected, photos, tmp_path):
    out = tmp_path / "old.npy"
    out.write_bytes(b"old")
    assert embed(photos / "a.jpg", "-m", checkpoint, "-o", out, "--force").exit_code == 0
    same(np.load(out), expected(photos / "a.jpg"), api[0])


def test_batch_size_0_is_a_usage_error(photos, no_load):
    result = embed(photos, "--batch-size", 0)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: Invalid value for '--batch-size': Input should be greater than or equal to 1",
        "Try 'aim-mlx embed -h' for help.",
    ]


def test_token_grids_of_the_native_checkpoint_are_refused_in_one_array(cache, photos, tmp_path):
    """Known from the id before loading (the empty cache would fail the load); from a folder's config
    once it loads, before any image is read. .jsonl holds grids of different sizes."""
    result = embed(
        photos, "-m", "apple/aimv2-large-patch14-native", "--pool", "none", "-o", tmp_path / "t.npz"
    )
    assert result.exit_code == 1 and "native-resolution" in one_line(result.stderr)
    native = write_checkpoint(
        make_reference(seed=4, is_native=True, **TINY["large"]), tmp_path / "n", "apple"
    )
    result = embed(photos, "-m", native, "--pool", "none", "-o", tmp_path / "t.npy")
    # (a warning first: the folder has no preprocessor_config.json)
    assert result.exit_code == 1 and result.stderr.splitlines()[-1] == f"error: {NATIVE_TOKENS}"
    assert not (tmp_path / "t.npy").exists()
    result = embed(
        photos / "a.jpg", photos / "b.png", "-m", native, "--pool", "none", "-o", tmp_path / "t.jsonl"
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len({len(r["embedding"]) for r in rows}) == 2  # coffee is 400x600, astronaut 512x512


def test_an_interrupt_says_how_far_it_got_and_writes_nothing(checkpoint, photos, tmp_path, monkeypatch):
    """In process and exact; tests/test_interrupt.py sends real signals to a real process."""

    from aim_mlx.tasks import distributed

    embeddings = distributed.iter_embeddings

    def interrupted(*args, **kwargs):  # a Ctrl-C once two images are done
        yield from islice(embeddings(*args, **kwargs), 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "iter_embeddings", interrupted)
    result = embed(photos, "-m", checkpoint, "-o", tmp_path / "e.npy")
    assert result.exit_code == 130 and not (tmp_path / "e.npy").exists()
    assert one_line(result.stderr) == "interrupted after 2 of 3 images; nothing written"


@pytest.fixture(scope="module")
def lit_folder(tmp_path_factory):
    return write_lit_checkpoint(make_lit_reference(seed=8), tmp_path_factory.mktemp("tiny-lit"))


def test_text_defaults_to_the_lit_checkpoint_and_is_keyed_text(lit_folder, cache, tmp_path, monkeypatch):
    add_folder(cache, DEFAULT_TEXT_MODEL, PINNED_REVISIONS[DEFAULT_TEXT_MODEL.split("/")[1]], lit_folder)
    monkeypatch.chdir(tmp_path)
    texts = ["a photo of a cat", "un café très noir"]
    result = runner.invoke(app, ["embed", "--text", texts[0], "-o", "cat.npy"])
    assert result.exit_code == 0, result.output
    assert one_line(result.stderr) == "wrote 1 embedding to cat.npy"
    model, _ = aim_mlx.load(str(lit_folder))
    expected = np.asarray(model.encode_text(texts).astype(mx.float32))
    same(np.load("cat.npy"), expected[:1], model)

    args = ["embed", "-t", texts[0], "-t", texts[1], "-m", lit_folder]
    assert runner.invoke(app, [*map(str, args), "-o", "t.npz"]).exit_code == 0
    npz = np.load("t.npz")
    assert sorted(npz.files) == ["embeddings", "texts"] and list(npz["texts"]) == texts
    assert runner.invoke(app, [*map(str, args), "-o", "t.jsonl"]).exit_code == 0
    lines = (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()
    assert "très" in lines[1]  # readable, not \u00e8
    rows = [json.loads(line) for line in lines]
    assert [sorted(r) for r in rows] == [["embedding", "text"]] * 2 and [r["text"] for r in rows] == texts
    same([r["embedding"] for r in rows], expected, model)


def test_text_and_images_or_neither_are_refused(photos, no_load):
    assert "not both" in one_line(embed(photos, "--text", "a cat").stderr)
    assert "nothing to embed" in one_line(embed().stderr)
    assert "--pool none applies to images" in one_line(embed("--text", "a cat", "--pool", "none").stderr)


def test_jsonl_keeps_non_ascii_paths_readable(checkpoint, photos, tmp_path):
    photo = photos / "café.png"
    (photos / "b.png").rename(photo)
    assert embed(photo, "-m", checkpoint, "-o", tmp_path / "e.jsonl").exit_code == 0
    assert "café.png" in (tmp_path / "e.jsonl").read_text(encoding="utf-8")


def test_library_warnings_are_one_plain_line(checkpoint, photos, monkeypatch):
    real = loading.load

    def load(*args, **kwargs):
        logging.getLogger("aim_mlx").warning("something to know")
        logging.getLogger("aim_mlx").info("nothing to show")
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load", load)
    result = embed(photos / "a.jpg", "-m", checkpoint)
    assert result.exit_code == 0 and result.stderr == "warning: something to know\n"


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="half precision is slow only on a CPU")
def test_half_precision_on_a_cpu_warns(checkpoint, photos, monkeypatch):
    monkeypatch.setattr(log, "_said", set())  # the library warns once per process
    monkeypatch.delenv("AIM_MLX_DTYPE", raising=False)  # and not about AIM_MLX_DTYPE's choice
    result = embed(photos / "a.jpg", "-m", checkpoint, "--dtype", "float16")
    assert result.exit_code == 0 and one_line(result.stderr).startswith("warning: ")


@pytest.mark.parametrize("command", ["embed", "bench"])
def test_a_mistyped_aim_mlx_dtype_is_one_line(checkpoint, photos, monkeypatch, command):
    monkeypatch.setenv("AIM_MLX_DTYPE", "fp16")
    args = [photos / "a.jpg"] if command == "embed" else ["--num-trials", "1"]
    result = runner.invoke(app, [command, *map(str, args), "-m", str(checkpoint)])
    assert result.exit_code == 1, result.output
    assert (
        one_line(result.stderr)
        == "error: AIM_MLX_DTYPE='fp16' is not a dtype; use float32, float16, bfloat16"
    )


@not_on_apple  # the variable belongs to the numpy backend
def test_a_bad_cpu_workers_setting_is_an_error(checkpoint, photos, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CPU_WORKERS", "abc")
    result = embed(photos / "a.jpg", "-m", checkpoint)
    assert result.exit_code == 1 and "AIM_MLX_CPU_WORKERS" in one_line(result.stderr)


def test_models_json_lists_every_variant(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    from aim_mlx.checkpoints.variants import VARIANTS

    assert [r["id"] for r in rows] == [v.repo_id for v in VARIANTS.values()]
    assert all(r["cached"] is False for r in rows)
    aimv1 = {r["id"] for r in rows if r["id"].startswith("apple/aim-")}  # ml-aim pins no AIMv1 revision
    assert all(len(r["revision"]) == 40 for r in rows if r["id"] not in aimv1)
    protocols = {r["id"]: r["imagenet_top1_protocol"] for r in rows}
    assert protocols.pop("apple/aimv2-large-patch14-224-lit") == "zero-shot"
    assert set(protocols.values()) == {"attentive probe, frozen trunk"}
    assert runner.invoke(app, ["models"]).stdout.count("apple/") == len(VARIANTS)


def test_help_imports_nothing_heavy():
    """`aim-mlx --help` must answer at once: neither MLX nor numpy nor torch may load for it."""
    code = (
        "import sys\n"
        "from aim_mlx.cli import app\n"
        "for args in (['--help'], ['embed', '-h'], ['export', 'coreml', '-h']):\n"
        "    try:\n        app(args)\n    except SystemExit:\n        pass\n"
        "heavy = ('mlx.core', 'numpy', 'torch', 'PIL', 'huggingface_hub', 'rich')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "embed" in done.stdout and done.stdout.strip().endswith("[]")


def test_python_m_aim_mlx_is_the_command():
    done = subprocess.run([sys.executable, "-m", "aim_mlx", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == f"aim-mlx {aim_mlx.__version__}\n"
