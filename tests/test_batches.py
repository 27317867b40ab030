"""Training batches: the staged path (uint8 gather in threads, conversion on the device) must
give exactly the host path's batches, in the same seeded order, and clean up its threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from minusface.batches import batch_order, iterate_batches
from minusface.images import to_signed


def _faces(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8),
            rng.integers(0, 7, n).astype(np.int64))


@pytest.mark.parametrize("n,batch,repeat,flip", [(37, 8, 3, True), (37, 8, 1, False),
                                                 (5, 16, 1, True)])
def test_staged_batches_equal_host_batches_bit_for_bit(n, batch, repeat, flip):
    images, labels = _faces(n)
    host = list(iterate_batches(images, labels, batch, repeat, seed=3, flip=flip, staged=False))
    staged = list(iterate_batches(images, labels, batch, repeat, seed=3, flip=flip, staged=True,
                                  workers=3, prefetch=2))
    assert len(host) == len(staged) == max(1, (n * repeat) // min(batch, n * repeat))
    for (xh, yh), (xs, ys) in zip(host, staged):
        assert xs.shape == xh.shape and xs.dtype == xh.dtype == torch.float32
        assert xs.is_contiguous()
        assert torch.equal(xs, xh)
        assert torch.equal(ys, yh)


def test_batches_follow_the_seeded_order_and_flips():
    images, labels = _faces(12)
    order, flips, b = batch_order(12, 4, 2, seed=9)
    got = list(iterate_batches(images, labels, 4, 2, seed=9, staged=True))
    assert len(got) == 6 and b == 4
    for k, (x, y) in enumerate(got):
        idx, f = order[4 * k:4 * k + 4], flips[4 * k:4 * k + 4]
        want = to_signed(images[idx])
        want[torch.from_numpy(f)] = want[torch.from_numpy(f)].flip(3)
        assert torch.equal(x, want)
        assert torch.equal(y, torch.from_numpy(labels[idx]))
    assert flips.any() and not flips.all()             # both branches were exercised


def test_different_seeds_give_different_orders():
    a, _, _ = batch_order(50, 10, 3, seed=0)
    b, _, _ = batch_order(50, 10, 3, seed=1)
    assert not np.array_equal(a, b)
    assert np.array_equal(np.bincount(a, minlength=50), np.full(50, 3))


def test_staged_threads_stop_when_the_consumer_stops_early():
    images, labels = _faces(64)
    before = {t.name for t in threading.enumerate()}
    it = iterate_batches(images, labels, 4, 3, seed=0, staged=True, workers=2, prefetch=4)
    next(it)
    assert any(t.name.startswith("minusfed-batches") for t in threading.enumerate())
    it.close()                                          # e.g. a training step raised
    left = {t.name for t in threading.enumerate()} - before
    assert not any(name.startswith("minusfed-batches") for name in left)


def test_non_uint8_faces_are_refused_with_the_dtype():
    images, labels = _faces(4)
    with pytest.raises(TypeError, match="uint8 faces.*float32"):
        next(iterate_batches(images.astype(np.float32), labels, 2, 1, seed=0))


def test_refused_pinned_memory_falls_back_to_plain_buffers(monkeypatch, caplog):
    from minusface import batches
    real_empty = torch.empty

    def no_pinning(*args, **kwargs):
        if kwargs.get("pin_memory"):
            raise RuntimeError("cudaHostAlloc failed (memlock limit)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(batches, "_PIN_FAILED", False)
    monkeypatch.setattr(batches.torch, "empty", no_pinning)
    with caplog.at_level("WARNING", logger="minusface.batches"):
        rows = batches._host_rows((2, 3), pin=True)
        again = batches._host_rows((2, 3), pin=True)
    assert rows.dtype == torch.uint8 and not rows.is_pinned() and again.shape == (2, 3)
    assert sum("pinned host memory unavailable" in r.message for r in caplog.records) == 1
