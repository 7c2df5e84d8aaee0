"""`aim-mlx convert` on AIMv1's published pickles: tiny random models written as the per-model repos'
pytorch_model.bin and as apple/AIM's .pth pairs, converted from a fake hub cache or a local folder, loaded
without torch, and compared with the independent torch model (aimv1_checkpoints.py); the checksums ml-aim
publishes; pickles that are not plain state dicts; no torch; quantization."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from aimv1_checkpoints import PTH_STEMS, TINY, make_reference, write_checkpoint, write_pth_pair
from fakehub import add_folder, add_snapshot
from typer.testing import CliRunner

from aim_mlx.checkpoints import variants
from aim_mlx.cli import app
from aim_mlx.loading import load

runner = CliRunner()
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
LAST = range(14, 20)  # a 20-block tiny model: ml-aim's best layers for the 600M are 14-19, the last six too
X = np.random.default_rng(5).standard_normal((2, 224, 224, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def ref():
    """A 600M-shaped tiny model (width 96, 12 heads) with 20 blocks, so that "best" (14-19) is ml-aim's."""
    return make_reference(seed=11, num_blocks=20, probe_layers=LAST, **TINY["600M"])


def convert(*args) -> tuple[int, str]:
    result = runner.invoke(app, ["convert", *map(str, args)])
    return result.exit_code, result.output


def assert_matches(folder: Path, ref, rtol=1e-4) -> dict:
    """The converted folder's logits and features equal the torch model's; returns its config.json."""
    model, _ = load(str(folder))
    want = ref.outputs(X)
    pixels = mx.array(X)
    for ours, theirs in (
        (model.classify(pixels), want["logits"]),
        (model.encode_image(pixels), want["features"]),
    ):
        err = float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())
        assert err < rtol, err
    return json.loads((folder / "config.json").read_text())


def published_checksums(monkeypatch, paths) -> None:
    """Make the tiny files' own SHA-256 prefixes the published ones, as the real files' are."""
    for path in paths:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]
        monkeypatch.setitem(variants.AIMV1_SHA256, Path(path).name, digest)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_per_model_repos_pytorch_model_bin_converts_from_the_hub_cache(tmp_path, cache, ref):
    published = write_checkpoint(ref, tmp_path / "published", weights="pickle")
    add_folder(cache, "apple/aim-600M", COMMIT, published)
    code, output = convert("--hf-path", "apple/aim-600M", "--mlx-path", tmp_path / "aim-600M")
    assert code == 0, output
    config = assert_matches(tmp_path / "aim-600M", ref)
    assert (config["source_model"], config["source_revision"]) == ("apple/aim-600M", COMMIT)
    assert (config["probe"], config["probe_layers"]) == ("best", list(LAST))
    assert not list((tmp_path / "aim-600M").glob("*.bin")) and leftovers(tmp_path) == []


@pytest.mark.parametrize(("model_id", "probe"), [("aim-600M-2B-imgs", "best"), ("apple/aim-600M", "last")])
def test_the_combined_repos_pth_pair_converts_with_its_checksums(
    tmp_path, cache, monkeypatch, model_id, probe
):
    # ml-aim's names fetch apple/AIM's files, as its load_pretrained does; the per-model repos hold no
    # last-layers head, so --probe last fetches them too. A 20-block model: its last six are blocks 14-19, so
    # both heads of one tiny model are right for it, and the test checks the one the probe names was read.
    ref = make_reference(seed=12, num_blocks=20, probe_layers=LAST, **TINY["600M"])
    paths = write_pth_pair(ref, tmp_path / "pth", "600M", probe)
    published_checksums(monkeypatch, paths)
    add_snapshot(cache, "apple/AIM", COMMIT, {p.name: p.read_bytes() for p in paths}, ref="main")
    code, output = convert("--hf-path", model_id, "--probe", probe, "--mlx-path", tmp_path / "out")
    assert code == 0, output
    config = assert_matches(tmp_path / "out", ref)
    assert (config["source_model"], config["source_revision"], config["probe"]) == (
        "apple/AIM",
        COMMIT,
        probe,
    )
    assert config["probe_layers"] == list(LAST)
    assert "--probe " + probe in (tmp_path / "out" / "README.md").read_text()


def test_the_head_read_is_the_one_the_probe_names(tmp_path, monkeypatch):
    # Two heads beside one backbone, as apple/AIM holds them: each probe must pick its own file.
    last = make_reference(seed=13, num_blocks=20, probe_layers=LAST, **TINY["600M"])
    best = make_reference(seed=14, num_blocks=20, probe_layers=LAST, **TINY["600M"])
    best.load_state_dict(
        {**best.state_dict(), **{k: v for k, v in last.state_dict().items() if not k.startswith("head.")}}
    )
    paths = (
        write_pth_pair(last, tmp_path / "pth", "600M", "last")
        + write_pth_pair(best, tmp_path / "pth", "600M", "best")[1:]
    )
    published_checksums(monkeypatch, paths)
    for probe, model in (("last", last), ("best", best)):
        code, output = convert(
            "--hf-path", tmp_path / "pth", "--probe", probe, "--mlx-path", tmp_path / probe
        )
        assert code == 0, output
        assert_matches(tmp_path / probe, model)


