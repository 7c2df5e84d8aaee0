"""aim-mlx's encoder against transformers' Aimv2VisionModel: patch embedding, every hidden state, output."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import LARGE, TINY, make_reference, reference_outputs, write_checkpoint

from aim_mlx import _blas, quantized, weights
from aim_mlx.config import VisionConfig
from aim_mlx.models import aimv2, cpu
from aim_mlx.models.aimv2 import AIMv2VisionEncoder


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def build_ours(folder, native: bool | None = None) -> AIMv2VisionEncoder:
    import json

    raw = json.loads((folder / "config.json").read_text())
    config = VisionConfig.from_dict(raw)
    state = weights.load_folder(folder)
    config.is_native = "pos_embed" not in state if native is None else native
    model = AIMv2VisionEncoder(config)
    weights.load_into(model, state)
    return model


def assert_parity(model, ref_model, pixels, tol):
    ref = reference_outputs(ref_model, pixels)
    x = mx.array(pixels)
    out = model(x, output_hidden_states=True)
    assert rel_err(model.patch_embed(x), ref["patch_embed"]) < tol
    assert len(out.hidden_states) == len(ref["hidden_states"])
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref["hidden_states"], strict=True)):
        assert rel_err(ours, theirs) < tol, f"hidden state {i}"
    assert rel_err(out.last_hidden_state, ref["last_hidden_state"]) < tol
    pooled = ref["last_hidden_state"].mean(axis=1)
    assert rel_err(model.encode_image(x), pooled) < tol


@pytest.fixture
def count_parallel(monkeypatch):
    """Calls of models/cpu.py's trunks: the batch shares' (their count), the numpy one's ("numpy")."""
    calls = []
    real_blocks, real_trunk = cpu.run_blocks, cpu.run_trunk

    def blocks(blocks, x, n_workers, keep_hidden=False):
        calls.append(n_workers)
        return real_blocks(blocks, x, n_workers, keep_hidden)

    def trunk(blocks, x, keep_hidden=False):
        calls.append("numpy")
        return real_trunk(blocks, x, keep_hidden)

    monkeypatch.setattr(cpu, "run_blocks", blocks)
    monkeypatch.setattr(cpu, "run_trunk", trunk)
    return calls


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("layout", ["hf", "apple", "mlx"])
# One trunk: numpy's, or MLX's loop of blocks (quantized layers take it). Two uneven batch shares (2 + 1):
# each running numpy's trunk, or MLX's loop on its own stream.
@pytest.mark.parametrize("trunk", ["numpy", "loop", "shares", "shares of loops"])
def test_tiny_families(tmp_path, family, layout, trunk, monkeypatch, count_parallel):
    monkeypatch.setenv("AIM_MLX_CPU_WORKERS", "2" if trunk.startswith("shares") else "1")
    if "loop" in trunk:
        monkeypatch.setattr(cpu, "trunk_ready", lambda x, blocks: False)
    ref = make_reference(seed=hash(family) % 1000, image_size=56, **TINY[family])
    model = build_ours(write_checkpoint(ref, tmp_path, layout))
    pixels = np.random.default_rng(1).standard_normal((3, 56, 56, 3)).astype(np.float32)
    assert_parity(model, ref, pixels, tol=1e-4)
    calls = {  # for the hidden states, then for encode_image
        "numpy": ["numpy"] * 2,
        "loop": [],
        "shares": [2, "numpy", "numpy"] * 2,
        "shares of loops": [2, 2],
    }[trunk]
    assert sorted(map(str, count_parallel)) == sorted(map(str, calls if _blas.loaded() else []))


@pytest.mark.parametrize("share", ["numpy", "loop"])  # each share's trunk: numpy's, or MLX's loop of blocks
def test_batch_shares_pass_errors_on_and_restore_blas_threads(tmp_path, monkeypatch, count_parallel, share):
    monkeypatch.setenv("AIM_MLX_CPU_WORKERS", "2")
    if share == "loop":
        monkeypatch.setattr(cpu, "trunk_ready", lambda x, blocks: False)
    model = build_ours(write_checkpoint(make_reference(seed=2, **TINY["large"]), tmp_path, "hf"))
    before = _blas.threads()

    def boom(*args, **kwargs):
        raise RuntimeError("boom in a worker")

    monkeypatch.setattr(cpu, "_silu_mul", boom)  # SiLU·up, in every share's trunk
    with pytest.raises(RuntimeError, match="boom in a worker"):
        model(mx.zeros((2, 56, 56, 3)))
    assert count_parallel == [2] + (["numpy", "numpy"] if share == "numpy" else [])  # both shares started
    assert _blas.threads() == before


