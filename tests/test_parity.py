"""aim-mlx's encoder against transformers' Aimv2VisionModel: patch embedding, every hidden state, output.

Every parity test runs on both backends: the MLX blocks (the model itself; what Apple GPUs run) and the numpy
backend (float32 on a CPU with the fast BLAS); `backend` is the fixture that picks one."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from checkpoints import LARGE, TINY, make_reference, reference_outputs, write_checkpoint
from emulation import APPLE, HALF_PRECISION

from aim_mlx.checkpoints import layouts, weights
from aim_mlx.errors import ConfigError
from aim_mlx.models import aimv2, quantized
from aim_mlx.models.aimv2 import AIMv2VisionEncoder
from aim_mlx.models.config import VisionConfig
from aim_mlx.platform import backends, blas, numpy_blocks, workers

needs_blas = pytest.mark.skipif(not blas.loaded(), reason="the numpy backend needs the fast BLAS (Linux)")
SEEDS = {family: 100 + i for i, family in enumerate(TINY)}  # one fixed seed per family, in every process


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def build_ours(folder, native: bool | None = None) -> AIMv2VisionEncoder:
    import json

    raw = json.loads((folder / "config.json").read_text())
    config = VisionConfig.from_dict(raw)
    state = layouts.sanitize(weights.read_folder(folder))
    config.is_native = "pos_embed" not in state if native is None else native
    model = AIMv2VisionEncoder(config, backend=backends.choose("float32"))  # AIM_MLX_BACKEND's choice
    weights.load_into(model, state)
    mx.eval(model.parameters())
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
    """Calls of the numpy backend: batch shares (their count) and whole trunks ("numpy"). Counted on its
    private methods because no public behaviour shows which path ran: both give the same results."""
    calls = []
    real_shares, real_trunk = numpy_blocks.NumpyBlocks._shares, numpy_blocks.NumpyBlocks._trunk

    def shares(self, x, depth, keep, n):
        calls.append(n)
        return real_shares(self, x, depth, keep, n)

    def trunk(self, *args):
        calls.append("numpy")
        return real_trunk(self, *args)

    monkeypatch.setattr(numpy_blocks.NumpyBlocks, "_shares", shares)
    monkeypatch.setattr(numpy_blocks.NumpyBlocks, "_trunk", trunk)
    return calls


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("layout", ["hf", "apple", "mlx"])
@pytest.mark.parametrize("workers", [1, 2])  # numpy: one trunk, or two uneven batch shares (2 + 1)
def test_tiny_families(tmp_path, family, layout, workers, backend, monkeypatch, count_parallel):
    monkeypatch.setenv("AIM_MLX_CPU_WORKERS", str(workers))
    ref = make_reference(seed=SEEDS[family], image_size=56, **TINY[family])
    model = build_ours(write_checkpoint(ref, tmp_path, layout))
    pixels = np.random.default_rng(1).standard_normal((3, 56, 56, 3)).astype(np.float32)
    assert_parity(model, ref, pixels, tol=1e-4)
    calls = {1: ["numpy"] * 2, 2: [2, "numpy", "numpy"] * 2}[workers]  # the hidden states, encode_image
    assert sorted(map(str, count_parallel)) == sorted(map(str, calls if backend == "numpy" else []))


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tiny_families_in_half_precision_on_the_mlx_blocks(tmp_path, family, dtype, count_parallel):
    """The path Apple GPUs take (MLX's blocks in half precision), against the float32 reference at every
    hidden state. Half precision never takes the numpy backend, whatever AIM_MLX_BACKEND's default."""
    ref = make_reference(seed=SEEDS[family], image_size=56, **TINY[family])
    model = build_ours(write_checkpoint(ref, tmp_path, "hf"))
    model.set_dtype(getattr(mx, dtype))
    pixels = np.random.default_rng(1).standard_normal((3, 56, 56, 3)).astype(np.float32)
    reference = reference_outputs(ref, pixels)
    out = model(mx.array(pixels), output_hidden_states=True)
    tol = {"float16": 1e-2, "bfloat16": 5e-2}[dtype]  # 10 and 7 mantissa bits
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, reference["hidden_states"], strict=True)):
        assert ours.dtype == getattr(mx, dtype)
        assert rel_err(ours.astype(mx.float32), theirs) < tol, f"hidden state {i}"
    assert rel_err(out.last_hidden_state.astype(mx.float32), reference["last_hidden_state"]) < tol
    assert count_parallel == []


