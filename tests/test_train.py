"""`aim-mlx train` and its head folders, on a tiny random-weight AIMv2 and class folders made from
scikit-image photos (each class one photo under random crops, flips and colour jitter, so that even random
features separate them). Learning is checked against independent references: scikit-learn's
LogisticRegression on the same cached features, sklearn.metrics on the same predictions, a numpy computation
from the saved weights, a torch attention probe written here from the architecture, and finite differences."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import skimage.data
import torch
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from lit_checkpoints import make_lit_reference, write_lit_checkpoint
from PIL import Image
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, precision_score, recall_score
from typer.testing import CliRunner

import aim_mlx
from aim_mlx.cli import app
from aim_mlx.errors import AimMlxError, ConfigError
from aim_mlx.tasks import features
from aim_mlx.tasks import train as tr

PHOTOS = ("astronaut", "coffee", "chelsea")  # class i is photo i
CHANCE = 100 / len(PHOTOS)
runner = CliRunner()


def jittered_crops(name: str, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """`count` random crops (50-90 % of each side) of a scikit-image photo, some flipped, each channel scaled
    by 0.8-1.2, at 80x80."""
    photo = Image.fromarray(getattr(skimage.data, name)())
    w, h = photo.size
    out = []
    for _ in range(count):
        share = rng.uniform(0.5, 0.9)
        cw, ch = int(w * share), int(h * share)
        left, top = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        crop = photo.crop((left, top, left + cw, top + ch)).resize((80, 80))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(crop).astype(np.float32) * rng.uniform(0.8, 1.2, 3)
        out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out


def class_folders(root, counts: dict[str, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i, crop in enumerate(jittered_crops(name, count, rng)):
            crop.save(root / name / f"{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-aimv2")
    return write_processor(write_checkpoint(make_reference(seed=1, image_size=56, **TINY["large"]), folder))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return class_folders(tmp_path_factory.mktemp("birds") / "birds", dict.fromkeys(PHOTOS, 16))


@pytest.fixture(scope="module", autouse=True)
def feature_cache(tmp_path_factory):
    """One cache for the module (set before the module's other fixtures run): the features of the same
    images on the same model are computed once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIM_MLX_CACHE", str(tmp_path_factory.mktemp("train-cache")))
        yield


@pytest.fixture(scope="module")
def model(base):
    return aim_mlx.load(str(base))


@pytest.fixture(scope="module")
def linear_head(model, data, tmp_path_factory):
    net, processor = model
    out = tmp_path_factory.mktemp("heads") / "linear-head"
    report = tr.train(net, processor, data, out, val_split=0.25, epochs=60, lr=1e-2, batch_size=16, seed=0)
    return out, report


def cached(net, processor, paths, kind="pooled") -> np.ndarray:
    """The cached features of `paths`, read from the cache files by content hash (as the cache is keyed)."""
    folder = features.cache_folder(net, processor, kind)
    return np.stack([np.load(folder / f"{features.file_hash(p)}.npy") for p in paths])


def split_paths(data, seed=0, val_split=0.25):
    return features.split(features.find_classes(data), val_split, seed)


def numpy_linear_logits(head_folder, features: np.ndarray) -> np.ndarray:
    w = load_file(str(head_folder / "model.safetensors"))
    z = (features - w["bn.running_mean"]) / np.sqrt(w["bn.running_var"] + 1e-6)
    return z @ w["linear.weight"].T + w["linear.bias"]


def test_the_split_is_stratified_seeded_and_disjoint(data):
    train, val = split_paths(data)
    assert train.counts() == [12] * 3 and val.counts() == [4] * 3
    assert not set(train.paths) & set(val.paths)
    again, other = split_paths(data), split_paths(data, seed=1)
    assert again[1].paths == val.paths and other[1].paths != val.paths


def test_linear_probe_learns_like_sklearn_logistic_regression(model, data, linear_head):
    """Same cached features, same standardisation: scikit-learn's LogisticRegression's validation accuracy is
    within 2 of the 12 validation images of ours (both were 10 of 12 when written), and ours is at least
    twice chance (33 %)."""
    net, processor = model
    out, report = linear_head
    train, val = split_paths(data)
    w = load_file(str(out / "model.safetensors"))
    x_train, x_val = cached(net, processor, train.paths), cached(net, processor, val.paths)
    np.testing.assert_allclose(w["bn.running_mean"], x_train.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w["bn.running_var"], x_train.var(0), rtol=1e-3, atol=1e-6)
    scale = lambda x: (x - x_train.mean(0)) / np.sqrt(x_train.var(0) + 1e-6)  # noqa: E731
    reference = LogisticRegression(C=1.0, max_iter=2000).fit(scale(x_train), train.targets)
    theirs = 100 * reference.score(scale(x_val), val.targets)
    assert report.val_accuracy >= 2 * CHANCE, report.val_accuracy
    assert abs(report.val_accuracy - theirs) <= 100 * 2 / 12 + 1e-6, (report.val_accuracy, theirs)
    # The report's figures are the saved head's, on the validation split, as sklearn.metrics computes them.
    predicted = numpy_linear_logits(out, x_val).argmax(1)
    assert report.val_accuracy == pytest.approx(100 * np.mean(predicted == val.targets))
    assert report.confusion == confusion_matrix(val.targets, predicted, labels=[0, 1, 2]).tolist()
    precision = precision_score(val.targets, predicted, average=None, labels=[0, 1, 2], zero_division=0)
    recall = recall_score(val.targets, predicted, average=None, labels=[0, 1, 2], zero_division=0)
    assert [c["precision"] for c in report.per_class] == pytest.approx(100 * precision)
    assert [c["recall"] for c in report.per_class] == pytest.approx(100 * recall)
    assert [c["label"] for c in report.per_class] == sorted(PHOTOS)


def test_the_best_epoch_is_kept(linear_head):
    """Early stopping keeps the weights of the epoch with the lowest validation loss."""
    _, report = linear_head
    losses = [e.val_loss for e in report.epochs]
    assert report.best_epoch == 1 + int(np.argmin(losses))
    assert report.val_loss == pytest.approx(min(losses), rel=1e-5)


def test_a_second_run_with_other_settings_costs_no_forward_pass(base, data, tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "fresh-cache"))
    net, processor = aim_mlx.load(str(base))
    calls = []
    encode = net.encode_image
    monkeypatch.setattr(net, "encode_image", lambda x: calls.append(len(x)) or encode(x))
    first = tr.train(net, processor, data, tmp_path / "a", epochs=2, seed=0)
    assert sum(calls) == 48 and first.forward_images == 48
    calls.clear()
    second = tr.train(net, processor, data, tmp_path / "b", epochs=3, lr=3e-3, weight_decay=0.1, seed=4)
    assert calls == [] and second.forward_images == 0
    assert second.train_images + second.val_images == 48


