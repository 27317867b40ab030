"""Process-level tuning for CPU runs.

The 192x112x112 float tensors of the front end are 9.6 MB per image.  glibc serves blocks above
its dynamic mmap threshold with fresh mmaps and unmaps them on free, so every batch page-faults
its tensors in again: measured here, 40-70% of protect() time was kernel time.  Raising the
mmap threshold to its maximum (32 MB) and the trim threshold keeps such blocks in the heap for
reuse.  `tune_allocator()` does this through mallopt (no-op where glibc is absent); the entry
points (CLI, trainers, ClientApp, benchmarks) call it once.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_done = False


def tune_allocator(mmap_threshold: int = 32 * 1024 * 1024,
                   trim_threshold: int = 1024 * 1024 * 1024) -> bool:
    """Returns True when glibc accepted both settings."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
