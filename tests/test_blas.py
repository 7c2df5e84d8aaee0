"""The fast-BLAS loader: MLX's BLAS calls reach OpenBLAS on Linux; absent or failing, nothing breaks."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from emulation import APPLE

from aim_mlx.platform import blas as _blas
from aim_mlx.platform import malloc, openblas

# Under AIM_MLX_EMULATE=apple (AIM_MLX_BLAS=0, as a Mac has no loader) every process here starts without it.
linux = pytest.mark.skipif(
    sys.platform != "linux" or APPLE, reason="the loader acts on Linux only (not under AIM_MLX_EMULATE=apple)"
)

# Which library answers `cblas_sgemm` in the process's global scope, where MLX's own lookups go.
PROBE = """
import ctypes, json, sys
import aim_mlx
import mlx.core as mx
import numpy as np
from aim_mlx.platform import blas as _blas

try:
    address = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
except AttributeError:  # no BLAS in the global scope: MLX's bundled one is private to it
    address = -1
owner = None
for line in open("/proc/self/maps"):
    parts = line.split()
    start, end = (int(x, 16) for x in parts[0].split("-"))
    if start <= address < end and len(parts) > 5:
        owner = parts[5]
a = np.random.default_rng(0).standard_normal((300, 200), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((200, 100), dtype=np.float32)
error = float(np.abs(np.asarray(mx.array(a) @ mx.array(b)) - a @ b).max())
print(json.dumps({"status": _blas.status(), "owner": owner, "error": error}))
"""


def probe(**env) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@linux
def test_mlx_matmuls_go_to_openblas():
    result = probe()
    assert result["status"]["error"] is None
    assert result["owner"] == result["status"]["path"] and "libopenblas-aim-mlx" in result["owner"]
    assert result["error"] < 1e-3


@linux
def test_opting_out_leaves_mlx_alone():
    result = probe(AIM_MLX_BLAS="0")
    assert result["status"] == {"path": None, "error": None, "kernel": None}
    assert "libopenblas-aim-mlx" not in (result["owner"] or "")
    assert result["error"] < 1e-3


avx2 = pytest.mark.skipif(
    sys.platform != "linux" or APPLE or "avx2" not in Path("/proc/cpuinfo").read_text(),
    reason="needs an x86 CPU with AVX2 and the loader (not under AIM_MLX_EMULATE=apple)",
)


@avx2
def test_the_kernels_in_use_are_reported():
    """OPENBLAS_CORETYPE picks the kernels of every OpenBLAS in the process; benchmark headers say which ran,
    for aim-mlx's BLAS and for numpy's (the roofline's)."""
    code = "import json, aim_mlx.tasks.bench.timing as b; "
    code += "print(json.dumps(b.machine())); print(b.header(b.machine()))"
    env = {**os.environ, "OPENBLAS_CORETYPE": "Haswell"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    info, header = json.loads(done.stdout.splitlines()[0]), done.stdout.split("\n", 1)[1]
    assert info["mlx_blas_kernel"] == info["numpy_blas_kernel"] == info["openblas_coretype"] == "Haswell"
    assert "(Haswell kernels)" in header and "OPENBLAS_CORETYPE=Haswell is set" in header


@linux
def test_the_copy_exports_unprefixed_blas_names(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path))
    path = openblas.unprefixed_copy()
    assert path.parent == tmp_path / "blas"
    names = set(openblas.defined_dynamic_symbols(path.read_bytes()))
    assert {"cblas_sgemm", "sgemm_", "cblas_sdot"} <= names
    assert not any(name.startswith("scipy_") for name in names)
    assert openblas.unprefixed_copy() == path  # cached: built once


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(_blas, "_state", {"path": None, "error": None, "kernel": None})
    monkeypatch.delenv("AIM_MLX_BLAS", raising=False)


def test_a_failure_is_logged_not_raised(fresh_state, monkeypatch, caplog):
    monkeypatch.setattr(sys, "platform", "linux")

    def broken():
        raise RuntimeError("patchelf not found")

    monkeypatch.setattr(openblas, "unprefixed_copy", broken)
    with caplog.at_level(logging.WARNING, logger="aim_mlx"):
        assert _blas.enable() is None
    assert _blas.status()["error"] == "RuntimeError: patchelf not found"
    assert "reference BLAS" in caplog.text
    assert _blas.enable() is None  # tried once per process, not on every call


def test_macos_is_never_touched(fresh_state, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(openblas, "unprefixed_copy", lambda: pytest.fail("must not build a BLAS on macOS"))
    assert _blas.enable() is None and _blas.status() == {"path": None, "error": None, "kernel": None}


@linux
def test_importing_mlx_first_warns():
    code = "import mlx.core, aim_mlx"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "import aim_mlx first" in done.stderr


@linux
def test_gemm_takes_strided_and_transposed_views():
    """What the numpy backend's attention passes: heads as column blocks of a packed matrix, keys
    transposed."""
    import numpy as np

    assert _blas.loaded()
    packed = np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32)
    a, b = packed[:, 2:10], packed[:, 12:20].T  # (5, 8) with row stride 24; (8, 5) transposed
    canvas = np.zeros((5, 12), np.float32)
    _blas.gemm(a, b, canvas[:, 3:8], alpha=0.5)
    np.testing.assert_allclose(canvas[:, 3:8], 0.5 * a @ b, rtol=1e-5, atol=1e-5)
    assert not canvas[:, :3].any() and not canvas[:, 8:].any()  # nothing written outside the view
    _blas.gemm(a, b, canvas[:, 3:8], beta=1.0)  # adds to what is there: the numpy trunk's residual stream
    np.testing.assert_allclose(canvas[:, 3:8], 1.5 * a @ b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unit stride"):
        _blas.gemm(a[:, ::2], b[::2], np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match="float32"):
        _blas.gemm(a.astype(np.float64), b, np.zeros((5, 5), np.float32))


@linux
@pytest.mark.parametrize("batched", [True, False])  # OpenBLAS's cblas_sgemm_batch_strided; a loop without it
def test_gemm_takes_stacks_of_heads(batched, monkeypatch):
    """What the numpy backend's attention passes: heads 1..3 of a packed (N, 4 * hd) block as (heads, N, hd)
    views."""
    import numpy as np

    class Unbatched:  # the library as OpenBLAS before 0.3.29 exports it
        cblas_sgemm = _blas._lib[0].cblas_sgemm

    if not batched:
        monkeypatch.setattr(_blas, "_lib", [Unbatched()])
    elif not hasattr(_blas._lib[0], "cblas_sgemm_batch_strided"):
        pytest.skip("this OpenBLAS predates cblas_sgemm_batch_strided (0.3.29)")
    packed = np.random.default_rng(1).standard_normal((6, 2 * 4 * 3)).astype(np.float32)  # (N, q | k), hd 3

    def heads(x):
        return x[:, 3:12].reshape(6, 3, 3).transpose(1, 0, 2)  # heads 1..3, (3, N, hd)

    q, k = heads(packed[:, :12]), heads(packed[:, 12:])
    scores = np.zeros((3, 6, 6), np.float32)
    _blas.gemm(q, k.transpose(0, 2, 1), scores, alpha=0.5)
    np.testing.assert_allclose(scores, 0.5 * q @ k.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    canvas = np.zeros((6, 12), np.float32)
    _blas.gemm(scores, q, heads(canvas))  # into the heads' columns of a (N, 4 * hd) output
    np.testing.assert_allclose(heads(canvas), scores @ q, rtol=1e-5, atol=1e-5)
    assert not canvas[:, :3].any()  # head 0's columns untouched
    with pytest.raises(ValueError, match="stacks"):
        _blas.gemm(q, k.transpose(0, 2, 1)[:2], scores)
    with pytest.raises(ValueError, match="stacks"):  # a single matrix times a stack
        _blas.gemm(q[0], k.transpose(0, 2, 1), scores)


@linux
def test_the_thread_timeout_is_set_for_the_blas_only():
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT as it loads; aim-mlx sets it for its BLAS, not for children."""
    code = "import os, aim_mlx; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "None"


def untuned_malloc_env() -> dict:
    """This environment without the user's malloc options, under which aim-mlx leaves malloc alone."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


# Three 4 MiB buffers made and freed in a loop: glibc's default hands them back to the OS and faults them in
# again on every round; aim-mlx's malloc settings keep them.
CHURN = """
import resource, numpy as np
import aim_mlx

def churn():
    for _ in range(20):
        buffers = [np.ones(1 << 20, np.float32) for _ in range(3)]
        del buffers

churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@linux
@pytest.mark.parametrize(
    "env, kept", [({}, True), ({"AIM_MLX_BLAS": "0"}, False), ({"MALLOC_ARENA_MAX": "4"}, False)]
)
def test_freed_memory_is_kept_unless_the_user_tunes_malloc(env, kept):
    base = untuned_malloc_env()
    done = subprocess.run(
        [sys.executable, "-c", CHURN], capture_output=True, text=True, check=True, env={**base, **env}
    )
    faults = int(done.stdout.strip().splitlines()[-1])
    assert faults < 100 if kept else faults > 5000, faults


# 256 MiB made in 1 MiB buffers and freed: kept by the settings above until release_freed_memory().
RELEASE = """
import numpy as np
import aim_mlx
from aim_mlx.platform import malloc

def resident_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024

buffers = [np.ones(1 << 18, np.float32) for _ in range(256)]
del buffers
kept = resident_mb()
malloc.release_freed_memory()
print(kept - resident_mb())
"""


@linux
@pytest.mark.parametrize("env, released", [({}, True), ({"AIM_MLX_BLAS": "0"}, False)])
def test_freed_memory_is_handed_back_on_request(env, released):
    """With aim-mlx's settings the 256 MiB stay until the release; without them glibc never kept them."""
    done = subprocess.run(
        [sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True,
        env={**untuned_malloc_env(), **env},
    )  # fmt: skip
    handed_back = float(done.stdout.strip().splitlines()[-1])
    assert handed_back > 200 if released else handed_back < 20, handed_back


def test_load_hands_back_its_temporary_copies(tmp_path, monkeypatch):
    """`load` hands the free heap back once the model is built (a load's copies, e.g. before a half-precision
    checkpoint's upcast, are garbage by then)."""
    from checkpoints import TINY, make_reference, write_checkpoint

    import aim_mlx

    folder = write_checkpoint(make_reference(seed=3, image_size=28, **TINY["large"]), tmp_path, "hf")
    calls = []
    monkeypatch.setattr(malloc, "release_freed_memory", lambda: calls.append(True))
    aim_mlx.load(str(folder))
    assert calls == [True]
