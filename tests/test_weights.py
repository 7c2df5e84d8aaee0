"""Checkpoint files: truncated and corrupt files, config/weights mismatches, pickles, shards, layouts."""

import json
import os
import pickle
import struct

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TINY, make_reference, write_checkpoint
from mlx.utils import tree_flatten
from safetensors.numpy import load_file as st_load
from safetensors.numpy import save_file

import aim_mlx
from aim_mlx.checkpoints import layouts, weights
from aim_mlx.errors import AimMlxError, ModelNotFoundError, WeightsError
from aim_mlx.models.aimv2 import AIMv2VisionEncoder
from aim_mlx.models.config import VisionConfig

DIMS = TINY["large"]
FILE = {"hf": "model.safetensors", "apple": "model.safetensors", "mlx": "mlx_model.safetensors"}
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def ref():
    return make_reference(seed=11, image_size=56, **DIMS)


def rewrite(path, state: dict[str, np.ndarray]) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path), metadata={"format": "pt"})


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def our_keys(**dims) -> set[str]:
    """Parameter names of an aim-mlx model built from a config, independently of any checkpoint."""
    config = VisionConfig.from_dict({"image_size": 56, "num_hidden_layers": 2, **DIMS, **dims})
    return {k for k, _ in tree_flatten(AIMv2VisionEncoder(config).parameters())}


def block_suffixes(folder) -> list[str]:
    """What one block holds, read from an Apple-layout file written by tests/checkpoints.py."""
    return sorted(
        k.removeprefix("trunk.blocks.0.")
        for k in st_load(str(folder / "model.safetensors"))
        if k.startswith("trunk.blocks.0.")
    )


def listed(names: list[str]) -> str:
    """How load_into lists names: sorted, the first five, then how many more."""
    names = sorted(names)
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def load_error(folder) -> str:
    """The message of the WeightsError aim_mlx.load raises for `folder`."""
    with pytest.raises(WeightsError) as info:
        aim_mlx.load(str(folder), dtype="float32")
    return str(info.value)


def mismatch(folder) -> str:
    """What load_into lists for a config/weights mismatch (the part after the folder's name)."""
    message = load_error(folder)
    prefix = f"{folder} does not match config.json; "
    assert message.startswith(prefix)
    return message.removeprefix(prefix)


# --- truncated and corrupt files ------------------------------------------------------------------------


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


CUTS = {
    "one byte short": lambda data: len(data) - 1,
    "half the tensor data": lambda data: 8 + _header_len(data) + (len(data) - 8 - _header_len(data)) // 2,
    "inside the header": lambda data: 8 + _header_len(data) // 2,
    "inside the length prefix": lambda data: 5,
    "empty": lambda data: 0,
}


@pytest.mark.parametrize("layout", ["hf", "apple", "mlx"])
@pytest.mark.parametrize("cut", list(CUTS))
def test_truncated_file(ref, tmp_path, layout, cut):
    folder = write_checkpoint(ref, tmp_path, layout)
    path = folder / FILE[layout]
    layouts.sanitize(weights.read_folder(folder))  # intact, it loads
    data = path.read_bytes()
    path.write_bytes(data[: CUTS[cut](data)])
    with pytest.raises(WeightsError) as info:
        layouts.sanitize(weights.read_folder(folder))
    message = str(info.value)
    assert str(path) in message
    assert "download it again" in message
    assert "\n" not in message
    assert str(path) in load_error(folder)


def _garbage_header(data: bytes) -> bytes:
    n = _header_len(data)
    return data[:8] + np.random.default_rng(1).bytes(n) + data[8 + n :]


def _json_list_header(data: bytes) -> bytes:
    n = _header_len(data)
    return data[:8] + (b"[]" + b" " * (n - 2)) + data[8 + n :]


def _string_offsets(data: bytes) -> bytes:
    n = _header_len(data)
    header = json.loads(data[8 : 8 + n])
    for key, entry in header.items():
        if key != "__metadata__":
            entry["data_offsets"] = [str(x) for x in entry["data_offsets"]]
    new = json.dumps(header).encode()
    return struct.pack("<Q", len(new)) + new + data[8 + n :]


def _unknown_dtype(data: bytes) -> bytes:
    n = _header_len(data)
    header = data[8 : 8 + n].replace(b'"F32"', b'"Q32"')
    assert header != data[8 : 8 + n]
    return data[:8] + header + data[8 + n :]


