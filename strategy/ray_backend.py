"""Weighted mean of client updates as Ray tasks: parameter shards x tree reduction.

``aggregation-backend = "ray"`` (`strategy.backends.ray_average`). Pure NumPy + Ray,
no Flower, so it can be tested and benchmarked on its own.

How it works
------------
* The flat key list of the first update is cut into **shards** of about `shard_bytes` each
  (whole keys, in order; a key larger than `shard_bytes` is a shard of its own).
* Updates are consumed one at a time: each update's shards are placed in the object store
  (`ray.put`) and the driver drops its own reference to the update.
* Per shard, a **tree reduction** with fan-in `fan_in` (2 = pairwise): every `fan_in` update
  shards go to a leaf task computing the partial weighted sum ``sum_i w_i a_i``
  (`strategy.streaming.StreamingWeightedMean`; float64 accumulators by default, float32
  when the strategy calls it); every `fan_in` partial sums of one level go to a combine task
  one level up. Object references released by the driver are freed by Ray once the task
  that reads them is done, so the object store holds O(fan_in * tree depth + tasks in flight)
  shards, not N updates.
* Backpressure: before putting the next update the driver waits for tasks to finish while
  `max_in_flight` tasks are pending (default: twice the cluster's CPUs) or while the shards
  and partial sums not yet consumed by a finished task exceed `max_pending_bytes` (default:
  30% of one node's object store: freeing is asynchronous, and Ray spills above 80%). This
  bounds memory whatever N is (fan-in - 1 updates per level can still wait for their group).
* The driver gets one partial sum per shard, divides by the total weight and casts to the
  dtypes of `like` (default: the first update's), rounding integer arrays to nearest.
* Weights go to the tasks relative to the first update's weight, so any finite weight > 0 is
  accepted without an exception, and huge but similar weights give the exact mean (see
  `strategy.streaming`).  Only weights more than ~1e308 times apart give a non-finite mean
  (the server normalises weights to sum to 1 first, so it never passes such).

Tasks run with ``max_retries=0``: a retryable task makes Ray keep its lineage (the task and
its arguments) while its output is referenced, which here would pin every update shard put
until the root of the tree is done (measured: the object store filled and spilled to disk
linearly with N). A failed task therefore fails the aggregation instead of being re-run.

Shards of different updates and different shards of one update run in parallel on whatever
cluster the process is connected to (`connect`). Workers must be able to import this module
(`strategy` is installed in the environment the cluster's workers run, as for Flower's own
simulation on a local or `ray start` cluster).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import ray

from .streaming import StreamingWeightedMean, _accumulator_dtype, _check_weight, finalize

DEFAULT_SHARD_BYTES = 64 << 20
DEFAULT_FAN_IN = 4


def _running_local_cluster() -> bool:
    """True when a Ray GCS process runs on this machine (Ray's own `address="auto"` probe)."""
    try:
        from ray._private.services import find_gcs_addresses  # pylint: disable=import-outside-toplevel
    except ImportError:  # private API moved: let ray.init(address="auto") decide
        return True
    try:
        return bool(find_gcs_addresses())
    except Exception:  # pylint: disable=broad-except
        return True


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Make sure this process is connected to a Ray cluster; True if this call connected.

    * already initialized (e.g. by Flower's simulation, or by a test): reuse it;
    * `address` given ("local" starts a fresh local instance): ``ray.init(address=address)``;
    * ``RAY_ADDRESS`` set, or a Ray cluster running on this machine: ``ray.init("auto")``;
    * otherwise start a local instance (`num_cpus`, default all; no dashboard).
    """
    if ray.is_initialized():
        return False
    local: dict[str, Any] = {"include_dashboard": False}
    if num_cpus is not None:
        local["num_cpus"] = num_cpus
    if address is not None:
        ray.init(address=address, **(local if address == "local" else {}))
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
    elif _running_local_cluster():
        try:
            ray.init(address="auto")
        except ConnectionError:
            ray.init(address="local", **local)
    else:
        ray.init(address="local", **local)
    return True


def plan_shards(nbytes: Mapping[str, int], shard_bytes: int) -> list[list[str]]:
    """Cut the keys (in order) into consecutive groups of about `shard_bytes` bytes each."""
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
    shards: list[list[str]] = []
    current: list[str] = []
    filled = 0
    for key, size in nbytes.items():
        if current and filled + size > shard_bytes:
            shards.append(current)
            current, filled = [], 0
        current.append(key)
        filled += size
    if current:
        shards.append(current)
    return shards


Partial = tuple[dict[str, np.ndarray], float]   # (sums, scale): scale * sums = sum_i w_i a_i


@ray.remote(max_retries=0)  # no retries: no lineage pinning (see module doc)
def _leaf_sum(weights: list[float], accumulate_dtype: str,
              *shards: Mapping[str, np.ndarray]) -> Partial:
    """Partial weighted sum of `fan_in` update shards."""
    acc = StreamingWeightedMean(accumulate_dtype)
    for shard, weight in zip(shards, weights, strict=True):
        acc.add(shard, weight)
    return acc.scaled_sums()


@ray.remote(max_retries=0)  # no retries: no lineage pinning (see module doc)
def _combine(accumulate_dtype: str, *partials: Partial) -> Partial:
    """Sum of partial sums (one tree level up)."""
    acc = StreamingWeightedMean(accumulate_dtype)
    for sums, scale in partials:
        acc.merge(sums, 1.0, scale=scale)     # the weight totals are kept by the driver
    return acc.scaled_sums()


class _InFlight:
    """Tasks submitted and not known to be done, and the object-store bytes they pin.

    `pending_bytes` counts update shards put and partial sums produced (or to be produced)
    that no finished task has consumed yet; a task's inputs stop counting once it is done
    (the driver holds no reference to them, so Ray frees them).
    """

    def __init__(self) -> None:
        self.tasks: dict[ray.ObjectRef, int] = {}   # output ref -> bytes of its inputs
        self.pending_bytes = 0

    def submitted(self, out: ray.ObjectRef, input_bytes: int, output_bytes: int) -> None:
        self.tasks[out] = input_bytes
        self.pending_bytes += output_bytes

    def _forget(self, ready: list[ray.ObjectRef]) -> None:
        for ref in ready:
            self.pending_bytes -= self.tasks.pop(ref)

    def throttle(self, max_tasks: int, max_bytes: int) -> None:
        """Drop finished tasks; wait while too many are pending or too many bytes pinned.

        Finished tasks must be dropped: a reference kept here would pin the task's output in
        the object store after the next level has consumed it.
        """
        if self.tasks:
            ready, _ = ray.wait(list(self.tasks), num_returns=len(self.tasks), timeout=0)
            self._forget(ready)
        while self.tasks and (len(self.tasks) >= max_tasks or self.pending_bytes > max_bytes):
            ready, _ = ray.wait(list(self.tasks), num_returns=1)
            self._forget(ready)


class _ShardTree:
    """Pending references of one shard, level by level (level 0: update shards)."""

    def __init__(self, fan_in: int, accumulate_dtype: str, sum_bytes: int,
                 in_flight: _InFlight):
        self.fan_in = fan_in
        self.accumulate_dtype = accumulate_dtype
        self.sum_bytes = sum_bytes  # bytes of one partial sum of this shard
        self.in_flight = in_flight
        self.levels: list[list[tuple[ray.ObjectRef, float, int]]] = []

    def push(self, level: int, ref: ray.ObjectRef, weight: float, nbytes: int) -> None:
        while len(self.levels) <= level:
            self.levels.append([])
        self.levels[level].append((ref, weight, nbytes))
        if len(self.levels[level]) >= self.fan_in:
            self._reduce(level)

    def _reduce(self, level: int) -> None:
        items, self.levels[level] = self.levels[level], []
        refs = [ref for ref, _, _ in items]
        weights = [weight for _, weight, _ in items]
        if level == 0:
            out = _leaf_sum.remote(weights, self.accumulate_dtype, *refs)
        else:
            out = _combine.remote(self.accumulate_dtype, *refs)
        self.in_flight.submitted(out, sum(n for _, _, n in items), self.sum_bytes)
        self.push(level + 1, out, sum(weights), self.sum_bytes)

    def finish(self) -> ray.ObjectRef:
        """Reduce what is left; the reference of this shard's weighted sum."""
        level = 0
        while True:
            items = self.levels[level] if level < len(self.levels) else []
            above = any(self.levels[level + 1:])
            if not items:
                if not above:
                    raise ValueError("no updates were added")
            elif level > 0 and len(items) == 1 and not above:
                return items[0][0]
            elif level > 0 and len(items) == 1:
                self.levels[level] = []
                self.push(level + 1, *items[0])
            else:
                self._reduce(level)  # level 0: even one update needs its weight applied
            level += 1


def _cluster_cpus() -> int:
    try:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    except Exception:  # pylint: disable=broad-except
        return 1


def _object_store_budget() -> int:
    """30% of one node's object store (the driver's puts land in its own node's store)."""
    try:
        total = float(ray.cluster_resources().get("object_store_memory", 0))
        nodes = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
    except Exception:  # pylint: disable=broad-except
        return 1 << 30
    return int(0.3 * total / nodes) if total > 0 else 1 << 30


# pylint: disable=too-many-arguments,too-many-locals
def ray_weighted_mean(
    updates: Iterable[tuple[Mapping[str, np.ndarray], float]],
    *,
    like: Mapping[str, np.ndarray] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    fan_in: int = DEFAULT_FAN_IN,
    accumulate_dtype: str = "float64",
    max_in_flight: int | None = None,
    max_pending_bytes: int | None = None,
    address: str | None = None,
) -> dict[str, np.ndarray]:
    """Weighted mean of ``(arrays, weight)`` pairs, computed by Ray tasks (see module doc).

    The result has `like`'s key order and dtypes (default: the first update's); it equals
    `strategy.streaming.weighted_mean` up to float rounding (the summation order differs).
    """
    if fan_in < 2:
        raise ValueError(f"fan_in must be >= 2, got {fan_in}")
    np.dtype(accumulate_dtype)  # fail early on a bad name
    iterator: Iterator[tuple[Mapping[str, np.ndarray], float]] = iter(updates)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("no updates were added") from None
    connect(address)
    if max_in_flight is None:
        max_in_flight = 2 * _cluster_cpus()
    if max_pending_bytes is None:
        max_pending_bytes = _object_store_budget()

    first_arrays = {key: np.asarray(value) for key, value in first[0].items()}
    shapes = {key: value.shape for key, value in first_arrays.items()}
    dtypes_in = {key: value.dtype for key, value in first_arrays.items()}
    dtypes = dtypes_in
    if like is not None:
        if like.keys() != shapes.keys():
            raise ValueError("`like` has other keys than the updates")
        dtypes = {key: np.asarray(like[key]).dtype for key in like}
    order = list(like) if like is not None else list(shapes)
    shards = plan_shards({key: value.nbytes for key, value in first_arrays.items()},
                         shard_bytes)
    del first_arrays

    def sum_bytes(keys: list[str]) -> int:
        return sum(
            int(np.prod(shapes[key], dtype=np.int64))
            * _accumulator_dtype(dtypes_in[key], np.dtype(accumulate_dtype)).itemsize
            for key in keys
        )

    in_flight = _InFlight()
    trees = [_ShardTree(fan_in, accumulate_dtype, sum_bytes(keys), in_flight)
             for keys in shards]
    total_weight = 0.0           # relative to `base`, the first update's weight
    base = _check_weight(first[1])
    head = [first]
    del first

    def stream() -> Iterator[tuple[Mapping[str, np.ndarray], float]]:
        yield head.pop()  # the driver keeps no reference to an update once it is put
        yield from iterator

    for index, (arrays, weight) in enumerate(stream()):
        weight = min(_check_weight(weight) / base, sys.float_info.max)   # inf only past 1e308
        if arrays.keys() != shapes.keys():
            raise ValueError(f"update {index}: keys differ from the first update's")
        for key, shape in shapes.items():
            if np.shape(arrays[key]) != shape:
                raise ValueError(f"update {index}: {key!r} has shape "
                                 f"{list(np.shape(arrays[key]))} != {list(shape)}")
        # Backpressure: bound the tasks pending in the cluster and the bytes they pin
        in_flight.throttle(max_in_flight, max_pending_bytes)
        for tree, keys in zip(trees, shards, strict=True):
            shard = {key: np.asarray(arrays[key]) for key in keys}
            nbytes = sum(value.nbytes for value in shard.values())
            in_flight.pending_bytes += nbytes
            tree.push(0, ray.put(shard), weight, nbytes)
            del shard
        total_weight += weight
        del arrays

    finals = [tree.finish() for tree in trees]
    out: dict[str, np.ndarray] = {}
    for ref in finals:
        sums, scale = ray.get(ref)
        for key, total in sums.items():
            out[key] = finalize(total, total_weight / scale, dtypes[key], shapes[key])
        del sums
    return {key: out[key] for key in order}