def test_split_covers_every_item_on_every_core_and_passes_errors_on():
    import threading

    seen, threads = [], set()

    def record(lo, hi):
        seen.extend(range(lo, hi))
        threads.add(threading.get_ident())

    cpu.split(record, 7)
    assert sorted(seen) == list(range(7)) and len(threads) == min(7, _blas.threads())
    before = _blas.threads()

    def boom(lo, hi):
        if hi == 4:  # the last share: a worker's when there are two cores
            raise RuntimeError("boom in a share")

    with pytest.raises(RuntimeError, match="boom in a share"):
        cpu.split(boom, 4)
    assert _blas.threads() == before


@pytest.mark.skipif(not _blas.loaded(), reason="cpu.py's kernels need the fast BLAS (Linux)")
@pytest.mark.parametrize("group", [1, 2, 5])  # heads a thread takes at once; 2 splits images unevenly
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_in_groups_of_heads(group, causal, monkeypatch):
    """3 images x 5 heads in two shares (8 + 7 heads): groups stop at a share's and an image's end."""
    b, n, heads, hd = 3, 11, 5, 4
    monkeypatch.setattr(cpu, "SCORES_BYTES", group * 4 * n * n)
    monkeypatch.setenv("AIM_MLX_CPU_WORKERS", "2")  # the two shares, on any machine
    qkv = np.random.default_rng(7).standard_normal((b, n, 3 * heads * hd)).astype(np.float32)
    q, k, v = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # each (B, H, N, hd)
    scores = q @ k.swapaxes(-1, -2) * 0.5
    if causal:
        scores[..., np.triu(np.ones((n, n), dtype=bool), 1)] = -np.inf
    w = np.exp(scores - scores.max(-1, keepdims=True))
    expected = ((w / w.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, n, heads * hd)
    ours = cpu.attention(mx.array(qkv), heads, 0.5, causal)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _blas.loaded(), reason="cpu.py's kernels need the fast BLAS (Linux)")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_numpy_trunk_matches_the_mlx_blocks(bias, causal):
    """run_trunk against the blocks' own MLX loop: every hidden state, with biases (no AIMv2 checkpoint has
    them, the config allows them) and causal attention (the LiT text tower's blocks)."""
    config = VisionConfig(**TINY["large"], qkv_bias=bias, mlp_bias=bias)
    blocks = [aimv2.Block(config, causal=causal) for _ in range(3)]
    for block in blocks:  # MLX initialises the norm weights to one
        for norm in (block.norm_1, block.norm_2):
            norm.weight = 1 + 0.2 * mx.random.normal(norm.weight.shape)
    x = mx.random.normal((2, 9, config.hidden_size), key=mx.random.key(3))
    expected = [x]
    for block in blocks:
        expected.append(block(expected[-1]))
    assert cpu.trunk_ready(x, blocks)
    out, hidden = cpu.run_trunk(blocks, x, keep_hidden=True)
    assert len(hidden) == 4 and rel_err(out, np.asarray(expected[-1])) < 1e-5
    for ours, theirs in zip(hidden, expected, strict=True):
        assert rel_err(ours, np.asarray(theirs)) < 1e-5
    x_only, none = cpu.run_trunk(blocks, x)
    assert none is None and mx.array_equal(x_only, out)


def test_numpy_trunk_takes_float32_and_aim_mlx_quantized_layers_only():
    config = VisionConfig(**TINY["large"])
    blocks = [aimv2.Block(config) for _ in range(2)]
    x = mx.zeros((1, 4, config.hidden_size))
    assert cpu.trunk_ready(x, blocks) == _blas.loaded()
    assert not cpu.trunk_ready(x.astype(mx.float16), blocks)
    quantized.quantize(blocks[0], {"group_size": 32, "bits": 4, "mode": quantized.MODE})
    assert cpu.trunk_ready(x, blocks) == _blas.loaded()
    nn.quantize(blocks[1], group_size=32, bits=4)  # MLX's own layer: its quantized matmul, in MLX's loop
    assert not cpu.trunk_ready(x, blocks)