CORRUPTIONS = {
    "random bytes": lambda data: np.random.default_rng(0).bytes(len(data)),
    "garbage header": _garbage_header,
    "header is a JSON list": _json_list_header,
    "string data offsets": _string_offsets,
    "unknown dtype": _unknown_dtype,
    "not safetensors at all": lambda data: b"<html>rate limited</html>\n" * 40,
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_file(ref, tmp_path, corruption):
    folder = write_checkpoint(ref, tmp_path, "apple")
    path = folder / "model.safetensors"
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    with pytest.raises(WeightsError) as info:
        weights.load_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "download it again" in message
    assert str(path) in load_error(folder)


# --- config.json and weights that disagree --------------------------------------------------------------


def test_config_with_more_layers_than_the_weights(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "apple")
    edit_config(folder, num_hidden_layers=3)
    missing = [f"blocks.2.{s}" for s in block_suffixes(folder)]
    message = mismatch(folder)
    assert f"missing: {listed(missing)}" in message
    assert "unexpected" not in message and "mis-shaped" not in message
    assert len(missing) > 5 and f"(+{len(missing) - 5} more)" in message
    assert set(missing) == our_keys(num_hidden_layers=3) - our_keys()  # what a 3-block model adds


def test_config_with_fewer_layers_than_the_weights(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "hf")
    edit_config(folder, num_hidden_layers=1)
    unexpected = [f"blocks.1.{s}" for s in block_suffixes(write_checkpoint(ref, tmp_path / "a", "apple"))]
    message = mismatch(folder)
    assert f"unexpected: {listed(unexpected)}" in message
    assert "missing" not in message and "mis-shaped" not in message


def test_config_with_another_hidden_size(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "apple")
    wrong = DIMS["hidden_size"] + 64
    edit_config(folder, hidden_size=wrong)
    message = mismatch(folder)
    assert "mis-shaped: " in message
    assert "missing" not in message and "unexpected" not in message
    d = DIMS["hidden_size"]
    assert f"blocks.0.attn.proj.weight ({d}, {d}) != ({wrong}, {wrong})" in message
    # The first five mis-shaped names in sorted order: all blocks.0 parameters.
    shown = message.split("mis-shaped: ")[1]
    assert shown.count("blocks.0.") == 5 and "more)" in shown


def test_config_with_another_mlp_width(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "mlx")
    m = DIMS["intermediate_size"]
    edit_config(folder, intermediate_size=m + 8)
    message = mismatch(folder)
    d = DIMS["hidden_size"]
    assert f"blocks.0.mlp.fc1.weight ({m}, {d}) != ({m + 8}, {d})" in message
    assert f"blocks.0.mlp.fc2.weight ({d}, {m}) != ({d}, {m + 8})" in message
    assert "attn" not in message and "norm" not in message


def test_extra_tensor_in_the_file(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "apple")
    path = folder / "model.safetensors"
    state = st_load(str(path))
    state["trunk.blocks.0.attn.extra.weight"] = np.zeros((4, 4), np.float32)
    rewrite(path, state)
    message = mismatch(folder)
    assert "unexpected: blocks.0.attn.extra.weight" in message
    assert "missing" not in message and "mis-shaped" not in message


def test_tensor_missing_from_the_file(ref, tmp_path):
    # transformers' config says is_native: false, so a missing position table is an error. (Apple's configs
    # have no such key: there a checkpoint without the table is the native one; see test_load.py.)
    folder = write_checkpoint(ref, tmp_path, "hf")
    path = folder / "model.safetensors"
    state = st_load(str(path))
    del state["rms_norm.weight"], state["embeddings.position_embedding.weight"]
    rewrite(path, state)
    message = mismatch(folder)
    assert "missing: pos_embed, post_trunk_norm.weight" in message
    assert "unexpected" not in message


def test_hf_attention_without_all_of_q_k_v(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "hf")
    path = folder / "model.safetensors"
    state = st_load(str(path))
    del state["encoder.layers.1.attention.k_proj.weight"]
    rewrite(path, state)
    assert "layer 1: attention weight has only ['q', 'v']" in load_error(folder)


def test_matching_config_loads(ref, tmp_path):
    """The control for the tests above: the unedited folder loads without complaint."""
    for layout in ("hf", "apple", "mlx"):
        model, _ = aim_mlx.load(str(write_checkpoint(ref, tmp_path / layout, layout)), dtype="float32")
        assert {k for k, _ in tree_flatten(model.parameters())} == our_keys()


# --- pickles are refused, never opened ------------------------------------------------------------------


class Payload:
    """Unpickling this creates the folder `marker`: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def unpickled(monkeypatch):
    """Records every call to pickle's and torch's loaders."""
    import torch

    calls = []

    def recorder(name, real):
        def record(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return record

    monkeypatch.setattr(pickle, "load", recorder("pickle.load", pickle.load))
    monkeypatch.setattr(pickle, "loads", recorder("pickle.loads", pickle.loads))
    monkeypatch.setattr(torch, "load", recorder("torch.load", torch.load))
    return calls


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.is_dir()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "aim.pth", "model.pt", "model.ckpt"])
def test_pickle_only_folder_is_refused(ref, tmp_path, unpickled, name):
    folder, marker = tmp_path / "ckpt", tmp_path / "marker"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ref.config.to_dict()))
    (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(WeightsError) as info:
        layouts.sanitize(weights.read_folder(folder))
    assert f"only pickled weights ({name})" in str(info.value)
    assert "never unpickles" in str(info.value)
    with pytest.raises(AimMlxError, match="safetensors"):
        aim_mlx.load(str(folder))
    assert not marker.exists() and not unpickled


def test_index_pointing_at_pickled_shards_is_refused(ref, tmp_path, unpickled):
    folder, marker = tmp_path / "ckpt", tmp_path / "marker"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ref.config.to_dict()))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    index = {"weight_map": {"rms_norm.weight": "pytorch_model.bin"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="never unpickles"):
        aim_mlx.load(str(folder))
    assert not marker.exists() and not unpickled


def test_pickle_named_safetensors_is_refused(ref, tmp_path, unpickled):
    folder, marker = write_checkpoint(ref, tmp_path / "ckpt", "hf"), tmp_path / "marker"
    (folder / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    assert "not a valid safetensors file" in load_error(folder)
    assert not marker.exists() and not unpickled


def test_single_pickled_file_is_refused(tmp_path, unpickled):
    path, marker = tmp_path / "model.pth", tmp_path / "marker"
    path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(WeightsError, match="never unpickles"):
        weights.load_file(path)
    assert not marker.exists() and not unpickled


# --- sharded checkpoints --------------------------------------------------------------------------------


def shard(folder, layout: str) -> dict[str, str]:
    """Split the folder's single file over two shards (alternating keys) with an index; returns the map."""
    single = folder / FILE[layout]
    state = st_load(str(single))
    keys = sorted(state)
    weight_map = {k: SHARDS[i % 2] for i, k in enumerate(keys)}
    for name in SHARDS:
        rewrite(folder / name, {k: state[k] for k in keys if weight_map[k] == name})
    total = sum(v.nbytes for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / weights.INDEX_FILE).write_text(json.dumps(index, indent=2))
    single.unlink()
    return weight_map


@pytest.mark.parametrize("layout", ["hf", "apple"])
def test_sharded_checkpoint_loads_like_the_single_file(ref, tmp_path, layout):
    single = write_checkpoint(ref, tmp_path / "single", layout)
    sharded = write_checkpoint(ref, tmp_path / "sharded", layout)
    weight_map = shard(sharded, layout)
    assert set(weight_map.values()) == set(SHARDS)
    if layout == "hf":  # q, k and v of one layer live in different shards
        assert len({weight_map[f"encoder.layers.0.attention.{x}_proj.weight"] for x in "qkv"}) == 2
    assert weights.weight_files(sharded) == [sharded / s for s in SHARDS]
    a, b = layouts.sanitize(weights.read_folder(single)), layouts.sanitize(weights.read_folder(sharded))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]) for k in a)
    pixels = mx.array(np.random.default_rng(2).standard_normal((1, 56, 56, 3)).astype(np.float32))
    model_a, _ = aim_mlx.load(str(single), dtype="float32")
    model_b, _ = aim_mlx.load(str(sharded), dtype="float32")
    assert mx.array_equal(model_a(pixels).last_hidden_state, model_b(pixels).last_hidden_state)