def test_a_checksum_mismatch_is_refused_and_no_verify_accepts(tmp_path, ref):
    paths = write_pth_pair(ref, tmp_path / "pth", "600M", "best")  # the published prefixes: not these files'
    for source in (tmp_path / "pth", paths[0]):  # a folder, or one of its files
        code, output = convert("--hf-path", source, "--mlx-path", tmp_path / "out")
        assert code == 1
        assert output.strip().splitlines() == [
            f"error: {PTH_STEMS['600M']}_attnprobe_backbone.pth has SHA-256 "
            f"{hashlib.sha256(paths[0].read_bytes()).hexdigest()[:8]}..., not the 0d6f6b8f ml-aim publishes: "
            "download it again (or pass --no-verify for a file you trained yourself)"
        ]
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    code, output = convert("--hf-path", paths[1], "--no-verify", "--mlx-path", tmp_path / "out")
    assert code == 0, output
    assert_matches(tmp_path / "out", ref)


REFUSED = "refused unread by torch's weights-only loader"


def _ran(marker: str) -> None:
    Path(marker).touch()


class Payload:
    """Unpickling this calls _ran: what a malicious pickle would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_ran, (self.marker,))


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ("payload", f"{REFUSED} (Unsupported global: GLOBAL test_aimv1_convert._ran"),
        ("nested", "is not a plain state dict (tensor names to tensors)"),
        ("garbage", f"{REFUSED} (Unsupported operand"),
        ("truncated", "is not a readable torch checkpoint"),
    ],
)  # fmt: skip
def test_a_pickle_that_is_not_a_plain_state_dict_is_refused(tmp_path, ref, content, line):
    published = write_checkpoint(ref, tmp_path / "published", weights="pickle")
    marker, weights = tmp_path / "ran", published / "pytorch_model.bin"
    if content == "payload":
        torch.save({"trunk.blocks.0.attn.qkv.weight": Payload(marker)}, weights)
    elif content == "nested":
        torch.save({"state_dict": torch.load(weights, weights_only=True), "epoch": 3}, weights)
    elif content == "garbage":
        weights.write_bytes(b"not a pickle")
    else:  # an interrupted download
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, output = convert("--hf-path", published, "--mlx-path", tmp_path / "out")
    assert code == 1 and len(output.strip().splitlines()) == 1, output
    assert output.startswith("error: pytorch_model.bin ") and line in output, output
    assert not marker.exists() and not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    if content == "payload":  # the file does run code when unpickled without weights_only
        torch.load(weights, weights_only=False)
        assert marker.exists()


def test_without_torch_one_line_names_the_extra(tmp_path, ref, monkeypatch):
    published = write_checkpoint(ref, tmp_path / "published", weights="pickle")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if it were not installed
    code, output = convert("--hf-path", published, "--mlx-path", tmp_path / "out")
    assert (code, output.strip()) == (1, "error: torch is not installed; pip install 'aim-mlx[pth]'")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_file_missing_from_the_offline_cache_names_the_download(tmp_path, cache):
    code, output = convert("--hf-path", "aim-600M-2B-imgs", "--mlx-path", tmp_path / "out")
    assert code == 1 and len(output.strip().splitlines()) == 1, output
    stem = f"{PTH_STEMS['600M']}_attnprobe"
    assert (
        f"`hf download apple/AIM --revision main {stem}_backbone.pth {stem}_head_best_layers.pth`" in output
    )


def test_the_combined_repo_alone_is_ambiguous(tmp_path, cache):
    code, output = convert("--hf-path", "apple/AIM", "--mlx-path", tmp_path / "out")
    assert code == 1 and "apple/AIM holds all four AIMv1 models; name one as ml-aim does" in output


def test_a_quantized_conversion_quantizes_trunk_and_head_and_stays_close(tmp_path, ref):
    published = write_checkpoint(ref, tmp_path / "published", weights="pickle")
    logits = ref.outputs(X)["logits"]
    for bits, floor in ((8, 0.999), (4, 0.98)):
        out = tmp_path / f"q{bits}"
        code, output = convert(
            "--hf-path", published, "--mlx-path", out, "-q", "--q-bits", bits, "--q-group-size", 32
        )
        assert code == 0, output
        model, _ = load(str(out))
        quantized = {path for path, m in model.named_modules() if type(m).__name__ == "QuantizedLinear"}
        assert {"head.k", "head.v", "head.linear", "blocks.0.attn.qkv", "blocks.19.mlp.fc2"} <= quantized
        assert len(quantized) == 3 + 4 * 20
        ours = np.asarray(model.classify(mx.array(X)))
        cosine = (ours * logits).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(logits, axis=1)
        assert cosine.min() > floor, (bits, cosine)
        assert cosine.min() < 1 - 1e-7  # it is quantized: not the float logits


def test_loading_a_converted_folder_never_imports_torch(tmp_path, ref):
    published = write_checkpoint(ref, tmp_path / "published", weights="pickle")
    code, output = convert("--hf-path", published, "--mlx-path", tmp_path / "out")
    assert code == 0, output
    script = (
        "import sys, numpy as np, mlx.core as mx, aim_mlx\n"
        f"model, processor = aim_mlx.load({str(tmp_path / 'out')!r})\n"
        "print(np.asarray(model.classify(mx.zeros((1, 224, 224, 3)))).shape, 'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["(1,", "1000)", "False"]


def test_a_pickle_beside_a_config_that_is_not_aimv1s_is_refused(tmp_path):
    folder = tmp_path / "aimv2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 96, "num_hidden_layers": 2}))
    torch.save({"trunk.post_trunk_norm.weight": torch.ones(96)}, folder / "pytorch_model.bin")
    code, output = convert("--hf-path", folder, "--mlx-path", tmp_path / "out")
    assert code == 1 and len(output.strip().splitlines()) == 1, output
    assert "aim-mlx converts pickles of AIMv1 only" in output and not (tmp_path / "out").exists()
