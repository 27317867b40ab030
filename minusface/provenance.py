"""Provenance of protected images: a bounded registry of digests of `protect()` outputs.

Why: the outbound guard (`clients.guard`) lets an image leave a site only if it provably came out
of `MinusFaceFrontend.protect`.  A shape check cannot tell a protected image X_p from a raw face
in [0, 1]; a digest of the exact float32 bytes `protect()` returned can.

Each X_p is recorded twice: as the float32 bytes `protect()` returned and as those values rounded
to float16, the form a site ships in bulk (pooled stage 2 halves its upload that way).  A float16
array passes only if its samples are exactly the float16 rounding of a registered X_p.

The digests are not secrets: BLAKE2b is one-way, so a digest reveals nothing about the image.  The
registry lives only in the client process (never sent, never persisted) and is an LRU capped at
`MAX_ENTRIES` images, so memory stays bounded (~60 MB when full).  It guards against bugs (a handler
returning the wrong tensor), not against malicious code in the same process, which could register
anything.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

MAX_ENTRIES = 200_000           # X_p images (two digests each)
SAMPLE_SHAPE = (3, 112, 112)

PARALLEL_MIN = 64                 # batches at least this large are hashed on a thread pool

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_registry: OrderedDict[bytes, None] = OrderedDict()


def _digest(sample: np.ndarray) -> bytes:
    """BLAKE2b-128 of one sample's float32 C-contiguous bytes (dtype cast so round trips match);
    a float16 sample is hashed as float16 under its own personalisation, so the two forms never
    collide."""
    if sample.dtype == np.float16:
        data = np.ascontiguousarray(sample)
        return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16, person=b"f16").digest()
    data = np.ascontiguousarray(sample, dtype=np.float32)
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).digest()


def _both_digests(sample: np.ndarray) -> tuple[bytes, bytes]:
    return _digest(sample), _digest(sample.astype(np.float16))


def register_protected(batch: torch.Tensor) -> None:
    """Record each sample of a `protect()` output (N, 3, 112, 112) as allowed to leave the site."""
    if batch.dim() != 4 or tuple(batch.shape[1:]) != SAMPLE_SHAPE:
        raise ValueError(f"register_protected: expected (N, 3, 112, 112), got {tuple(batch.shape)}")
    arr = batch.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    digests = [d for pair in _digests(arr, _both_digests) for d in pair]   # outside the lock
    with _lock:
        for d in digests:
            _registry[d] = None
            _registry.move_to_end(d)
        while len(_registry) > 2 * MAX_ENTRIES:
            _registry.popitem(last=False)


def _digests(arr: np.ndarray, digest=_digest) -> list:
    """Digests of every sample; large batches hash on a thread pool (hashlib releases the GIL),
    so registration keeps up with a GPU's protect() rate."""
    if len(arr) < PARALLEL_MIN:
        return [digest(sample) for sample in arr]
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1),
                                   thread_name_prefix="minusfed-digest")
    return list(_pool.map(digest, arr, chunksize=16))


def is_protected(array: np.ndarray) -> bool:
    """True if one sample (3, 112, 112) is bit-identical (as float32) to a registered X_p, or is
    exactly its float16 rounding when `array` is float16."""
    array = np.asarray(array)
    if array.shape != SAMPLE_SHAPE:
        return False
    return _lookup([_digest(array)])


def all_protected(batch_array: np.ndarray) -> bool:
    """True if every sample of a (N, 3, 112, 112) batch is a registered X_p (float16: its
    rounding)."""
    batch_array = np.asarray(batch_array)
    if batch_array.ndim != 4 or batch_array.shape[1:] != SAMPLE_SHAPE:
        return False
    return _lookup(_digests(batch_array))


def _lookup(digests: list[bytes]) -> bool:
    """All digests known?  Hits are refreshed (LRU), so X_p about to be sent is not evicted."""
    with _lock:
        if not all(d in _registry for d in digests):
            return False
        for d in digests:
            _registry.move_to_end(d)
        return True


def registry_size() -> int:
    """Digests held (two per registered image while none was evicted)."""
    with _lock:
        return len(_registry)


def clear_registry() -> None:
    """Forget every digest (tests)."""
    with _lock:
        _registry.clear()
