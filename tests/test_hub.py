"""checkpoints/hub.py against a fake Hugging Face cache in huggingface_hub's on-disk layout, offline."""

import json
import time

import numpy as np
import pytest
from fakehub import add_snapshot, add_tree_listing
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from safetensors.numpy import save

from aim_mlx.checkpoints import hub
from aim_mlx.checkpoints.variants import PINNED_REVISIONS
from aim_mlx.errors import ConfigError, ModelNotFoundError

REPO = "apple/aimv2-large-patch14-224"
PINNED = PINNED_REVISIONS["aimv2-large-patch14-224"]
MAIN = "0123456789abcdef0123456789abcdef01234567"  # what refs/main points at in the fake cache


@pytest.fixture(autouse=True)
def _no_network(network_attempts):
    """Every test here runs with sockets refused (conftest's guard)."""


def checkpoint(**extra: bytes) -> dict[str, bytes]:
    tensors = save({"trunk.post_trunk_norm.weight": np.ones(4, np.float32)})
    return {
        "config.json": json.dumps({"hidden_size": 4}).encode(),
        "preprocessor_config.json": b"{}",
        "model.safetensors": tensors,
        **extra,
    }


# What Apple's repos hold at the pinned revisions, and a pickle: resolve returns the snapshot folder whatever
# it holds; the allow-list is what keeps the duplicates from being downloaded.
APPLE_FILES = {"mlx_model.safetensors": b"mlx copy", "pytorch_model.bin": b"pickle"}


@pytest.fixture
def apple(cache):
    """AIMv2-L/224 cached at its pinned revision and at main; returns the two snapshot folders."""
    pinned = add_snapshot(cache, REPO, PINNED, checkpoint(**APPLE_FILES))
    main = add_snapshot(cache, REPO, MAIN, checkpoint(), ref="main")
    return pinned, main


def test_allow_list_fetches_one_copy_of_the_weights_and_no_pickles():
    repo_files = [
        ".gitattributes", "README.md", "config.json", "preprocessor_config.json",
        "model.safetensors", "mlx_model.safetensors", "pytorch_model.bin", "aim.pth", "flax_model.msgpack",
        "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "tokenizer.json", "vocab.json", "merges.txt", "onnx/model.onnx",
    ]  # fmt: skip
    fetched = set(filter_repo_objects(repo_files, allow_patterns=list(hub.ALLOW_PATTERNS)))
    assert fetched == {
        "config.json", "preprocessor_config.json", "model.safetensors",
        "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
    }  # fmt: skip


def test_table_id_defaults_to_the_pinned_revision(apple):
    pinned, _ = apple
    assert hub.resolve(REPO) == pinned
    assert (hub.resolve(REPO) / "config.json").is_symlink()  # the cache itself, not a copy


@pytest.mark.parametrize(
    "model_id", ["aimv2-large-patch14-224", "APPLE/AIMv2-Large-Patch14-224", "AIMV2-LARGE-PATCH14-224"]
)
def test_table_ids_without_owner_and_in_any_case(apple, model_id):
    assert hub.resolve(model_id) == apple[0]


def test_explicit_commit_revision(apple):
    assert hub.resolve(REPO, revision=MAIN) == apple[1]
    assert hub.resolve(REPO, revision=PINNED) == apple[0]


def test_branch_revision_reads_refs(apple):
    assert hub.resolve(REPO, revision="main") == apple[1]


def test_ids_outside_the_table_default_to_main(cache):
    folder = add_snapshot(cache, "someone/aimv2-mlx-4bit", MAIN, checkpoint(), ref="main")
    assert hub.resolve("someone/aimv2-mlx-4bit") == folder
    assert hub.is_cached("someone/aimv2-mlx-4bit")


def test_explicit_cache_dir_wins_over_the_default(apple, tmp_path):
    other = tmp_path / "other-cache"
    folder = add_snapshot(other, REPO, PINNED, checkpoint())
    assert hub.resolve(REPO, cache_dir=other) == folder
    assert not hub.is_cached("apple/aimv2-huge-patch14-224", cache_dir=other)


def test_complete_tree_listing_resolves_offline(cache):
    folder = add_snapshot(cache, REPO, PINNED, checkpoint(**APPLE_FILES))
    # README.md is listed but not cached: only the allow-list keeps huggingface_hub from asking for it.
    add_tree_listing(cache, REPO, PINNED, [*checkpoint(**APPLE_FILES), "README.md"])
    assert hub.resolve(REPO) == folder
    assert hub.is_cached(REPO)


def test_tree_listing_reveals_an_interrupted_download(cache):
    files = checkpoint()
    del files["model.safetensors"]
    add_snapshot(cache, REPO, PINNED, files)
    add_tree_listing(cache, REPO, PINNED, checkpoint())
    with pytest.raises(ModelNotFoundError, match=r"@ac764a2 .*local Hugging Face cache"):
        hub.resolve(REPO)
    assert not hub.is_cached(REPO)


def test_local_folder_is_returned_as_is(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name, data in checkpoint().items():
        (folder / name).write_bytes(data)
    assert hub.resolve(str(folder)) == folder
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.resolve("~/ckpt") == folder
    assert hub.is_cached(str(folder))


def test_revision_with_a_local_folder_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="only to hub ids"):
        hub.resolve(str(tmp_path), revision="main")


