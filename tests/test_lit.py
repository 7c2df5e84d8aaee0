"""The LiT (zero-shot) model against transformers' Aimv2Model; zero-shot helper, text-embedding cache, CLI."""

import json
import logging

import mlx.core as mx
import numpy as np
import pytest
import skimage.data
import torch
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from emulation import tolerance
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image
from transformers import CLIPTokenizer
from typer.testing import CliRunner

import aim_mlx
from aim_mlx.checkpoints import layouts, weights
from aim_mlx.cli import app
from aim_mlx.errors import ConfigError, WeightsError
from aim_mlx.models.aimv2 import Attention
from aim_mlx.models.config import VisionConfig
from aim_mlx.tasks import zeroshot

runner = CliRunner()
LIT_ID = "apple/aimv2-large-patch14-224-lit"
TEXTS = ["a photo of a cat", "A DOG, running fast!", "an émigré's café 🐱", "x"]


@pytest.fixture(autouse=True)
def text_cache(tmp_path, monkeypatch):
    folder = tmp_path / "aim-mlx-cache"
    monkeypatch.setenv("AIM_MLX_CACHE", str(folder))
    return folder / "text-embeddings"


@pytest.fixture(scope="module")
def reference():
    return make_lit_reference(seed=5)


@pytest.fixture(scope="module")
def lit_folder(reference, tmp_path_factory):
    folder = write_lit_checkpoint(reference, tmp_path_factory.mktemp("tiny-lit"), "hf")
    write_processor(folder)
    return folder


@pytest.fixture(scope="module")
def lit(lit_folder):
    return aim_mlx.load(str(lit_folder))


def reference_outputs(ref, folder, pixels, texts, causal=True):
    tok = CLIPTokenizer.from_pretrained(str(folder))
    enc = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return ref(
            input_ids=enc["input_ids"],
            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
            attention_mask=enc["attention_mask"] if causal else None,
        )


def pixels(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 56, 56, 3)).astype(np.float32)


def close(ours, theirs, tol=1e-5):
    theirs = theirs.numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["hf", "apple", "mlx"])
def test_parity_with_transformers(reference, tmp_path, layout, backend):
    folder = write_lit_checkpoint(reference, tmp_path, layout)
    model, _ = aim_mlx.load(str(folder))
    x = pixels()
    ref = reference_outputs(reference, folder, x, TEXTS)
    out = model(mx.array(x), TEXTS)
    tol = tolerance(model, 1e-5)  # loaded in the default dtype: float16 where the GPU is the default device
    close(out.image_embeds, ref.image_embeds, tol)
    close(out.text_embeds, ref.text_embeds, tol)
    close(out.logits_per_image, ref.logits_per_image, tolerance(model, 1e-4))
    close(out.logits_per_text, ref.logits_per_text, tolerance(model, 1e-4))
    close(model.encode_image(mx.array(x)), ref.image_embeds, tol)
    # Without the mask transformers' text attention is bidirectional: a different model, which we are not.
    bidirectional = reference_outputs(reference, folder, x, TEXTS, causal=False).text_embeds.numpy()
    assert np.abs(np.asarray(out.text_embeds) - bidirectional).max() > 1e-3


def test_lit_hub_id_loads_at_its_pinned_revision_offline(cache, reference, tmp_path):
    from fakehub import add_folder

    from aim_mlx.checkpoints.variants import find_variant

    folder = write_lit_checkpoint(reference, tmp_path / "apple", "apple")
    write_processor(folder)
    add_folder(cache, LIT_ID, find_variant(LIT_ID).revision, folder, ref=None)
    model, processor = aim_mlx.load("aimv2-large-patch14-224-lit")
    x = pixels(1)
    expected = reference_outputs(reference, folder, x, ["a"]).image_embeds
    close(model.encode_image(mx.array(x)), expected, tolerance(model, 1e-5))
    assert processor.tokenize(["a cat"])[0, :4].tolist() == [49406, 320, 2368, 49407]


def test_sanitize_lit_is_idempotent_and_strict(reference, tmp_path):
    folder = write_lit_checkpoint(reference, tmp_path, "apple", tokenizer=False)
    once = layouts.sanitize_lit(weights.read_folder(folder))
    twice = layouts.sanitize_lit(once)
    assert once.keys() == twice.keys()
    assert all(np.array_equal(once[k], twice[k]) for k in once)
    model, _ = aim_mlx.load(str(write_lit_checkpoint(reference, tmp_path / "full", "hf")))
    del once["text_encoder.blocks.1.mlp.fc2.weight"]
    with pytest.raises(WeightsError, match=r"missing: text_encoder\.blocks\.1\.mlp\.fc2\.weight"):
        weights.load_into(model, once)