def test_the_backends_agree_with_each_other(tmp_path, monkeypatch):
    """numpy and MLX blocks on the same model and pixels: every hidden state to float rounding."""
    ref = make_reference(seed=11, image_size=56, **TINY["huge"])
    folder = write_checkpoint(ref, tmp_path, "hf")
    pixels = mx.array(np.random.default_rng(9).standard_normal((2, 56, 56, 3)).astype(np.float32))
    monkeypatch.setenv("AIM_MLX_BACKEND", "mlx")
    model = build_ours(folder)
    assert backends.name(model) == "mlx" and model.backend is None
    on_mlx = model(pixels, output_hidden_states=True).hidden_states
    if not blas.loaded():
        return
    monkeypatch.setenv("AIM_MLX_BACKEND", "numpy")
    model = build_ours(folder)
    assert backends.name(model) == "numpy" and model.backend is not None
    on_numpy = model(pixels, output_hidden_states=True).hidden_states
    for i, (a, b) in enumerate(zip(on_mlx, on_numpy, strict=True)):
        assert rel_err(a, np.asarray(b)) < 1e-5, f"hidden state {i}"


@pytest.mark.parametrize("stop_early", [False, True])
def test_forward_intermediates_picks_blocks_like_timm(tmp_path, backend, stop_early, monkeypatch):
    """indices: the last n, a list (negative from the end); norm applies the final RMSNorm; stop_early runs
    no block after the last one chosen (counted on the blocks themselves)."""
    ref = make_reference(
        seed=12,
        image_size=56,
        num_hidden_layers=4,
        **{k: v for k, v in TINY["large"].items() if k != "num_hidden_layers"},
    )
    model = build_ours(write_checkpoint(ref, tmp_path, "hf"))
    pixels = np.random.default_rng(10).standard_normal((2, 56, 56, 3)).astype(np.float32)
    hidden = reference_outputs(ref, pixels)["hidden_states"]  # input, then each of the 4 blocks
    x = mx.array(pixels)
    last_two = model.forward_intermediates(x, indices=2, stop_early=stop_early)
    assert len(last_two) == 2 and all(rel_err(o, r) < 1e-4 for o, r in zip(last_two, hidden[3:], strict=True))
    picked = model.forward_intermediates(x, indices=[-4, 1], stop_early=stop_early)
    assert rel_err(picked[0], hidden[1]) < 1e-4 and rel_err(picked[1], hidden[2]) < 1e-4
    final = model.forward_intermediates(x, indices=[-1], norm=True)[0]
    assert rel_err(final, reference_outputs(ref, pixels)["last_hidden_state"]) < 1e-4
    ran, block_call = [], aimv2.Block.__call__
    monkeypatch.setattr(
        aimv2.Block,
        "__call__",
        lambda b, h: ran.append([id(k) for k in model.blocks].index(id(b))) or block_call(b, h),
    )
    if backend == "numpy":
        trunk_call = numpy_blocks.NumpyBlocks.__call__
        monkeypatch.setattr(
            numpy_blocks.NumpyBlocks,
            "__call__",
            lambda t, h, depth, keep=(): ran.append(depth) or trunk_call(t, h, depth, keep),
        )
    model.forward_intermediates(x, indices=[1], stop_early=stop_early)
    if backend == "mlx":
        assert ran == ([0, 1] if stop_early else [0, 1, 2, 3])
    else:
        assert ran == [2 if stop_early else 4]  # the depth the backend was asked for
    with pytest.raises(ValueError, match="not within the 4 blocks"):
        model.forward_intermediates(x, indices=[4])


