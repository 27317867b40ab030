"""Training batches from a site's uint8 faces: one seeded order, built where it is cheapest.

Which images form each batch, and which of them are flipped, depends only on the seed, so a
resumed epoch sees the same batches and every path below yields the same tensors bit for bit.

* Host path (CPU training): gather, convert to float in [-1, 1] and flip on the CPU, one batch
  at a time.  On a CPU the training step costs about 100x the conversion, so nothing is hidden
  by doing it elsewhere (measured in `bench/data_loading.py`).
* Staged path (default on CUDA): background threads only gather the batch's uint8 rows into
  pinned memory (4x fewer bytes than float32, a plain row copy that releases the GIL); the copy
  to the GPU is asynchronous and the float conversion and the flip run on the GPU.  The host
  path converts about 3,000 img/s on one core, which is slower than a GPU trains the gpu-small
  preset, so there the host path would leave the GPU waiting for data.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .images import _SIGNED, to_signed

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 2
DEFAULT_PREFETCH = 4


def batch_order(num_images: int, batch_size: int, repeat: int,
                seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(image index per slot, flip per slot, batch size): each image `repeat` times, shuffled."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_images * repeat) % num_images
    flips = rng.random(len(order)) < 0.5
    return order, flips, min(batch_size, len(order))


def iterate_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, repeat: int,
                    seed: int, flip: bool = True, device: torch.device | None = None,
                    staged: bool | None = None, workers: int = DEFAULT_WORKERS,
                    prefetch: int = DEFAULT_PREFETCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, flipped float batches (N, 3, H, W) in [-1, 1] and int64 labels, in an order
    fixed by `seed`.  The last incomplete batch is dropped (BatchNorm, and the step count stays
    fixed); a site with fewer images than one batch trains on one batch of all of them.

    `device`: where the batches are wanted (default: CPU).  `staged` picks the staged path
    (default: on CUDA only); on CUDA its tensors are channels_last, elsewhere both paths give
    contiguous NCHW."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise TypeError(f"iterate_batches expects uint8 faces (N, H, W, C), got {images.dtype} "
                        f"with shape {images.shape}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if staged is None:
        staged = device.type == "cuda"
    order, flips, batch_size = batch_order(len(labels), batch_size, repeat, seed)
    starts = range(0, len(order) - batch_size + 1, batch_size)
    if not staged:
        yield from _host_batches(images, labels, order, flips if flip else None, batch_size, starts)
    else:
        yield from _staged_batches(images, labels, order, flips if flip else None, batch_size,
                                   starts, device, workers, prefetch)


def _host_batches(images: np.ndarray, labels: np.ndarray, order: np.ndarray,
                  flips: np.ndarray | None, batch_size: int,
                  starts: range) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for s in starts:
        idx = order[s:s + batch_size]
        x = to_signed(images[idx])
        if flips is not None:
            f = torch.from_numpy(flips[s:s + batch_size])
            x[f] = torch.flip(x[f], dims=(3,))
        yield x, torch.from_numpy(labels[idx])


_PIN_FAILED = False


def _host_rows(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """A uint8 host buffer, pinned when asked and possible.  Pinned memory can be refused
    (a container's locked-memory limit); then copies are synchronous, and training goes on."""
    global _PIN_FAILED
    if pin and not _PIN_FAILED:
        try:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as e:
            _PIN_FAILED = True
            log.warning("pinned host memory unavailable (%s); batches are copied to the GPU "
                        "synchronously", e)
    return torch.empty(shape, dtype=torch.uint8)


def _staged_batches(images: np.ndarray, labels: np.ndarray, order: np.ndarray,
                    flips: np.ndarray | None, batch_size: int, starts: range,
                    device: torch.device, workers: int,
                    prefetch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    pin = device.type == "cuda"
    labels = np.asarray(labels, dtype=np.int64)
    lut = torch.from_numpy(_SIGNED).to(device)        # the host path's exact values

    def gather(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[s:s + batch_size]
        rows = _host_rows((len(idx), *images.shape[1:]), pin)
        np.take(images, idx, axis=0, out=rows.numpy())
        lab = torch.from_numpy(labels[idx])
        return rows, (lab.pin_memory() if rows.is_pinned() else lab)

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="minusfed-batches")
    pending: deque[tuple[int, Future]] = deque()
    todo = iter(starts)
    try:
        for s in todo:                                  # fill the prefetch window
            pending.append((s, pool.submit(gather, s)))
            if len(pending) >= max(1, prefetch):
                break
        while pending:
            s, fut = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(gather, nxt)))
            rows, lab = fut.result()
            # pinned -> device copies are asynchronous; PyTorch's pinned-memory cache keeps
            # `rows` from being reused until its copy has finished
            u = rows.to(device, non_blocking=True)
            x = lut[u.long()].permute(0, 3, 1, 2)       # NCHW view of NHWC = channels_last
            if flips is not None:
                f = torch.from_numpy(flips[s:s + batch_size]).to(device, non_blocking=True)
                x = torch.where(f.view(-1, 1, 1, 1), x.flip(3), x)
            if device.type != "cuda":
                x = x.contiguous()
            yield x, lab.to(device, non_blocking=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
