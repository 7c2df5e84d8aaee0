"""Give MLX's CPU backend a fast BLAS on Linux, and the numpy backend its GEMM.

MLX's Linux wheel links the netlib reference BLAS (about 3 GFLOP/s fp32 on two cores, against about 80 for
OpenBLAS). MLX resolves `cblas_sgemm` and friends through the process's global symbol scope, so a library
that exports those names, loaded with RTLD_GLOBAL before MLX's first matmul, takes over every call. `enable`
loads openblas.py's copy of scipy-openblas32 that way and has malloc.py keep freed memory; anything missing
or failing leaves MLX on its reference BLAS with one log line. macOS (Accelerate) is never touched, and
AIM_MLX_BLAS=0 skips all this. `import aim_mlx` calls `enable` only where devices.py chooses the CPU (on an
NVIDIA GPU the matmuls run in cuBLAS).
"""

import ctypes
import os
import sys
from pathlib import Path

from ..log import logger
from . import malloc, openblas

_state: dict = {"path": None, "error": None, "kernel": None}
_lib: list[ctypes.CDLL] = []  # the loaded library, once enable() succeeded


def enable() -> str | None:
    """Load the fast BLAS once per process; return its path, or None when MLX keeps its own."""
    if _state["path"] or _state["error"] or sys.platform != "linux" or os.environ.get("AIM_MLX_BLAS") == "0":
        return _state["path"]
    try:
        path = openblas.unprefixed_copy()
        _lib.append(_load(path))
        _state["path"] = str(path)
        corename = getattr(_lib[0], "openblas_get_corename", None)  # metadata: never a reason to fail
        _state["kernel"] = corename().decode() if corename else None
        malloc.keep_freed_memory()
    except Exception as exc:  # never fatal: MLX still works on its reference BLAS, only slower
        _state["error"] = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "aim-mlx: fast BLAS unavailable, MLX stays on its reference BLAS (%s)", _state["error"]
        )
    return _state["path"]


def _load(path: Path) -> ctypes.CDLL:
    # OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after each call before they sleep; on a small
    # machine that steals a core from the single-threaded work between GEMMs, including the kernels that
    # the numpy backend runs on every core. 2^14 cycles is still long enough to span back-to-back GEMMs.
    # OpenBLAS reads the variable once, as it loads; the process's own value is put back afterwards.
    saved = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "14")
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    finally:
        if saved is None:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.cblas_sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    lib.cblas_sgemm.restype = None
    if hasattr(lib, "openblas_get_corename"):  # the CPU kernels picked, e.g. "SkylakeX"
        lib.openblas_get_corename.restype = ctypes.c_char_p
    if hasattr(lib, "cblas_sgemm_batch_strided"):  # OpenBLAS 0.3.29 and later
        lib.cblas_sgemm_batch_strided.argtypes = [i, i, i, i, i, i, f, p, i, i, p, i, i, f, p, i, i, i]
        lib.cblas_sgemm_batch_strided.restype = None
    return lib


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums


def gemm(a, b, out, alpha: float = 1.0, beta: float = 0.0) -> None:
    """out = alpha * a @ b + beta * out for float32 numpy matrices (m, k) @ (k, n) -> (m, n), or stacks of
    them (s, m, k) @ (s, k, n) -> (s, m, n), by the loaded BLAS in the calling thread's BLAS mode.

    Operands may be strided views (a head's columns of a packed qkv; a stack of heads as a reshaped,
    transposed view of it) or transposed views: each matrix needs one unit stride, and a stack a whole number
    of floats between its matrices. A stack is one batched BLAS call where the library has it (OpenBLAS
    0.3.29 on). The GIL is released during each call, so threads multiply in parallel."""
    if not a.ndim == b.ndim == out.ndim in (2, 3):
        raise ValueError("gemm takes float32 matrices (m, k) @ (k, n) -> (m, n), or stacks of them")
    if a.ndim == 2:
        a, b, out = a[None], b[None], out[None]
    (s, m, k), n = a.shape, b.shape[-1]
    if any(x.dtype != "float32" for x in (a, b, out)) or (b.shape, out.shape) != ((s, k, n), (s, m, n)):
        raise ValueError("gemm takes float32 matrices (m, k) @ (k, n) -> (m, n), or stacks of them")
    if any(x.strides[0] % 4 for x in (a, b, out)):
        raise ValueError("gemm needs a whole number of floats between the matrices of a stack")
    if s == 0:
        return
    layout_out, ld_out = _operand(out[0])
    if layout_out != _NO_TRANS:
        raise ValueError("gemm writes to a row-major output")
    (ta, lda), (tb, ldb) = _operand(a[0]), _operand(b[0])
    pa, pb, po = (x.__array_interface__["data"][0] for x in (a, b, out))
    sa, sb, so = (x.strides[0] // 4 for x in (a, b, out))  # floats from one matrix to the next
    batched = getattr(_lib[0], "cblas_sgemm_batch_strided", None)
    if s > 1 and batched is not None:
        batched(_ROW_MAJOR, ta, tb, m, n, k, alpha, pa, lda, sa, pb, ldb, sb, beta, po, ld_out, so, s)
        return
    for i in range(s):
        _lib[0].cblas_sgemm(
            _ROW_MAJOR, ta, tb, m, n, k, alpha, pa + 4 * i * sa, lda, pb + 4 * i * sb, ldb, beta,
            po + 4 * i * so, ld_out,
        )  # fmt: skip


def _operand(x) -> tuple[int, int]:
    """(CBLAS transpose flag, leading dimension) of a 2-D float32 view with one unit stride."""
    rows, cols = x.strides
    if cols == 4 and rows % 4 == 0 and rows // 4 >= max(1, x.shape[1]):
        return _NO_TRANS, rows // 4
    if rows == 4 and cols % 4 == 0 and cols // 4 >= max(1, x.shape[0]):
        return _TRANS, cols // 4
    raise ValueError(f"gemm needs a unit stride in one dimension, got strides {x.strides}")


def loaded() -> bool:
    """Whether the fast BLAS is loaded (and `gemm` can be called)."""
    return bool(_lib)


def threads() -> int:
    """How many threads the loaded fast BLAS runs a GEMM on; 1 when none is loaded (MLX's is serial)."""
    return int(_lib[0].openblas_get_num_threads()) if _lib else 1


def set_threads(n: int) -> None:
    """Set the fast BLAS's thread count (no-op without one)."""
    if _lib:
        _lib[0].openblas_set_num_threads(int(n))


def status() -> dict:
    """What `enable` did: the loaded library and the CPU kernels it runs (OpenBLAS picks them as it loads,
    unless OPENBLAS_CORETYPE names some), or why none was loaded (for `aim-mlx bench` and bug reports)."""
    return dict(_state)