def test_backend_choice(monkeypatch):
    """AIM_MLX_BACKEND: a typo is an error; numpy where it cannot run is an error; mlx gives no backend; the
    default is numpy where it runs and falls back quietly elsewhere."""
    monkeypatch.setenv("AIM_MLX_BACKEND", "torch")
    with pytest.raises(ConfigError, match="AIM_MLX_BACKEND='torch' is not a backend"):
        backends.choose("float32")
    monkeypatch.setenv("AIM_MLX_BACKEND", "numpy")
    reason = (
        "the fast BLAS is not loaded" if not blas.loaded() else "it computes in float32 only, not float16"
    )
    with pytest.raises(ConfigError, match=f"AIM_MLX_BACKEND=numpy cannot run this model: {reason}"):
        backends.choose("float16")
    monkeypatch.setenv("AIM_MLX_BACKEND", "mlx")
    assert backends.choose("float32") is None
    monkeypatch.delenv("AIM_MLX_BACKEND")
    assert backends.choose("float16") is None
    numpy = backends.choose("float32")
    assert numpy is (numpy_blocks.NumpyBlocks if blas.loaded() else None)
    model = AIMv2VisionEncoder(VisionConfig(**TINY["large"]), backend=numpy)
    assert backends.name(model) == ("numpy" if blas.loaded() else "mlx")
    model.set_dtype(mx.float16)
    assert backends.name(model) == "mlx"  # half precision runs the MLX blocks


@needs_blas
def test_the_numpy_backend_rereads_replaced_weights(tmp_path):
    """Weights replaced after the first call (a new load, set_dtype) are read again, or the MLX blocks run."""
    ref = make_reference(seed=13, image_size=56, **TINY["large"])
    model = build_ours(write_checkpoint(ref, tmp_path, "hf"))
    x = mx.array(np.random.default_rng(3).standard_normal((1, 56, 56, 3)).astype(np.float32))
    before = model.encode_image(x)
    for block in model.blocks:
        block.mlp.fc2.weight = block.mlp.fc2.weight * 0  # the MLP adds nothing any more
    changed = model.encode_image(x)
    on_mlx = AIMv2VisionEncoder(model.config)  # the same arrays, run by the MLX blocks
    on_mlx.update(model.parameters())
    assert mx.allclose(changed, on_mlx.encode_image(x), atol=1e-5) and not mx.allclose(before, changed)
    model.set_dtype(mx.float16)
    assert not model.backend.takes(x.astype(mx.float16))


def test_cpu_workers_must_be_a_number(monkeypatch):
    monkeypatch.setenv("AIM_MLX_CPU_WORKERS", "abc")
    with pytest.raises(ConfigError, match="AIM_MLX_CPU_WORKERS='abc'"):
        workers.cores()


@needs_blas
def test_batch_shares_pass_errors_on_and_restore_blas_threads(tmp_path, monkeypatch, count_parallel):
    monkeypatch.setenv("AIM_MLX_CPU_WORKERS", "2")
    model = build_ours(write_checkpoint(make_reference(seed=2, **TINY["large"]), tmp_path, "hf"))
    before = blas.threads()

    def boom(*args, **kwargs):
        raise RuntimeError("boom in a worker")

    monkeypatch.setattr(numpy_blocks, "_silu_mul", boom)  # SiLU·up, in every share's trunk
    with pytest.raises(RuntimeError, match="boom in a worker"):
        model(mx.zeros((2, 56, 56, 3)))
    assert count_parallel == [2, "numpy", "numpy"]  # both shares started
    assert blas.threads() == before


