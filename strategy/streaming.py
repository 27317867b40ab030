"""Streaming weighted mean of client updates: memory independent of the number of updates.

Flower's `aggregate_arrayrecords` needs every reply in memory and, per key and reply, builds a
temporary ``value * weight`` before adding it.  `StreamingWeightedMean` takes updates one at a
time (a mapping key -> NumPy array and a weight, e.g. ``num-examples``) and folds each into one
accumulator per key, in place:

* the accumulators are float64 by default (``accumulate_dtype="float32"`` halves the memory
  traffic at the cost of float32 rounding per addition, which is what Flower itself does);
  float64 inputs always accumulate in float64, integer inputs (BatchNorm's
  ``num_batches_tracked``) too;
* ``acc += w * a`` is one fused pass per array when the update already has the accumulator's
  dtype (``kernel="torch"``, the default: torch's vectorised, multi-threaded
  ``add_(a, alpha=w)`` on zero-copy views of the NumPy arrays), so per element the update is
  read once and the accumulator read and written once.  Otherwise (a float32 or float16 update
  into wider accumulators, integers, or ``kernel="numpy"``) it runs block by block through one
  cache-sized scratch buffer: ``w * a`` into the scratch, then one add (two ufunc passes per
  block, one thread);
* peak memory is the accumulators (plus, for the NumPy kernel, one small scratch buffer per
  dtype), whatever the number of updates N; with ``group=k`` up to k updates are also held
  (by reference) until they are folded together, block by block.

`result()` divides by the total weight and returns arrays with the first update's (or a given
reference's) key order, shapes and dtypes; integer arrays are rounded to nearest first, as
the server's screening (`strategy.screening`) does for Flower's result.  NumPy arrays in and
out and no Flower, so Ray workers (`strategy.ray_backend`) use it too.

Any finite weight > 0 is accepted, however large: weights are folded relative to a running
scale (1.0 unless a weight above `RESCALE_ABOVE` arrives, which rescales the accumulators once),
so a factor never exceeds what float32 holds (torch refuses to multiply a float32 tensor by
3.5e38) and huge but similar weights still give the exact mean.  The server itself passes
weights normalised to sum to 1 (`strategy.screening`); the guard is for everyone else.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Flower hands replies over as read-only arrays; the torch views of them are only ever read.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                        category=UserWarning)

KERNELS = ("torch", "numpy")
DEFAULT_BLOCK = 1 << 18  # elements per scratch block: 2 MiB in float64 (measured best on cpu2)
# A weight more than this many times the current scale rescales the accumulators first: far
# below float32's 3.4e38, far above any real ratio of sample counts (so it never costs a pass)
RESCALE_ABOVE = 2.0**64


def _accumulator_dtype(dtype: np.dtype, accumulate_dtype: np.dtype) -> np.dtype:
    """float64 for integers/bools and float64 inputs; else the wider of the two floats."""
    if not np.issubdtype(dtype, np.inexact):
        return np.dtype(np.float64)
    if np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"complex arrays are not supported (dtype {dtype})")
    return np.promote_types(dtype, accumulate_dtype)


def _check_weight(weight: float) -> float:
    if isinstance(weight, bool):
        raise TypeError("weight must be a number, got bool")
    value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"weight must be finite and > 0, got {weight!r}")
    return value


def _torch_foldable(flat: np.ndarray, acc: np.ndarray) -> bool:
    """Same float dtype, native byte order.  A float32 update into a float64 accumulator is
    left to the NumPy kernel: torch casts the whole source first (a full-size temporary), which
    measured slower than NumPy's cache-sized scratch blocks (bench/aggregate.py)."""
    return (flat.dtype == acc.dtype and flat.dtype.kind == "f" and flat.dtype.isnative
            and flat.size > 0)


def _torch_fold(acc: np.ndarray, flat: np.ndarray, weight: float, mode: str) -> None:
    """One fused pass: acc = w*a ("init"), acc += w*a ("axpy") or acc += a ("add")."""
    target, source = torch.from_numpy(acc), torch.from_numpy(flat)
    if mode == "init":
        if weight == 1.0:
            target.copy_(source)
        else:
            torch.mul(source, weight, out=target)
    elif mode == "axpy":
        target.add_(source, alpha=weight)
    else:
        target.add_(source)


