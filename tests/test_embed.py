"""embed.iter_embeddings: one result per input, in order, streamed with bounded read-ahead; and save()."""

import json

import numpy as np
import pytest
import skimage.data
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from emulation import tolerance
from PIL import Image

import aim_mlx
from aim_mlx.errors import ConfigError
from aim_mlx.tasks.embed import EmbedResult, embed_images, iter_embeddings, save


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = write_checkpoint(
        make_reference(seed=3, image_size=56, **TINY["large"]), tmp_path_factory.mktemp("m")
    )
    write_processor(folder)
    return aim_mlx.load(str(folder))


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    ref = make_reference(seed=4, is_native=True, **TINY["large"])
    return aim_mlx.load(str(write_checkpoint(ref, tmp_path_factory.mktemp("native"), "hf")))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"] * 3):
        path = folder / f"{i:02d}.png"
        Image.fromarray(getattr(skimage.data, name)()).resize((60 + 14 * (i % 2), 60)).save(path)
        paths.append(path)
    return paths


def test_results_come_in_input_order_with_failures_in_place(model, photos, tmp_path):
    net, processor = model
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [photos[0], broken, photos[1], photos[2], tmp_path / "missing.png", photos[3], photos[4]]
    items = list(iter_embeddings(net, processor, paths, batch_size=2))
    assert [item.path for item in items] == paths
    assert [item.error is None for item in items] == [True, False, True, True, False, True, True]
    assert "broken.jpg" in items[1].error and items[1].embedding is None
    good = [p for p, item in zip(paths, items, strict=True) if item.error is None]
    expected = np.asarray(net.encode_image(processor(good)))
    ours = np.stack([i.embedding for i in items if i.error is None])
    np.testing.assert_allclose(ours, expected, atol=tolerance(net, 1e-5))  # batches of other sizes


def test_the_next_batch_runs_while_the_previous_is_copied_out(model, photos):
    """The batch loop dispatches batch k+1 to MLX (asynchronously) before it copies out and yields batch k,
    so a GPU never waits for Python between batches; results still come in order, all of them, once."""
    net, processor = model
    dispatched = []

    class Recording:
        def encode_image(self, x):
            dispatched.append(x.shape[0])
            return net.encode_image(x)

    stream = iter_embeddings(Recording(), processor, photos[:5], batch_size=2)
    first = next(stream)
    assert dispatched == [2, 2]  # the second batch was started before the first came out
    items = [first, *stream]
    assert dispatched == [2, 2, 1] and [i.path for i in items] == photos[:5]
    expected = np.asarray(net.encode_image(processor(photos[:5])))
    np.testing.assert_allclose(np.stack([i.embedding for i in items]), expected, atol=1e-5)


def test_streaming_reads_only_a_few_batches_ahead(model, photos):
    """A generator of paths is pulled lazily: when the first result arrives, at most the first batch, the
    second (dispatched before the first is copied out) and the read-ahead (two batches) have been taken."""
    net, processor = model
    pulled = []

    def paths():
        for path in photos * 4:  # 48 inputs
            pulled.append(path)
            yield path

    stream = iter_embeddings(net, processor, paths(), batch_size=2)
    first = next(stream)
    assert first.error is None and len(pulled) <= 2 * 2 + 2 * 2 + 1
    stream.close()  # the consumer stops early: nothing more is read
    assert len(pulled) <= 2 * 2 + 2 * 2 + 1


def test_token_grids_and_varying_native_sizes(native, photos):
    """pool="none": the final normed token grid; the native checkpoint batches only images of one size."""
    net, processor = native
    items = list(iter_embeddings(net, processor, photos[:4], batch_size=4, pool="none"))
    for path, item in zip(photos[:4], items, strict=True):
        x = processor([path])
        expected = net.forward_intermediates(x, indices=[-1], norm=True)[0][0]
        assert item.embedding.shape == expected.shape
        np.testing.assert_allclose(item.embedding, np.asarray(expected), atol=tolerance(net, 1e-4))
    assert len({item.embedding.shape for item in items}) == 2  # 60x60 and 74x60 photos: two grids


def test_embed_images_collects_the_stream(model, photos):
    net, processor = model
    done = []
    result = embed_images(net, processor, photos[:3], batch_size=2, on_done=done.append)
    assert result.paths == photos[:3] and len(result.embeddings) == 3 and sum(done) == 3
    with pytest.raises(ConfigError, match="batch-size must be at least 1"):
        next(iter_embeddings(net, processor, photos, batch_size=0))
    with pytest.raises(ConfigError, match="unknown pooling"):
        next(iter_embeddings(net, processor, photos, pool="max"))


def test_save_writes_texts_under_text_and_keeps_non_ascii(tmp_path):
    result = EmbedResult(paths=["un café"], embeddings=[np.ones(3, np.float32)], kind="text")
    save(result, tmp_path / "t.jsonl")
    line = (tmp_path / "t.jsonl").read_text(encoding="utf-8")
    assert "café" in line and json.loads(line)["text"] == "un café"
    save(result, tmp_path / "t.npz")
    assert list(np.load(tmp_path / "t.npz")["texts"]) == ["un café"]
    with pytest.raises(ConfigError, match="is a directory"):
        save(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl", "t.npz"]  # no temporary files left


def test_model_info_is_the_identity(model, tmp_path):
    net, _ = model
    info = net.info
    assert info.family == "aimv2" and info.revision is None and info.dims["embed_dim"] == 128
    assert info.to_dict()["key"] == info.key and len(info.key) == 32


def test_processors_and_models_say_what_they_are(model):
    """repr of the processors; docstrings that help() shows for load and the public classes."""
    import aim_mlx.loading
    from aim_mlx.inputs.preprocess import LiTProcessor
    from aim_mlx.models.aimv2 import AIMv2VisionEncoder
    from aim_mlx.models.lit import AIMv2LiT

    _, processor = model
    assert repr(processor).startswith("ImageProcessor(") and "image_mean=" in repr(processor)
    for thing in (aim_mlx.load, aim_mlx.loading.load, LiTProcessor, AIMv2VisionEncoder, AIMv2LiT):
        assert thing.__doc__ and len(thing.__doc__.strip()) > 30, thing
