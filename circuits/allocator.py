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
"""

from __future__ import annotations

import platform

import torch

_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
_settled = False


def settle_allocator() -> None:
    """Raise glibc's mmap and trim thresholds to their adaptive ceiling (once per process; no-op elsewhere).
    Example: `settle_allocator()`"""
    global _settled
    if _settled:
        return
    _settled = True
    if platform.libc_ver()[0] == "glibc":
        torch.empty(_GLIBC_MMAP_THRESHOLD_MAX - 2**16, dtype=torch.uint8)  # mapped, then freed at once