@needs_blas
@pytest.mark.parametrize("shares", [1, 2])
def test_an_interrupt_stops_the_workers_and_hands_the_cores_back(tmp_path, monkeypatch, shares):
    """Ctrl-C in the calling thread while shares (or attention's split) run: the workers stop at their next
    block, the BLAS gets its threads back, the lock is free, and the interrupt reaches the caller."""
    import threading
    import time

    monkeypatch.setenv("AIM_MLX_CPU_WORKERS", "2")
    model = build_ours(write_checkpoint(make_reference(seed=2, **TINY["large"]), tmp_path, "hf"))
    before, started = blas.threads(), threading.Event()
    real = numpy_blocks._silu_mul

    def slow(*args):
        started.set()
        if threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt  # what SIGINT raises in the main thread
        time.sleep(0.2)
        return real(*args)

    monkeypatch.setattr(numpy_blocks, "_silu_mul", slow)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        if shares == 2:  # the main thread only waits on the shares: interrupt the wait itself
            monkeypatch.setattr(workers, "wait", _interrupted_wait(workers.wait, started))
        model(mx.zeros((shares, 56, 56, 3)))
    assert time.monotonic() - t0 < 2
    assert blas.threads() == before
    # Nothing left queued on the workers (a later call would only wait longer for it).
    assert workers.pending() == 0
    monkeypatch.setattr(numpy_blocks, "_silu_mul", real)
    monkeypatch.undo()
    assert model(mx.zeros((2, 56, 56, 3))).last_hidden_state.shape == (2, 16, 128)  # usable afterwards
    assert _from_another_thread(lambda: model(mx.zeros((1, 56, 56, 3)))).shape == (1, 16, 128)  # not locked


