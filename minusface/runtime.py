"""Process-level tuning for CPU runs: keep the front end's big tensors out of the page-fault path.

The 192x112x112 float tensors of the front end are 9.6 MB per image, 308 MB for a batch of 32.
glibc serves blocks above its mmap threshold (at most 32 MB) with fresh mmaps and unmaps them on
free, so every batch page-faults its tensors in again, one 4 KiB page at a time, and the kernel
zeroes each page.  Measured on cpu2 at batch 32 (BENCHMARKS.md, "CPU allocator"): the encoder
spent about two thirds of its time in page faults.

Modes (environment variable MINUSFED_ALLOCATOR, read when `minusface` is first imported):
- "thp" (default): mallopt's mmap threshold at its 32 MB maximum and trim threshold 1 GB (blocks
  up to 32 MB are reused from the heap), and PyTorch's own switch THP_MEM_ALLOC_ENABLE=1: CPU
  tensors of 2 MB and more are madvise(MADV_HUGEPAGE)d, so a fresh 308 MB block faults in as
  ~150 huge pages instead of 75,000 small ones.  Freed blocks still go back to the OS.  Needs the
  kernel's transparent_hugepage setting at "madvise" or "always" (else it is the same as
  "threshold").
- "heap": "thp" and no mmap at all (M_MMAP_MAX = 0): every block comes from the heap and a freed
  one is reused without any fault or zeroing.  Fastest, but a process keeps what it once used
  mapped, and glibc's 64-byte-aligned reuse can leave holes: a loop of 308 MB tensors grew the
  heap to 2.3 GB before it settled.  For a dedicated CPU trainer.
- "threshold": only the two mallopt thresholds (minusfed before THP).
- "glibc": glibc's and PyTorch's defaults.
PyTorch reads THP_MEM_ALLOC_ENABLE once, at the process's first CPU tensor, so `minusface`
sets it on import (each of our packages imports `minusface` first); a value the user set wins.
The mallopt part is applied by `tune_allocator()`, which the entry points (CLI, trainers,
ClientApp, ServerApp, benchmarks) call once.  No-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
ALLOCATOR_ENV = "MINUSFED_ALLOCATOR"
THP_ENV = "THP_MEM_ALLOC_ENABLE"          # PyTorch (c10/core/alloc_cpu.cpp)
MODES = ("thp", "heap", "threshold", "glibc")
DEFAULT_MODE = "thp"
_applied: str | None = None


def allocator_mode(mode: str | None = None) -> str:
    """The mode to use: the argument, else $MINUSFED_ALLOCATOR, else "thp"."""
    chosen = mode if mode is not None else (os.environ.get(ALLOCATOR_ENV) or DEFAULT_MODE)
    if chosen not in MODES:
        source = "tune_allocator(mode)" if mode is not None else f"${ALLOCATOR_ENV}"
        raise ValueError(f"{source}={chosen!r}: expected one of {', '.join(MODES)}")
    return chosen


def request_huge_pages() -> None:
    """Set PyTorch's THP switch for this process (and its children) unless the user chose."""
    try:
        mode = allocator_mode()
    except ValueError:
        return                                   # tune_allocator() reports the bad value
    if mode in ("thp", "heap"):
        os.environ.setdefault(THP_ENV, "1")


def tune_allocator(mode: str | None = None, mmap_threshold: int = 32 * 1024 * 1024,
                   trim_threshold: int = 1024 * 1024 * 1024) -> bool:
    """Apply the mallopt part of `mode` once per process; True when glibc accepted it."""
    global _applied
    chosen = allocator_mode(mode)
    if _applied is not None:
        return _applied == chosen
    if chosen == "glibc":
        _applied = chosen
        return True
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
        if ok and chosen == "heap":
            ok = bool(libc.mallopt(M_MMAP_MAX, 0))
    except (OSError, AttributeError):
        return False
    if ok:
        _applied = chosen
    return ok


def applied_allocator_mode() -> str | None:
    """What `tune_allocator` applied in this process (None: not yet, or glibc refused)."""
    return _applied


__all__ = ["ALLOCATOR_ENV", "DEFAULT_MODE", "MODES", "THP_ENV", "allocator_mode",
           "applied_allocator_mode", "request_huge_pages", "tune_allocator"]
