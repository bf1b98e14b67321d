"""Once per process, raise glibc's adaptive malloc thresholds to their ceiling.

glibc serves an allocation above its mmap threshold (128 KiB at start) with a fresh mapping, and gives free
memory at the top of its heap back to the system once it exceeds the trim threshold. Both thresholds rise
only when a mapped block is freed: to that block's size (at most 32 MiB) and twice that. The patched runs of
both engines allocate and free tensors of a few MiB per chunk, so until the process has freed one large
block their memory keeps going back to the system and is faulted in again, page by page (what that cost is
measured in docs/performance.md).

`settle_allocator` frees one untouched block just under 32 MiB: what the process would do itself after its
first large tensor. It costs microseconds, touches no memory, and afterwards up to 64 MiB of free heap is
kept for reuse instead of returned. With another C library or allocator it is a harmless allocation.

Blocks above 32 MiB are always mapped afresh, so a loop that allocates and frees them (ACDC's chunks of
candidates) faults every page in again each time. `heap_reuse()` lifts both thresholds for the duration of such
a loop, so that those blocks come from the heap and are reused, and on leaving sets them to the ceiling above
and returns the free heap to the system (`malloc_trim`). A block allocated once per call gains nothing from it:
it is faulted in once either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import threading
from collections.abc import Iterator

import torch

_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_LIFTED_MMAP = 2**30  # while lifted, only blocks above 1 GiB are mapped (at mallopt's largest value some 96 MiB
# blocks were still mapped afresh)
_LIFTED_TRIM = 2**31 - 1  # mallopt's largest value: no free memory is returned while lifted
_settled = False
_depth = 0  # nesting of heap_reuse scopes: only the outermost lifts and restores
_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


def settle_allocator() -> None:
    """Raise glibc's mmap and trim thresholds to their adaptive ceiling (once per process; no-op elsewhere).
    Example: `settle_allocator()`"""
    global _settled
    if _settled:
        return
    _settled = True
    if platform.libc_ver()[0] == "glibc":
        torch.empty(_GLIBC_MMAP_THRESHOLD_MAX - 2**16, dtype=torch.uint8)  # mapped, then freed at once


def _glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (None elsewhere)."""
    global _libc
    if _libc is None and platform.libc_ver()[0] == "glibc":
        _libc = ctypes.CDLL("libc.so.6")
    return _libc


@contextlib.contextmanager
def heap_reuse() -> Iterator[None]:
    """Within the block, glibc serves blocks up to 1 GiB from its heap and keeps freed memory for reuse; on
    leaving the outermost block its thresholds are set to the ceiling `settle_allocator` lets glibc reach (mmap
    32 MiB, trim 64 MiB) and the free heap is returned to the system. Nestable; a no-op without glibc.
    Example: `with heap_reuse(): walk()`"""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_LIFTED_MMAP))
            libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_LIFTED_TRIM))
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_GLIBC_MMAP_THRESHOLD_MAX))
                libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 * _GLIBC_MMAP_THRESHOLD_MAX))
                libc.malloc_trim(ctypes.c_size_t(0))