def _from_another_thread(call, timeout: float = 30):
    """The last hidden state `call()` gives on another thread: a backend still locked would hold it."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as other:
        return other.submit(call).result(timeout=timeout).last_hidden_state


def _interrupted_wait(real_wait, started):
    calls = []

    def wait(jobs, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            started.wait(5)
            raise KeyboardInterrupt
        return real_wait(jobs, *args, **kwargs)

    return wait


@needs_blas
@pytest.mark.parametrize("group", [1, 2, 5])  # heads a thread takes at once; 2 splits images unevenly
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_in_groups_of_heads(group, causal, monkeypatch):
    """3 images x 5 heads in two shares (8 + 7 heads): groups stop at a share's and an image's end. On the
    private _attention because a public call splits heads over the cores for one image only (more images go
    to batch shares), so no public call shows a share that ends inside an image."""
    import threading

    b, n, heads, hd = 3, 11, 5, 4
    monkeypatch.setattr(numpy_blocks, "SCORES_BYTES", group * 4 * n * n)
    monkeypatch.setenv("AIM_MLX_CPU_WORKERS", "2")  # the two shares, on any machine
    qkv = np.random.default_rng(7).standard_normal((b, n, 3 * heads * hd)).astype(np.float32)
    q, k, v = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # each (B, H, N, hd)
    scores = q @ k.swapaxes(-1, -2) * 0.5
    if causal:
        scores[..., np.triu(np.ones((n, n), dtype=bool), 1)] = -np.inf
    w = np.exp(scores - scores.max(-1, keepdims=True))
    expected = ((w / w.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, n, heads * hd)
    ours = np.empty((b, n, heads * hd), np.float32)
    cancel = threading.Event()
    numpy_blocks._attention(qkv, heads, 0.5, causal, ours, lambda fn, count: workers.split(fn, count, cancel))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@needs_blas
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_numpy_trunk_matches_the_mlx_blocks(bias, causal):
    """The numpy trunk against the blocks' own MLX loop: every hidden state, with biases (no AIMv2 checkpoint
    has them, the config allows them) and causal attention (the LiT text tower's blocks)."""
    config = VisionConfig(**TINY["large"], qkv_bias=bias, mlp_bias=bias)
    blocks = [aimv2.Block(config, causal=causal) for _ in range(3)]
    for block in blocks:  # MLX initialises the norm weights to one
        for norm in (block.norm_1, block.norm_2):
            norm.weight = 1 + 0.2 * mx.random.normal(norm.weight.shape)
    x = mx.random.normal((2, 9, config.hidden_size), key=mx.random.key(3))
    expected = [x]
    for block in blocks:
        expected.append(block(expected[-1]))
    assert numpy_blocks.unsupported(blocks) is None
    trunk = aimv2.BlockStack(blocks, backend=numpy_blocks.NumpyBlocks)
    assert trunk.backend.takes(x)  # the numpy backend runs these calls, not MLX's loop
    out, kept = trunk.run_blocks(x, 3, keep=range(3))
    assert sorted(kept) == [0, 1, 2] and rel_err(out, np.asarray(expected[-1])) < 1e-5
    for i in range(3):
        assert rel_err(kept[i], np.asarray(expected[i + 1])) < 1e-5
    x_only, none = trunk.run_blocks(x, 3)
    assert none == {} and mx.array_equal(x_only, out)
    two, _ = trunk.run_blocks(x, 2)
    assert rel_err(two, np.asarray(expected[2])) < 1e-5


@needs_blas
def test_numpy_trunk_takes_float32_aimv2_blocks_and_aim_mlx_quantized_layers_only():
    config = VisionConfig(**TINY["large"])
    blocks = [aimv2.Block(config) for _ in range(2)]
    assert numpy_blocks.unsupported(blocks) is None
    quantized.quantize(blocks[0], {"group_size": 32, "bits": 4, "mode": quantized.MODE})
    assert numpy_blocks.unsupported(blocks) is None
    nn.quantize(blocks[1], group_size=32, bits=4)  # MLX's own layer: its quantized matmul, in MLX's loop
    assert "block 1's qkv is not a float32 Linear" in numpy_blocks.unsupported(blocks)
    half = [aimv2.Block(config)]
    half[0].set_dtype(mx.float16)
    assert "float32" in numpy_blocks.unsupported(half)

    class LayerNormBlock(nn.Module):  # another family's block (AIMv1: LayerNorm + GELU): no AttributeError
        def __init__(self):
            super().__init__()
            self.norm_1 = nn.LayerNorm(8)

    assert "not an AIMv2 block" in numpy_blocks.unsupported([LayerNormBlock()])


@needs_blas
def test_numpy_trunk_unpacks_quantized_layers_as_the_mlx_loop_does():
    """4-bit attention, 8-bit MLP: the numpy trunk against the blocks' MLX loop (QuantizedLinear's CPU
    path)."""
    config = VisionConfig(**TINY["large"])
    blocks = [aimv2.Block(config) for _ in range(2)]
    for block in blocks:
        quantized.quantize(block.attn, {"group_size": 32, "bits": 4, "mode": quantized.MODE})
        quantized.quantize(block.mlp, {"group_size": 32, "bits": 8, "mode": quantized.MODE})
    x = mx.random.normal((2, 9, config.hidden_size), key=mx.random.key(4))
    expected = x
    for block in blocks:
        expected = block(expected)
    trunk = aimv2.BlockStack(blocks, backend=numpy_blocks.NumpyBlocks)
    assert trunk.backend.takes(x)
    out, _ = trunk.run_blocks(x, 2)
    assert rel_err(out, np.asarray(expected)) < 1e-5


@pytest.mark.parametrize("layout", ["hf", "apple"])
@pytest.mark.parametrize("hw", [(70, 42), (42, 98), (84, 84)])
def test_native_non_square_grids(tmp_path, layout, hw, backend):
    ref = make_reference(seed=3, is_native=True, **TINY["large"])
    model = build_ours(write_checkpoint(ref, tmp_path, layout))
    assert model.config.is_native and "pos_embed" not in dict(model.parameters())
    pixels = np.random.default_rng(2).standard_normal((1, *hw, 3)).astype(np.float32)
    assert_parity(model, ref, pixels, tol=1e-4)


def test_conv_floors_trailing_pixels(tmp_path, backend):
    """Like the reference conv, pixels that fill no whole patch are dropped (native, 75x50 -> 5x3 grid)."""
    ref = make_reference(seed=4, is_native=True, **TINY["large"])
    model = build_ours(write_checkpoint(ref, tmp_path, "hf"))
    pixels = np.random.default_rng(3).standard_normal((1, 75, 50, 3)).astype(np.float32)
    assert_parity(model, ref, pixels, tol=1e-4)


def test_three_layouts_identical(tmp_path, backend):
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
        once = layouts.sanitize(weights.read_folder(write_checkpoint(ref, tmp_path / layout, layout)))
        twice = layouts.sanitize(once)
        assert once.keys() == twice.keys()
        assert all(mx.array_equal(once[k], twice[k]) for k in once)


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


def test_mean_pooling_does_not_overflow_in_float16(tmp_path):
    """A channel large in every token (as trained ViTs grow) sums past float16's 65504 over the grid while
    each token stays in range: encode_image must still give the mean (Apple GPUs run float16 by default)."""
    ref = make_reference(seed=8, image_size=56, **TINY["large"])
    with torch.no_grad():
        ref.embeddings.patch_embed.bias[0] = 100.0  # channel 0 dominates every token ...
        ref.rms_norm.weight.mul_(2000.0)  # ... and the final norm takes it to ~2e4
    model = build_ours(write_checkpoint(ref, tmp_path, "hf"))
    model.set_dtype(mx.float16)
    pixels = np.random.default_rng(1).standard_normal((2, 56, 56, 3)).astype(np.float32)
    tokens = reference_outputs(ref, pixels)["last_hidden_state"]  # (2, 16, D)
    assert np.abs(tokens).max() < 65504 < np.abs(tokens.sum(axis=1)).max()  # the case in question
    pooled = model.encode_image(mx.array(pixels))
    assert pooled.dtype == mx.float16
    assert rel_err(pooled.astype(mx.float32), tokens.mean(axis=1)) < HALF_PRECISION["float16"]


@pytest.mark.slow
@pytest.mark.skipif(APPLE, reason="float32 on MLX's own CPU BLAS takes 7 min; the normal run covers it")
def test_full_size_large_224(tmp_path, backend):
    """One real-size AIMv2-L/14-224 (random weights), Apple torch layout, 1e-3 relative."""
    ref = make_reference(seed=7, image_size=224, **LARGE)
    model = build_ours(write_checkpoint(ref, tmp_path, "apple"))
    pixels = np.random.default_rng(5).standard_normal((1, 224, 224, 3)).astype(np.float32)
    assert_parity(model, ref, pixels, tol=1e-3)


@needs_blas
def test_threads_of_a_server_share_the_numpy_backend(tmp_path, monkeypatch):
    """Requests on several threads at once (batch 1: attention split over the cores; batch 3: batch shares)
    give what they give one at a time, and the BLAS ends with its thread count."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("AIM_MLX_CPU_WORKERS", "2")
    model = build_ours(
        write_checkpoint(make_reference(seed=14, image_size=56, **TINY["large"]), tmp_path, "hf")
    )
    rng = np.random.default_rng(11)
    inputs = [mx.array(rng.standard_normal((b, 56, 56, 3)).astype(np.float32)) for b in (1, 3, 1, 3, 2, 1)]
    alone = [np.asarray(model.encode_image(x)) for x in inputs]
    before = blas.threads()

    def request(x):
        return np.asarray(model.encode_image(x))

    with ThreadPoolExecutor(3) as server:
        together = list(server.map(request, inputs * 2))
    for ours, expected in zip(together, alone * 2, strict=True):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert blas.threads() == before
    assert _from_another_thread(lambda: model(inputs[0])).shape == (1, 16, 128)  # the backend is free