class StreamingWeightedMean:
    """Weighted mean of updates given one at a time, accumulated in place.

    >>> acc = StreamingWeightedMean()
    >>> acc.add({"w": np.array([1.0, 2.0], np.float32)}, 1)
    >>> acc.add({"w": np.array([3.0, 6.0], np.float32)}, 3)
    >>> acc.result()["w"]
    array([2.5, 5. ], dtype=float32)

    Parameters
    ----------
    accumulate_dtype : "float64" (default) or "float32"
        Accumulator precision for float32/float16 inputs.
    block : int
        Elements per scratch block (``acc += w * a`` is done block by block).
    threads : int (default: 1)
        Split each update's elements into this many contiguous parts, folded by as many
        threads (NumPy releases the GIL in its loops). Each part has its own scratch buffer.
        With the torch kernel leave it at 1: torch already uses its intra-op threads.
    kernel : "torch" (default) or "numpy"
        What folds floating-point arrays (integer arrays always use NumPy).
    group : int (default: 1)
        Fold this many updates together, block by block: each accumulator block is read and
        written once per group instead of once per update (1 + 2/group bytes of memory
        traffic per update byte instead of 3).  The updates of a group are held, not copied,
        until it is folded: they must not change before that, and peak memory grows by up to
        group - 1 updates unless they are views of data that is in memory anyway (a server's
        received replies, `validation.array_view`).  `sums()` and `result()` fold what is held.
    """

    def __init__(self, accumulate_dtype: str | np.dtype = "float64",
                 block: int = DEFAULT_BLOCK, threads: int = 1, kernel: str = "torch",
                 group: int = 1) -> None:
        self.accumulate_dtype = np.dtype(accumulate_dtype)
        if self.accumulate_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"accumulate_dtype must be float32 or float64, got {accumulate_dtype}")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        self.kernel = kernel
        self.group = int(group)
        # checked updates not folded yet: (flat arrays, weight, mode)
        self._pending: list[tuple[dict[str, np.ndarray], float, str]] = []
        self.block = int(block)
        self.threads = int(threads)
        self._acc: dict[str, np.ndarray] = {}      # flat accumulators
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, np.dtype] = {}     # dtypes of the first update
        # per thread: (key, start, stop, view of the accumulator's [start:stop])
        self._plan: list[list[tuple[str, int, int, np.ndarray]]] = []
        self._scratch: list[dict[np.dtype, np.ndarray]] = []  # per thread, per dtype
        self._pool: ThreadPoolExecutor | None = None
        self.count = 0
        # the accumulators hold sum_i (w_i / scale) a_i; their weight total is kept likewise
        self._scale = 1.0
        self._relative_total = 0.0
        self._finished = False

    @property
    def total_weight(self) -> float:
        """Sum of the weights added (may be inf for weights near float64's limit)."""
        with np.errstate(over="ignore"):
            return float(np.float64(self._relative_total) * self._scale)

    # -- accumulation -------------------------------------------------------------------------

    def _allocate(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Accumulators shaped after the first update, and the split of work among threads."""
        for key, value in arrays.items():
            value = np.asarray(value)
            acc_dtype = _accumulator_dtype(value.dtype, self.accumulate_dtype)
            self._acc[key] = np.empty(value.size, acc_dtype)
            self._shapes[key] = value.shape
            self._dtypes[key] = value.dtype
        total = sum(acc.size for acc in self._acc.values())
        share = max(1, -(-total // self.threads))
        self._plan = [[] for _ in range(self.threads)]
        part, filled = 0, 0
        for key, acc in self._acc.items():
            start = 0
            while start < acc.size:
                stop = min(acc.size, start + share - filled)
                self._plan[part].append((key, start, stop, acc[start:stop]))
                filled += stop - start
                start = stop
                if filled >= share and part < self.threads - 1:
                    part, filled = part + 1, 0
            if acc.size == 0:
                self._plan[part].append((key, 0, 0, acc))
        self._plan = [p for p in self._plan if p]
        self._scratch = [{} for _ in self._plan]

    def _run_part(self, index: int,
                  entries: list[tuple[dict[str, np.ndarray], float, str]]) -> None:
        """Fold entries (flat arrays, weight, mode) into one thread's part of the accumulators;
        mode "init" (acc = w*a), "axpy" (acc += w*a) or "add" (acc += a).  Several entries are
        folded block by block, so each accumulator block stays in cache for all of them."""
        scratch_of = self._scratch[index]
        for key, start, stop, acc in self._plan[index]:
            sources = []
            for flats, weight, mode in entries:
                flat = flats[key]
                if start or stop != flat.size:
                    flat = flat[start:stop]
                sources.append((flat, weight, mode))
            size = stop - start
            if len(sources) == 1 or size <= self.block:
                for flat, weight, mode in sources:
                    self._fold_segment(acc, flat, weight, mode, scratch_of)
                continue
            for lo in range(0, size, self.block):
                hi = min(lo + self.block, size)
                part = acc[lo:hi]
                for flat, weight, mode in sources:
                    self._fold_segment(part, flat[lo:hi], weight, mode, scratch_of)

    def _fold_segment(self, acc: np.ndarray, flat: np.ndarray, weight: float, mode: str,
                      scratch_of: dict[np.dtype, np.ndarray]) -> None:
        """One update's segment into the matching accumulator segment."""
        if self.kernel == "torch" and _torch_foldable(flat, acc):
            _torch_fold(acc, flat, weight, mode)
            return
        if mode == "init":
            if weight == 1.0 and acc.dtype == flat.dtype:
                np.copyto(acc, flat)
            else:
                np.multiply(flat, weight, out=acc, dtype=acc.dtype)
            return
        if mode == "add":
            np.add(acc, flat, out=acc, casting="same_kind")
            return
        block = self.block
        scratch = scratch_of.get(acc.dtype)
        if scratch is None:
            scratch = scratch_of[acc.dtype] = np.empty(block, acc.dtype)
        size = acc.size
        for lo in range(0, size, block):
            hi = min(lo + block, size)
            tmp = scratch[: hi - lo]
            part = acc[lo:hi]
            np.multiply(flat[lo:hi], weight, out=tmp, dtype=acc.dtype)
            np.add(part, tmp, out=part)

    def _check(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Flat views of `arrays`, after checking keys and shapes against the accumulators."""
        if arrays.keys() != self._acc.keys():
            missing = [k for k in self._acc if k not in arrays]
            extra = [k for k in arrays if k not in self._acc]
            raise ValueError(f"update keys differ from the first update's: "
                             f"missing {missing[:8]}, unexpected {extra[:8]}")
        flats: dict[str, np.ndarray] = {}
        for key, shape in self._shapes.items():
            value = np.asarray(arrays[key])
            if value.shape != shape:
                raise ValueError(f"{key!r}: shape {list(value.shape)} != first update's "
                                 f"{list(shape)}")
            if not np.issubdtype(value.dtype, np.number) and value.dtype != np.bool_:
                raise TypeError(f"{key!r}: unsupported dtype {value.dtype}")
            flats[key] = value.reshape(-1)
        return flats

    def _fold(self, arrays: Mapping[str, np.ndarray], weight: float, scale: bool) -> None:
        if self._finished:
            raise RuntimeError("result() was called; start a new StreamingWeightedMean")
        first = not self._acc
        if first:
            self._allocate(arrays)
        try:
            flats = self._check(arrays)
        except (TypeError, ValueError):
            if first:  # a bad first update leaves nothing behind
                self._acc, self._shapes, self._dtypes = {}, {}, {}
            raise
        mode = "init" if first else ("axpy" if scale else "add")
        if first and not scale:
            weight = 1.0
        self._pending.append((flats, weight, mode))
        if len(self._pending) >= self.group:
            self._flush()

    def _flush(self) -> None:
        """Fold the pending updates (all threads' parts)."""
        entries, self._pending = self._pending, []
        if not entries:
            return
        if len(self._plan) == 1:
            self._run_part(0, entries)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(len(self._plan) - 1,
                                            thread_name_prefix="streaming-mean")
        futures = [self._pool.submit(self._run_part, i, entries)
                   for i in range(1, len(self._plan))]
        self._run_part(0, entries)
        for future in futures:
            future.result()

    def add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold in one update with weight `weight` (finite, > 0, any size)."""
        weight = _check_weight(weight)
        if weight / self._scale > RESCALE_ABOVE:
            self._rescale(weight)
        factor = weight / self._scale
        self._fold(arrays, factor, scale=True)
        self.count += 1
        self._relative_total += factor

    def merge(self, sums: Mapping[str, np.ndarray], total_weight: float, count: int = 1,
              *, scale: float = 1.0) -> None:
        """Fold in already weighted sums: ``scale * sums`` is ``sum_i w_i a_i`` of `count`
        updates whose weights total `total_weight` (`scaled_sums()` gives both)."""
        total_weight = _check_weight(total_weight)
        scale = _check_weight(scale)
        if scale / self._scale > RESCALE_ABOVE:
            self._rescale(scale)
        factor = scale / self._scale
        self._fold(sums, factor, scale=factor != 1.0)
        self.count += count
        self._relative_total += total_weight / self._scale

    def _rescale(self, scale: float) -> None:
        """Express the accumulators relative to `scale` instead (one pass; rare, see module doc).
        Contributions that become negligible may underflow to 0, as they would in the mean."""
        self._flush()
        ratio = self._scale / scale
        with np.errstate(over="ignore", under="ignore"):
            for acc in self._acc.values():
                np.multiply(acc, ratio, out=acc)
        self._relative_total *= ratio
        self._scale = scale

    def close(self) -> None:
        """Stop the worker threads (if any); `result()` does this too."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # -- results ------------------------------------------------------------------------------

    def scaled_sums(self) -> tuple[dict[str, np.ndarray], float]:
        """(sums, scale) with ``scale * sums`` the weighted sums: views of the accumulators as
        they are, so no overflow whatever the weights (for `merge(..., scale=scale)`)."""
        self._flush()
        return ({key: acc.reshape(self._shapes[key]) for key, acc in self._acc.items()},
                self._scale)

    def sums(self) -> dict[str, np.ndarray]:
        """The weighted sums ``sum_i w_i a_i`` (views of the accumulators, in their shapes).

        After weights above `RESCALE_ABOVE` the accumulators are first scaled back to absolute
        units, which may overflow to inf (never raises); `result()` has no such limit."""
        self._flush()
        if self._scale != 1.0:
            self._rescale(1.0)
        return {key: acc.reshape(self._shapes[key]) for key, acc in self._acc.items()}

    def result(self, like: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The weighted mean, in `like`'s key order and dtypes (default: the first update's).

        Consumes the accumulators (divided in place); further `add` calls raise.
        """
        if not self._acc or self.count == 0:
            raise ValueError("no updates were added")
        self._flush()
        self.close()
        if like is not None:
            if like.keys() != self._acc.keys():
                raise ValueError("`like` has other keys than the updates")
            order = list(like)
            dtypes = {key: np.asarray(like[key]).dtype for key in order}
        else:
            order, dtypes = list(self._acc), self._dtypes
        self._finished = True
        self._plan = []  # its views would keep every accumulator alive until the end
        out: dict[str, np.ndarray] = {}
        for key in order:
            out[key] = finalize(self._acc.pop(key), self._relative_total, dtypes[key],
                                self._shapes[key])
        self._scratch = []
        return out


def finalize(total: np.ndarray, total_weight: float, dtype: np.dtype,
             shape: tuple[int, ...]) -> np.ndarray:
    """``total / total_weight`` as `dtype` in `shape` (integers rounded to nearest).

    One pass: divides in place when `total` is writable and already has `dtype`, else
    straight into a new array of `dtype` (a read-only `total`, e.g. from Ray's object
    store, is never copied first).
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        if total.flags.writeable and total.dtype == dtype:
            np.divide(total, total_weight, out=total)
            return total.reshape(shape)
        out = np.empty(total.shape, dtype)
        np.divide(total, total_weight, out=out, casting="same_kind")
        return out.reshape(shape)
    if total.flags.writeable and total.dtype == np.float64:
        mean = np.divide(total, total_weight, out=total)
    else:
        mean = np.empty(total.shape, np.float64)  # an array even for 0-d totals
        np.divide(total, total_weight, out=mean)
    np.rint(mean, out=mean)
    return mean.astype(dtype).reshape(shape)


def weighted_mean(updates: Iterable[tuple[Mapping[str, np.ndarray], float]], *,
                  like: Mapping[str, np.ndarray] | None = None,
                  accumulate_dtype: str | np.dtype = "float64",
                  threads: int = 1, kernel: str = "torch", group: int = 1) -> dict[str, np.ndarray]:
    """Weighted mean of ``(arrays, weight)`` pairs, consumed `group` at a time."""
    acc = StreamingWeightedMean(accumulate_dtype, threads=threads, kernel=kernel, group=group)
    try:
        for arrays, weight in updates:
            acc.add(arrays, weight)
        return acc.result(like)
    finally:
        acc.close()