def test_missing_shard(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "hf")
    shard(folder, "hf")
    (folder / SHARDS[1]).unlink()
    with pytest.raises(WeightsError) as info:
        layouts.sanitize(weights.read_folder(folder))
    assert str(folder / SHARDS[1]) in str(info.value)
    assert "listed in model.safetensors.index.json but missing" in str(info.value)
    # Through load(), the hub layer checks the folder first and names the missing shard too.
    with pytest.raises(ModelNotFoundError, match=f"has no {SHARDS[1]}"):
        aim_mlx.load(str(folder))


def test_truncated_shard(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "hf")
    shard(folder, "hf")
    path = folder / SHARDS[0]
    path.write_bytes(path.read_bytes()[:-16])
    message = load_error(folder)
    assert str(path) in message and "truncated" in message and "download it again" in message


@pytest.mark.parametrize(
    "index",
    [
        "not json",
        "[1, 2]",
        '{"shards": {}}',
        '{"weight_map": ["a.safetensors"]}',
        '{"weight_map": {"a": 1}}',
        '{"weight_map": {"a": "../outside.safetensors"}}',
    ],
)
def test_malformed_index(ref, tmp_path, index):
    folder = write_checkpoint(ref, tmp_path, "hf")
    (folder / weights.INDEX_FILE).write_text(index)
    with pytest.raises(WeightsError, match="is not a valid safetensors index"):
        weights.weight_files(folder)
    if "1}" not in index:  # that one: see the next test
        assert f"{folder / weights.INDEX_FILE} is not a valid safetensors index" in load_error(folder)