def test_the_head_folder_loads_as_a_classifier_equal_to_numpy_on_its_weights(model, data, linear_head):
    net, processor = model
    out, report = linear_head
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "aim-mlx-probe" and config["probe"] == "linear"
    assert config["labels"] == sorted(PHOTOS)
    assert config["base_model"]["key"] == net.info.key and config["base_model"]["source"] == net.info.source
    assert config["preprocessing"] == processor.to_dict()
    assert config["training"]["best_epoch"] == report.best_epoch
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    head, head_processor = aim_mlx.load(str(out))
    assert head.labels == sorted(PHOTOS) and head.info.family == "aimv2-probe"
    paths = sorted((data / "coffee").glob("*.jpg"))[:4]
    pixels = head_processor(paths)
    expected = numpy_linear_logits(out, np.asarray(net.encode_image(pixels)))
    np.testing.assert_allclose(np.asarray(head.classify(pixels)), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(head.encode_image(pixels)), np.asarray(net.encode_image(pixels)))

    from aim_mlx.tasks.heads import classify_files

    predictions, failures = classify_files(head, head_processor, paths, top_k=2)
    assert not failures and [len(p.to_list()) for _, p in predictions] == [2] * 4
    probs = np.exp(expected - expected.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for (_, pred), row in zip(predictions, probs, strict=True):
        assert pred.to_list()[0]["label"] == sorted(PHOTOS)[int(row.argmax())]
        assert pred.to_list()[0]["prob"] == pytest.approx(row.max(), rel=1e-4)


def test_a_head_refuses_a_base_whose_identity_changed(base, linear_head, tmp_path):
    out, _ = linear_head
    moved = tmp_path / "base"
    shutil.copytree(base, moved)
    config = json.loads((out / "config.json").read_text())
    config["base_model"]["source"] = str(moved)  # the same weights, but other files: another identity
    shutil.copytree(out, tmp_path / "head")
    (tmp_path / "head" / "config.json").write_text(json.dumps(config))
    os.utime(moved / "model.safetensors", ns=(1, 1))
    with pytest.raises(ConfigError, match="not the one the head was trained on"):
        aim_mlx.load(str(tmp_path / "head"))


def test_class_balanced_loss_when_classes_are_unbalanced(model, tmp_path):
    net, processor = model
    data = class_folders(tmp_path / "data", {"astronaut": 12, "coffee": 4, "chelsea": 4}, seed=3)
    report = tr.train(net, processor, data, tmp_path / "head", epochs=1, val_split=0.25)
    assert report.balanced_loss and report.class_counts == [9, 3, 3]  # training images, classes sorted
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["training"]["balanced_loss"] is True


def test_the_attentive_probe_learns_and_streams_as_it_caches(model, data, tmp_path):
    """Token grids in memory or read back from the cache per batch: the same training, to the bit."""
    net, processor = model
    kwargs = dict(probe="attentive", val_split=0.25, epochs=15, lr=3e-3, batch_size=16, seed=0)
    held = tr.train(net, processor, data, tmp_path / "held", **kwargs)
    streamed = tr.train(net, processor, data, tmp_path / "streamed", memory_budget=0, **kwargs)
    assert held.token_cache["in_memory"] and not streamed.token_cache["in_memory"]
    assert held.token_cache["bytes"] == 48 * 16 * 128 * 2  # float16 (N, D) per image
    assert [e.val_loss for e in held.epochs] == [e.val_loss for e in streamed.epochs]
    assert held.val_accuracy >= 2 * CHANCE, held.val_accuracy
    head, _ = aim_mlx.load(str(tmp_path / "held"))
    assert head.config.probe == "attentive" and head.config.num_heads == 8


class TorchProbe(torch.nn.Module):
    """The attentive probe from its description: per-channel standardisation with fixed statistics, one
    learned query (no projection) attending over k/v projections of the tokens with H heads, softmax
    attention scaled by head_dim^-0.5, heads concatenated, Linear with bias."""

    def __init__(self, w: dict, heads: int):
        super().__init__()
        self.w = {k: torch.from_numpy(v) for k, v in w.items()}
        self.heads = heads

    def forward(self, x):  # (B, N, D)
        w, h = self.w, self.heads
        x = (x - w["bn.running_mean"]) / torch.sqrt(w["bn.running_var"] + 1e-6)
        b, n, d = x.shape
        k = (x @ w["k.weight"].T).reshape(b, n, h, d // h).transpose(1, 2)  # (B, H, N, hd)
        v = (x @ w["v.weight"].T).reshape(b, n, h, d // h).transpose(1, 2)
        q = w["cls_token"].reshape(1, h, 1, d // h)
        attn = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, dim=-1)  # (B, H, 1, N)
        pooled = (attn @ v).reshape(b, d)
        return pooled @ w["linear.weight"].T + w["linear.bias"]


def test_the_attentive_head_matches_a_torch_probe_over_the_mean_of_chosen_blocks(model, data, tmp_path):
    net, processor = model
    out = tmp_path / "head"
    tr.train(net, processor, data, out, probe="attentive", blocks=[0, -1], epochs=2, val_split=0.25)
    head, _ = aim_mlx.load(str(out))
    assert head.config.blocks == [0, 1]
    pixels = processor(sorted((data / "chelsea").glob("*.jpg"))[:3])
    blocks = net.forward_intermediates(pixels, indices=[0, 1])  # raw outputs, no final norm
    tokens = torch.from_numpy((np.asarray(blocks[0]) + np.asarray(blocks[1])) / 2)
    w = load_file(str(out / "model.safetensors"))
    w["cls_token"] = np.random.default_rng(0).normal(size=w["cls_token"].shape).astype(np.float32)
    head.head.cls_token = aim_mlx_array(w["cls_token"])  # a query away from its initial value
    expected = TorchProbe(w, heads=8)(tokens).numpy()
    np.testing.assert_allclose(np.asarray(head.classify(pixels)), expected, rtol=1e-4, atol=1e-4)


def aim_mlx_array(x):
    import mlx.core as mx

    return mx.array(x.astype(np.float32))


def test_gradients_of_a_tiny_head_match_finite_differences():
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from aim_mlx.models.probe import attentive_probe

    mx.random.seed(0)
    head = attentive_probe(8, 2, 3)
    head.cls_token = mx.random.normal((1, 1, 8))
    x, y, w = mx.random.normal((4, 5, 8)), mx.array([0, 2, 1, 2]), mx.array([1.0, 0.5, 2.0, 1.0])

    def loss(params):
        head.update(params)
        return nn.losses.cross_entropy(head(x), y, weights=w, reduction="mean")

    params = head.trainable_parameters()
    grads = dict(tree_flatten(mx.grad(loss)(params)))
    assert sorted(grads) == ["cls_token", "k.weight", "linear.bias", "linear.weight", "v.weight"]  # no bn
    flat = dict(tree_flatten(params))
    for name, leaf in flat.items():
        values = np.asarray(leaf, dtype=np.float64).ravel()
        for i in (0, len(values) // 2, len(values) - 1):
            f = []
            for step in (1e-3, -1e-3):
                moved = values.copy()
                moved[i] += step
                new = mx.array(moved.reshape(leaf.shape).astype(np.float32))
                f.append(float(loss(tree_unflatten(list({**flat, name: new}.items())))))
            numeric = (f[0] - f[1]) / 2e-3
            assert float(np.asarray(grads[name]).ravel()[i]) == pytest.approx(numeric, rel=0.03, abs=2e-4), (
                name
            )


def test_bad_inputs_are_one_line_each(model, data, tmp_path, caplog):
    net, processor = model

    def run(folder, **kwargs):
        return tr.train(net, processor, folder, tmp_path / "out", epochs=1, **kwargs)

    with pytest.raises(ConfigError, match="is not a folder"):
        run(tmp_path / "missing")
    single = class_folders(tmp_path / "single", {"coffee": 4})
    with pytest.raises(ConfigError, match="one class folder"):
        run(single)
    empty = class_folders(tmp_path / "empty", {"coffee": 4, "chelsea": 4})
    (empty / "rocket").mkdir()
    with pytest.raises(ConfigError, match="rocket holds no images"):
        run(empty)
    lonely = class_folders(tmp_path / "lonely", {"coffee": 4, "chelsea": 1})
    with pytest.raises(ConfigError, match="class 'chelsea' has one image"):
        run(lonely)
    with pytest.raises(ConfigError, match="--augment is for the attentive probe"):
        run(data, augment=True)
    with pytest.raises(ConfigError, match="--blocks"):
        run(data, blocks=[0])
    with pytest.raises(ConfigError, match="--blocks: "):
        run(data, probe="attentive", blocks=[7])
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        run(data)


def test_unreadable_images_are_skipped_and_duplicates_warned(model, tmp_path, caplog):
    net, processor = model
    data = class_folders(tmp_path / "data", {"coffee": 4, "chelsea": 4})
    (data / "coffee" / "broken.jpg").write_bytes(b"not a jpeg")
    shutil.copyfile(data / "coffee" / "00.jpg", data / "chelsea" / "copy.jpg")
    with caplog.at_level(logging.WARNING, logger="aim_mlx"):
        report = tr.train(net, processor, data, tmp_path / "head", epochs=1, val_split=0.25)
    assert report.failed == 1 and "broken.jpg" in report.failures[0][0]
    assert report.duplicates == 1 and "several classes" in caplog.text and "copy.jpg" in caplog.text
    assert report.train_images + report.val_images == 9


def test_an_interrupted_run_writes_no_head(model, data, tmp_path, monkeypatch):
    """Interrupted while the head folder is being written (its weights there, its config not yet)."""
    net, processor = model
    save = tr.save_file

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "save_file", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        tr.train(net, processor, data, tmp_path / "head", epochs=1)
    assert os.listdir(tmp_path) == []


def test_a_missing_base_is_the_usual_error(linear_head, tmp_path):
    out, _ = linear_head
    config = json.loads((out / "config.json").read_text())
    config["base_model"]["source"] = str(tmp_path / "gone")
    shutil.copytree(out, tmp_path / "head")
    (tmp_path / "head" / "config.json").write_text(json.dumps(config))
    with pytest.raises(AimMlxError):
        aim_mlx.load(str(tmp_path / "head"))


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_classify_and_eval_folder_on_the_command_line(base, data, tmp_path):
    out = tmp_path / "birds-head"
    result = cli(
        "train", data, "-o", out, "-m", base, "--epochs", "40", "--lr", "1e-2", "--val-split", "0.25"
    )
    assert result.exit_code == 0, result.output
    assert "precision  recall" in result.stdout and f"wrote {out}" in result.stdout
    result = cli("train", data, "-o", out, "-m", base, "--json")
    assert result.exit_code == 1 and "already exists; pass --force" in result.stderr
    result = cli(
        "train",
        data,
        "-o",
        out,
        "-m",
        base,
        "--epochs",
        "40",
        "--lr",
        "1e-2",
        "--val-split",
        "0.25",
        "--json",
        "--force",
    )
    report = json.loads(result.stdout)
    assert report["forward_images"] == 0 and report["val_images"] == 12

    # eval folder on the held-out split gives the report's validation figures
    _, val = split_paths(data)
    held_out = tmp_path / "held-out"
    for path, target in zip(val.paths, val.targets, strict=True):
        (held_out / val.labels[target]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, held_out / val.labels[target] / path.name)
    result = cli("eval", "folder", "--data", held_out, "-m", out, "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["top1"] == pytest.approx(report["val_accuracy"])
    assert figures["confusion"] == report["confusion"] and figures["top5"] == 100
    assert [c["recall"] for c in figures["per_class"]] == [c["recall"] for c in report["per_class"]]

    photo = sorted((data / "coffee").glob("*.jpg"))[0]
    result = cli("classify", photo, "-m", out, "--json", "--top-k", "3")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert sorted(p["label"] for p in row["predictions"]) == sorted(PHOTOS)
    result = cli("classify", photo, "-m", out, "--labels", "cat,dog")
    assert result.exit_code == 1
    assert "trained head over its 3 classes (astronaut, chelsea, coffee)" in result.stderr
    assert "zero-shot labels need a LiT model" in result.stderr

    imagenet = tmp_path / "imagenet" / "n01440764"
    imagenet.mkdir(parents=True)
    shutil.copyfile(val.paths[0], imagenet / "a.jpg")
    result = cli("eval", "imagenet", "--data", imagenet.parent, "-m", out)
    assert result.exit_code == 1 and "measure it with aim-mlx eval folder" in result.stderr
    (held_out / "rocket").mkdir()
    result = cli("eval", "folder", "--data", held_out, "-m", out)
    assert (
        result.exit_code == 1
        and "'rocket' in" in result.stderr
        and "not one of the head's classes" in result.stderr
    )


def test_a_head_on_a_lit_model_names_both_ways_of_classifying(data, tmp_path):
    lit = write_processor(write_lit_checkpoint(make_lit_reference(seed=5), tmp_path / "lit"))
    out = tmp_path / "lit-head"
    assert cli("train", data, "-o", out, "-m", lit, "--epochs", "1").exit_code == 0
    photo = sorted((data / "coffee").glob("*.jpg"))[0]
    result = cli("classify", photo, "-m", out, "--labels", "cat,dog")
    assert result.exit_code == 1
    assert f"or classify zero-shot with its base model: -m {lit.resolve()} --labels ..." in result.stderr


@pytest.mark.parametrize("probe", ["linear", "attentive"])
def test_export_coreml_gives_a_classifier_of_the_heads_labels(model, data, tmp_path, monkeypatch, probe):
    """image -> classLabel over the head's labels; --check runs the package in the numpy MIL evaluator
    against the MLX head and passes within the export's bounds (the attentive head over a mean of blocks)."""
    from aim_mlx.convert.coreml.evaluator import classifier_classes, load_program

    net, processor = model
    out = tmp_path / "birds-head"
    blocks = None if probe == "linear" else [0, 1]
    tr.train(net, processor, data, out, probe=probe, blocks=blocks, epochs=3, val_split=0.25)
    monkeypatch.chdir(tmp_path)
    result = cli("export", "coreml", "-m", out, "--check")
    assert result.exit_code == 0, result.output
    assert "check:" in result.stdout and "top-1 as MLX's on 4 of 4 photos" in result.stdout
    package = tmp_path / "BirdsHeadClassifier.mlpackage"
    spec, program = load_program(package)
    assert classifier_classes(program) == sorted(PHOTOS)
    meta = dict(spec.description.metadata.userDefined)
    assert meta["probe"] == probe and meta["source_model"] == net.info.source and meta["head"] == "birds-head"
    result = cli("export", "coreml", "-m", out, "--labels", "a,b", "-o", tmp_path / "x.mlpackage")
    assert result.exit_code == 1 and "its labels are its own classes" in result.stderr


def test_augmentation_runs_the_model_on_every_training_image_each_epoch(model, data, tmp_path, monkeypatch):
    net, processor = model
    kwargs = dict(probe="attentive", augment=True, epochs=2, val_split=0.25, seed=3)
    calls = []
    run = net.forward_intermediates
    monkeypatch.setattr(net, "forward_intermediates", lambda x, **kw: calls.append(len(x)) or run(x, **kw))
    first = tr.train(net, processor, data, tmp_path / "a", **kwargs)
    assert first.forward_images == sum(calls)
    calls.clear()
    again = tr.train(net, processor, data, tmp_path / "b", **kwargs)  # nothing left to cache: crops alone
    assert sum(calls) == again.forward_images == 2 * 36  # each epoch, every training image as a crop
    assert [e.train_loss for e in again.epochs] == [e.train_loss for e in first.epochs]  # seeded crops
    crops = [features.augment_image(data / "coffee" / "00.jpg", np.random.default_rng(i)) for i in range(8)]
    assert len({c.size for c in crops}) > 1 and all(c.width <= 80 and c.height <= 80 for c in crops)


def test_a_head_on_a_quantized_base(base, data, tmp_path):
    """convert -q 8: the head records the quantized base's identity, and loads on it as trained."""
    from aim_mlx.convert.convert import convert

    quantized = tmp_path / "q8"
    convert(str(base), quantized, quantize=True, q_bits=8, q_group_size=32)
    net, processor = aim_mlx.load(str(quantized))
    out = tmp_path / "head"
    tr.train(net, processor, data, out, epochs=2, val_split=0.25)
    config = json.loads((out / "config.json").read_text())
    assert config["base_model"]["quantization"]["bits"] == 8 and config["base_model"]["key"] == net.info.key
    head, _ = aim_mlx.load(str(out))
    pixels = processor(sorted((data / "astronaut").glob("*.jpg"))[:2])
    expected = numpy_linear_logits(out, np.asarray(net.encode_image(pixels)))
    np.testing.assert_allclose(np.asarray(head.classify(pixels)), expected, rtol=1e-4, atol=1e-4)


def test_unreadable_images_exit_3_after_training(base, tmp_path):
    data = class_folders(tmp_path / "data", {"coffee": 4, "chelsea": 4})
    (data / "coffee" / "broken.jpg").write_bytes(b"not a jpeg")
    result = cli("train", data, "-o", tmp_path / "head", "-m", base, "--epochs", "1", "--val-split", "0.25")
    assert result.exit_code == 3, result.output
    assert (
        "skipped " in result.stderr
        and "broken.jpg" in result.stderr
        and "1 of 9 images failed" in result.stderr
    )
    assert (tmp_path / "head" / "model.safetensors").is_file()


def test_the_confusion_matrix_as_an_image(linear_head, data, tmp_path):
    out, _ = linear_head
    result = cli("eval", "folder", "--data", data, "-m", out, "--plot", tmp_path / "cm.png", "--json")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "cm.png") as image:
        assert image.format == "PNG" and min(image.size) >= 300
    result = cli("eval", "folder", "--data", data, "-m", out, "--plot", tmp_path / "cm.txt")
    assert result.exit_code == 1 and "use a .png, .svg or .pdf file name" in result.stderr


def test_a_validation_folder_instead_of_a_split(model, data, tmp_path):
    net, processor = model
    val = class_folders(tmp_path / "val", dict.fromkeys(PHOTOS, 2), seed=9)
    report = tr.train(net, processor, data, tmp_path / "head", val_dir=val, epochs=2)
    assert report.train_images == 48 and report.val_images == 6
    assert [c["support"] for c in report.per_class] == [2, 2, 2]
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["training"]["val_dir"] == str(val.resolve()) and config["training"]["val_split"] is None
    (val / "rocket").mkdir()
    with pytest.raises(ConfigError, match="'rocket' in .* is not one of the head's classes"):
        tr.train(net, processor, data, tmp_path / "other", val_dir=val, epochs=1)


def test_command_line_option_errors(base, data, tmp_path):
    out = tmp_path / "head"
    result = cli("train", data, "-o", out, "-m", base, "--val", data, "--val-split", "0.2")
    assert result.exit_code == 1 and "give --val-split or --val, not both" in result.stderr
    result = cli("train", data, "-o", out, "-m", base, "--probe", "attentive", "--blocks", "1,x")
    assert result.exit_code == 1 and "--blocks '1,x': give block indices" in result.stderr
    result = cli("train", data, "-m", base)
    assert result.exit_code == 1 and "aim-mlx train DATA -o DIR" in result.stderr
    assert not out.exists()
