"""glibc's malloc told to keep freed memory while the CPU backend runs, and to hand it back after a load."""

import ctypes
import os

_malloc_trim: list = []  # glibc's malloc_trim, once keep_freed_memory changed malloc's settings


def keep_freed_memory() -> None:
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