def test_malformed_index_with_non_string_shard_names_through_load(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "hf")
    (folder / weights.INDEX_FILE).write_text('{"weight_map": {"a": 1}}')
    assert "is not a valid safetensors index" in load_error(folder)


# --- layouts --------------------------------------------------------------------------------------------


def test_detect_layout(ref, tmp_path):
    for layout, expected in (("hf", "hf"), ("apple", "apple"), ("mlx", "apple")):
        folder = write_checkpoint(ref, tmp_path / layout, layout)
        assert layouts.detect_layout(st_load(str(folder / FILE[layout]))) == expected
    hf = st_load(str(tmp_path / "hf" / "model.safetensors"))
    assert layouts.detect_layout({f"vision_model.{k}" for k in hf}) == "hf"
    assert layouts.detect_layout(our_keys()) == "aim-mlx"


def test_unknown_key_naming(tmp_path):
    keys = {"visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight", "head.fc.bias"}
    with pytest.raises(WeightsError, match="unrecognised checkpoint layout") as info:
        layouts.detect_layout(keys)
    assert str(sorted(keys)[:3]) in str(info.value)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 128, "num_attention_heads": 8}))
    rewrite(folder / "model.safetensors", {k: np.ones(2, np.float32) for k in keys})
    assert "unrecognised checkpoint layout" in load_error(folder)


def test_checkpoint_without_tensors(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    rewrite(folder / "model.safetensors", {})
    assert "unrecognised checkpoint layout" in load_error(folder)


def test_sanitize_maps_every_layout_onto_the_model_and_is_idempotent(ref, tmp_path):
    expected = our_keys()
    sanitized = {}
    for layout in ("hf", "apple", "mlx"):
        once = layouts.sanitize(weights.read_folder(write_checkpoint(ref, tmp_path / layout, layout)))
        assert once.keys() == expected
        assert once["patch_embed.proj.weight"].shape == (DIMS["hidden_size"], 14, 14, 3)  # OHWI
        assert once["pos_embed"].shape == ((56 // 14) ** 2, DIMS["hidden_size"])
        twice = layouts.sanitize(once)
        assert twice.keys() == once.keys()
        assert all(mx.array_equal(once[k], twice[k]) for k in once)
        sanitized[layout] = once
    for layout in ("apple", "mlx"):  # the three layouts hold the same tensors
        assert all(mx.array_equal(sanitized["hf"][k], sanitized[layout][k]) for k in expected)


def test_sanitize_of_a_models_own_parameters_is_a_no_op():
    config = VisionConfig.from_dict({"image_size": 56, "num_hidden_layers": 2, **DIMS})
    params = dict(tree_flatten(AIMv2VisionEncoder(config).parameters()))
    out = layouts.sanitize(params)
    assert out.keys() == params.keys()
    assert all(out[k] is params[k] for k in params)


def test_hf_keys_with_vision_model_prefix(ref, tmp_path):
    folder = write_checkpoint(ref, tmp_path, "hf")
    plain = layouts.sanitize(weights.read_folder(folder))
    path = folder / "model.safetensors"
    rewrite(path, {f"vision_model.{k}": v for k, v in st_load(str(path)).items()})
    prefixed = layouts.sanitize(weights.read_folder(folder))
    assert prefixed.keys() == plain.keys()
    assert all(mx.array_equal(plain[k], prefixed[k]) for k in plain)


@pytest.mark.parametrize("layout", ["apple", "mlx", "hf"])
def test_to_transformers_gives_back_the_reference_state_dict(ref, tmp_path, layout):
    ours = layouts.sanitize(weights.read_folder(write_checkpoint(ref, tmp_path, layout)))
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    back = layouts.to_transformers(ours)
    assert back.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_array_equal(np.asarray(back[key]), value, err_msg=key)
    again = layouts.sanitize(back)
    assert again.keys() == ours.keys() and all(mx.array_equal(again[k], ours[k]) for k in ours)