@pytest.mark.skipif(not _blas.loaded(), reason="cpu.py's kernels need the fast BLAS (Linux)")
def test_numpy_trunk_unpacks_quantized_layers_as_the_mlx_loop_does():
    """4-bit attention, 8-bit MLP: run_trunk against the blocks' MLX loop (QuantizedLinear's CPU path)."""
    config = VisionConfig(**TINY["large"])
    blocks = [aimv2.Block(config) for _ in range(2)]
    for block in blocks:
        quantized.quantize(block.attn, {"group_size": 32, "bits": 4, "mode": quantized.MODE})
        quantized.quantize(block.mlp, {"group_size": 32, "bits": 8, "mode": quantized.MODE})
    x = mx.random.normal((2, 9, config.hidden_size), key=mx.random.key(4))
    expected = x
    for block in blocks:
        expected = block(expected)
    out, _ = cpu.run_trunk(blocks, x)
    assert rel_err(out, np.asarray(expected)) < 1e-5


@pytest.mark.parametrize("layout", ["hf", "apple"])
@pytest.mark.parametrize("hw", [(70, 42), (42, 98), (84, 84)])
def test_native_non_square_grids(tmp_path, layout, hw):
    ref = make_reference(seed=3, is_native=True, **TINY["large"])
    model = build_ours(write_checkpoint(ref, tmp_path, layout))
    assert model.config.is_native and "pos_embed" not in dict(model.parameters())
    pixels = np.random.default_rng(2).standard_normal((1, *hw, 3)).astype(np.float32)
    assert_parity(model, ref, pixels, tol=1e-4)


def test_conv_floors_trailing_pixels(tmp_path):
    """Like the reference conv, pixels that fill no whole patch are dropped (native, 75x50 -> 5x3 grid)."""
    ref = make_reference(seed=4, is_native=True, **TINY["large"])
    model = build_ours(write_checkpoint(ref, tmp_path, "hf"))
    pixels = np.random.default_rng(3).standard_normal((1, 75, 50, 3)).astype(np.float32)
    assert_parity(model, ref, pixels, tol=1e-4)


def test_three_layouts_identical(tmp_path):
    ref = make_reference(seed=5, **TINY["huge"])
    pixels = mx.array(np.random.default_rng(4).standard_normal((1, 56, 56, 3)).astype(np.float32))
    outs = [
        build_ours(write_checkpoint(ref, tmp_path / lay, lay))(pixels).last_hidden_state
        for lay in ("hf", "apple", "mlx")
    ]
    assert all(mx.array_equal(outs[0], o) for o in outs[1:])


def test_sanitize_is_idempotent(tmp_path):
    ref = make_reference(seed=6, **TINY["large"])
    for layout in ("hf", "apple", "mlx"):
        once = weights.load_folder(write_checkpoint(ref, tmp_path / layout, layout))
        twice = weights.sanitize(once)
        assert once.keys() == twice.keys()
        assert all(mx.array_equal(once[k], twice[k]) for k in once)


def test_mlx_kernels_path(tmp_path, monkeypatch):
    """The path Apple GPUs and half precision take (mx.fast.sdpa, MLX's silu) against the reference too."""
    monkeypatch.setattr(cpu, "active", lambda x: False)
    ref = make_reference(seed=8, image_size=56, **TINY["1B"])
    model = build_ours(write_checkpoint(ref, tmp_path, "hf"))
    pixels = np.random.default_rng(6).standard_normal((2, 56, 56, 3)).astype(np.float32)
    assert_parity(model, ref, pixels, tol=1e-4)


def test_half_precision_stays_close(tmp_path):
    ref = make_reference(seed=9, image_size=56, **TINY["large"])
    model = build_ours(write_checkpoint(ref, tmp_path, "hf"))
    pixels = mx.array(np.random.default_rng(7).standard_normal((2, 56, 56, 3)).astype(np.float32))
    expected = reference_outputs(ref, np.asarray(pixels))["last_hidden_state"]
    for dtype in (mx.float16, mx.bfloat16):
        model.set_dtype(dtype)
        out = model(pixels).last_hidden_state
        assert out.dtype == dtype
        assert rel_err(out.astype(mx.float32), expected) < 5e-2


@pytest.mark.slow
def test_full_size_large_224(tmp_path):
    """One real-size AIMv2-L/14-224 (random weights), Apple torch layout, 1e-3 relative."""
    ref = make_reference(seed=7, image_size=224, **LARGE)
    model = build_ours(write_checkpoint(ref, tmp_path, "apple"))
    pixels = np.random.default_rng(5).standard_normal((1, 224, 224, 3)).astype(np.float32)
    assert_parity(model, ref, pixels, tol=1e-3)