@pytest.mark.parametrize("path", ["./no-such-folder", "/no/such/folder", "~/no-such-folder", "../x"])
def test_missing_local_path(cache, path, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # relative paths and ~ name nothing, wherever the tests run
    monkeypatch.setenv("HOME", str(tmp_path / "here"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        hub.resolve(path)


def test_local_file_is_not_a_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file, not a folder"):
        hub.resolve(str(file))


def test_local_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelNotFoundError, match="no safetensors weights"):
        hub.resolve(str(tmp_path))


def test_uncached_model_offline_says_what_to_do(cache):
    with pytest.raises(ModelNotFoundError) as info:
        hub.resolve("apple/aimv2-huge-patch14-448")
    message = str(info.value)
    assert "\n" not in message
    assert "apple/aimv2-huge-patch14-448@44e6440" in message
    assert "HF_HUB_OFFLINE" in message
    assert (
        "hf download apple/aimv2-huge-patch14-448 --revision 44e6440a24a8ea966ad0deadf5399a22d852bcc0"
        in message
    )
    assert "local folder" in message
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


def test_uncached_branch_offline(apple):
    with pytest.raises(ModelNotFoundError, match="@v2 is not in the local Hugging Face cache"):
        hub.resolve(REPO, revision="v2")


@pytest.mark.parametrize(
    "model_id", ["", "a/b/c", "has space", "owner/", "-x", "a--b", "x..y", "owner/name?"]
)
def test_malformed_ids(cache, model_id):
    with pytest.raises(ModelNotFoundError, match="hub id"):
        hub.resolve(model_id)
    assert not hub.is_cached(model_id)


def test_snapshot_without_weights_names_what_is_missing(cache):
    add_snapshot(cache, REPO, PINNED, {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
    with pytest.raises(ModelNotFoundError, match=r"@ac764a2 has no safetensors weights.*hf download"):
        hub.resolve(REPO)
    assert not hub.is_cached(REPO)


def test_snapshot_without_config(cache):
    files = checkpoint()
    del files["config.json"]
    add_snapshot(cache, REPO, PINNED, files)
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        hub.resolve(REPO)


def test_sharded_snapshot_needs_every_shard(cache):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}).encode()
    files = {"config.json": b"{}", "model.safetensors.index.json": index, shards[0]: save({"a": np.ones(1)})}
    add_snapshot(cache, "someone/sharded", MAIN, files, ref="main")
    with pytest.raises(ModelNotFoundError, match="has no model-00002-of-00002.safetensors"):
        hub.resolve("someone/sharded")
    add_snapshot(cache, "someone/sharded", MAIN, {shards[1]: save({"b": np.ones(1)})})
    assert hub.is_cached("someone/sharded")


def test_is_cached(apple):
    assert hub.is_cached(REPO)
    assert hub.is_cached("aimv2-large-patch14-224", revision="main")
    assert not hub.is_cached(REPO, revision="v2")
    assert not hub.is_cached("apple/aimv2-3B-patch14-448")
    assert not hub.is_cached("./no-such-folder")


def test_the_network_guard_catches_a_download(cache, network_attempts, monkeypatch):
    """Online, an uncached model makes huggingface_hub open a socket: the guard must see it."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub backs off between retries
    with pytest.raises(ModelNotFoundError, match="the hub cannot be reached"):
        hub.resolve(REPO)
    assert network_attempts
    network_attempts.clear()


def test_a_cached_pinned_commit_needs_no_network_even_online(apple, network_attempts, monkeypatch):
    """Commits never change, so the pinned default loads from the cache without asking the hub."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.resolve(REPO) == apple[0]
    assert not network_attempts


# The repo ids as the hub spells them: huggingface.co/apple, and ml-aim's READMEs, which load the AIMv1
# models as apple/aim-600M ... apple/aim-7B. A hub cache keeps a repo under its own spelling
# (models--apple--aim-600M, case-sensitive on disk), so aim-mlx must ask for exactly these.
PUBLISHED = [
    *(
        f"apple/aimv2-{size}-patch14-{res}"
        for size in ("large", "huge", "1B", "3B")
        for res in (224, 336, 448)
    ),
    "apple/aimv2-large-patch14-224-distilled",
    "apple/aimv2-large-patch14-336-distilled",
    "apple/aimv2-large-patch14-native",
    "apple/aimv2-large-patch14-224-lit",
    "apple/aim-600M",
    "apple/aim-1B",
    "apple/aim-3B",
    "apple/aim-7B",
]


def test_every_variant_resolves_from_a_cache_laid_out_under_the_published_names(cache):
    from aim_mlx.checkpoints.variants import VARIANTS, find_variant

    assert sorted(v.repo_id for v in VARIANTS.values()) == sorted(PUBLISHED)
    for repo_id in PUBLISHED:
        add_snapshot(cache, repo_id, find_variant(repo_id).revision.ljust(40, "0")[:40], checkpoint(), "main")
    for repo_id in PUBLISHED:
        for spelling in (repo_id, repo_id.upper(), repo_id.lower(), repo_id.split("/")[1]):
            folder = hub.resolve(spelling)
            assert folder.parents[1].name == f"models--{repo_id.replace('/', '--')}", spelling