@pytest.mark.parametrize("dtype, tol", [(mx.float32, 1e-5), (mx.float16, 2e-3)])
def test_causal_attention_in_mlx(dtype, tol):
    """The MLX blocks' attention (MLX's fused kernel, what Apple GPUs run) with and without the causal mask,
    against numpy. (The numpy backend's is checked against these blocks in test_parity.py.)"""
    config = VisionConfig(hidden_size=48, num_attention_heads=3)
    causal, full = Attention(config, causal=True), Attention(config)
    full.update(causal.parameters())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 48)).astype(np.float32)
    qkv = x @ np.asarray(causal.qkv.weight).T  # (B, N, 3D): q, k, v, heads packed
    q, k, v = (qkv[..., i * 48 : (i + 1) * 48].reshape(2, 9, 3, 16).transpose(0, 2, 1, 3) for i in range(3))
    scores = q @ k.swapaxes(-1, -2) * 16**-0.5  # (B, H, N, N)
    scores[..., np.triu(np.ones((9, 9), dtype=bool), 1)] = -np.inf
    weights_ = np.exp(scores - scores.max(-1, keepdims=True))
    heads = ((weights_ / weights_.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(2, 9, 48)
    expected = heads @ np.asarray(causal.proj.weight).T
    for layer in (causal, full):
        layer.set_dtype(dtype)
    ours = causal(mx.array(x).astype(dtype))
    np.testing.assert_allclose(np.asarray(ours.astype(mx.float32)), expected, rtol=tol, atol=tol)
    unmasked = full(mx.array(x).astype(dtype))
    assert np.abs(np.asarray(unmasked.astype(mx.float32)) - expected).max() > 0.1  # the mask did something


def test_text_pools_at_first_eos(lit):
    model, processor = lit
    ids = processor.tokenize(["a photo of a dog"])
    other = ids.copy()
    eos = int(np.argmax(ids[0] == 49407))
    other[0, eos + 1 :] = 320  # anything after the first EOS cannot reach it through causal attention
    close(model.encode_text(ids), np.asarray(model.encode_text(other)))
    close(model.encode_text(["a photo of a dog"]), np.asarray(model.encode_text(ids[0])))


def test_zero_shot_probabilities_match_transformers(reference, lit, lit_folder):
    model, processor = lit
    labels = ["cat", "dog", "horse"]
    x = pixels(3, seed=1)
    preds = zeroshot.zero_shot(model, processor, mx.array(x), labels, templates=["a photo of a {}."], top_k=3)
    ref = reference_outputs(reference, lit_folder, x, [f"a photo of a {c}." for c in labels])
    probs = torch.softmax(ref.logits_per_image, dim=-1).numpy()
    for pred, row in zip(preds, probs, strict=True):
        assert pred.labels == [labels[i] for i in np.argsort(-row)]
        close(pred.probs, np.sort(row)[::-1], tolerance(model, 1e-4))


def test_template_ensemble_is_the_renormalised_mean(reference, lit, lit_folder):
    model, processor = lit
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    emb = zeroshot.encode_prompts(model, processor, ["cat", "dog"], templates)
    prompts = [t.format(c) for c in ["cat", "dog"] for t in templates]
    text = reference_outputs(reference, lit_folder, pixels(1), prompts).text_embeds.numpy().reshape(2, 3, -1)
    mean = text.mean(axis=1)
    close(emb, mean / np.linalg.norm(mean, axis=-1, keepdims=True), tolerance(model, 1e-5))


def test_cache_hit_miss_and_corrupt_file(lit, lit_folder, text_cache, monkeypatch, caplog):
    model, processor = lit
    calls = []
    real = zeroshot.encode_prompts

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(zeroshot, "encode_prompts", counting)
    first = zeroshot.text_classifier(model, processor, ["cat", "dog"], ["a {}."])
    assert len(calls) == 1 and len(list(text_cache.glob("*.npz"))) == 1
    again = zeroshot.text_classifier(model, processor, ["cat", "dog"], ["a {}."])
    assert len(calls) == 1  # a hit: nothing encoded
    np.testing.assert_array_equal(first, again)
    zeroshot.text_classifier(model, processor, ["cat", "dog", "cow"], ["a {}."])
    assert calls[-1] == ["cat", "dog", "cow"] and len(calls) == 2  # a changed label set misses
    zeroshot.text_classifier(model, processor, ["cat", "dog"], ["the {}."])
    assert len(calls) == 3  # so does a changed template
    (path,) = [p for p in text_cache.glob("*.npz") if np.array_equal(np.load(p)["embeddings"], first)]
    path.write_bytes(b"not an npz file")
    with caplog.at_level(logging.WARNING, logger="aim_mlx"):
        rebuilt = zeroshot.text_classifier(model, processor, ["cat", "dog"], ["a {}."])
    assert len(calls) == 4 and "ignoring unreadable text-embedding cache" in caplog.text
    close(rebuilt, first)
    np.testing.assert_array_equal(np.load(path)["embeddings"], rebuilt)  # rewritten whole
    np.savez(path, embeddings=np.ones((2, 5), np.float32))  # readable, but not this model's width
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aim_mlx"):
        zeroshot.text_classifier(model, processor, ["cat", "dog"], ["a {}."])
    assert len(calls) == 5 and "of shape (2, 5)" in caplog.text
    assert not list(text_cache.glob("*.tmp*"))


def test_prompt_encoding_reports_progress_per_batch(lit):
    model, processor = lit
    calls = []
    labels, templates = ["cat", "dog", "cow"], ["a {}.", "the {}."]
    emb = zeroshot.encode_prompts(model, processor, labels, templates, 4, lambda *a: calls.append(a))
    assert calls == [(4, 6), (6, 6)]
    close(emb, zeroshot.encode_prompts(model, processor, labels, templates))  # batching changes nothing


def test_bad_labels_and_templates():
    with pytest.raises(ConfigError, match="no labels"):
        zeroshot.check_labels([])
    with pytest.raises(ConfigError, match="label 2 is empty"):
        zeroshot.check_labels(["cat", " ", "dog"])
    with pytest.raises(ConfigError, match="'Cat' is given twice"):
        zeroshot.check_labels(["cat", "Cat"])
    with pytest.raises(ConfigError, match="exactly one {}"):
        zeroshot.check_templates(["a photo of a cat"])


def test_shipped_imagenet_data():
    classes, templates = zeroshot.imagenet_classes(), zeroshot.imagenet_templates()
    assert len(classes) == 1000 and classes[0] == "tench" and classes[-1] == "toilet paper"
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)


def test_long_text_is_truncated_with_a_warning(lit, caplog):
    model, processor = lit
    long = "cat " * 200
    with caplog.at_level(logging.WARNING, logger="aim_mlx"):
        ids, truncated = processor.tokenizer.encode([long, "dog"])
    assert truncated == [0] and "truncated" in caplog.text
    assert ids[0, -1] == 49407 and ids[0, 0] == 49406
    assert np.isfinite(np.asarray(model.encode_text(ids))).all()


# --- command line -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.astronaut()).save(folder / "a.png")
    Image.fromarray(skimage.data.coffee()).save(folder / "b.jpg")
    return folder


@pytest.fixture(scope="module")
def vision_only(tmp_path_factory):
    return write_checkpoint(make_reference(seed=1, **TINY["large"]), tmp_path_factory.mktemp("vision"), "hf")


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def test_classify_json_matches_the_api(lit, lit_folder, photos, text_cache):
    model, processor = lit
    result = cli("classify", photos, "--labels", "cat, dog,cup", "-m", lit_folder, "--json", "--top-k", 2)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == [str(photos / "a.png"), str(photos / "b.jpg")]
    images = [photos / "a.png", photos / "b.jpg"]
    expected = zeroshot.zero_shot(model, processor, images, ["cat", "dog", "cup"])
    for row, pred in zip(rows, expected, strict=True):
        assert [p["label"] for p in row["predictions"]] == pred.labels[:2]
        close([p["prob"] for p in row["predictions"]], np.array(pred.probs[:2]), 1e-4)
    assert len(list(text_cache.glob("*.npz"))) == 1


def test_classify_imagenet_and_template_ensemble(lit_folder, photos):
    image = photos / "a.png"
    result = cli("classify", image, "--imagenet", "--template", "a photo of a {}.", "-m", lit_folder)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == str(image) and len(lines) == 6
    assert all(line.strip().split("  ", 1)[1] in zeroshot.imagenet_classes() for line in lines[1:])
    result = cli("classify", image, "--labels", "cat,dog", "--templates", "imagenet", "-m", lit_folder)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 3  # top-5 of two labels: both


@pytest.mark.parametrize(
    "args, message",
    [
        (["--labels", "cat,,dog"], "label 2 is empty"),
        (["--labels", "cat,dog,cat"], "'cat' is given twice"),
        (["--labels", "cat", "--template", "a photo"], "exactly one {}"),
        (["--labels", "cat", "--imagenet"], "exactly one of --labels, --labels-file or --imagenet"),
        ([], "exactly one of --labels"),
        (["--labels-file", "/nonexistent/labels.txt"], "cannot read --labels-file"),
        (["--imagenet", "--template", "a {}", "--templates", "imagenet"], "--template or --templates"),
    ],
)
def test_classify_bad_input_is_one_line(lit_folder, photos, args, message):
    result = cli("classify", photos, "-m", lit_folder, *args)
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_classify_skips_unreadable_images_with_exit_3(lit_folder, photos, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "a.png").write_bytes((photos / "a.png").read_bytes())
    result = cli("classify", tmp_path, "--labels", "cat,dog", "-m", lit_folder, "--json")
    assert result.exit_code == 3 and "broken.jpg" in result.stderr  # 3: some inputs failed
    rows = {row["path"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {str(tmp_path / "a.png"), str(tmp_path / "broken.jpg")}
    assert "predictions" in rows[str(tmp_path / "a.png")] and "error" in rows[str(tmp_path / "broken.jpg")]


def test_classify_labels_file(lit_folder, photos, tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    result = cli("classify", photos / "a.png", "--labels-file", tmp_path / "labels.txt", "-m", lit_folder)
    assert result.exit_code == 0, result.output
    assert {line.split()[-1] for line in result.stdout.splitlines()[1:]} == {"cat", "dog"}


def test_vision_only_checkpoint_names_the_zero_shot_ones(vision_only, photos):
    result = cli("classify", photos, "--labels", "cat,dog", "-m", vision_only)
    assert result.exit_code == 1 and "vision-only" in result.stderr and LIT_ID in result.stderr
    result = cli("embed", "--text", "a cat", "-m", vision_only)
    assert result.exit_code == 1 and LIT_ID in result.stderr
    model, processor = aim_mlx.load(str(vision_only))
    with pytest.raises(ConfigError, match="vision-only"):
        zeroshot.zero_shot(model, processor, mx.array(pixels(1)), ["cat", "dog"])


def test_embed_text(lit, lit_folder, tmp_path):
    model, _ = lit
    out = tmp_path / "text.npy"
    result = cli("embed", "--text", "a photo of a cat", "--text", "a dog", "-m", lit_folder, "-o", out)
    assert result.exit_code == 0, result.output
    close(np.load(out), np.asarray(model.encode_text(["a photo of a cat", "a dog"])))
    result = cli("embed", "--text", "a cat", "-m", lit_folder)
    assert result.exit_code == 0 and "norm=1.0000" in result.stdout


def test_embed_images_with_lit_uses_the_shared_space(lit, lit_folder, photos, tmp_path):
    model, processor = lit
    out = tmp_path / "img.npy"
    result = cli("embed", photos / "a.png", "-m", lit_folder, "-o", out)
    assert result.exit_code == 0, result.output
    close(np.load(out), np.asarray(model.encode_image(processor([photos / "a.png"]))), 1e-4)
    result = cli("embed", photos / "a.png", "--text", "a cat", "-m", lit_folder)
    assert result.exit_code == 1 and "not both" in result.stderr
    result = cli("embed", "-m", lit_folder)
    assert result.exit_code == 1 and "nothing to embed" in result.stderr


def test_l2_normalisation_does_not_overflow_in_float16():
    """A projected embedding with a norm far above float16's sqrt(max) (~256) still normalises to unit
    length: the norm is computed in float32 (what an Apple GPU in float16 needs)."""
    from aim_mlx.models.lit import l2_normalize

    big = mx.full((2, 768), 300.0, dtype=mx.float16)  # norm 8314: its square overflows float16
    out = l2_normalize(big)
    assert out.dtype == mx.float16
    np.testing.assert_allclose(np.asarray(out.astype(mx.float32)), 768**-0.5, rtol=1e-3)
