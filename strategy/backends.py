"""The arithmetic of rule "fedavg", by backend name: a callable that averages updates.

A backend is an `Average`: it takes ``(arrays, weight)`` pairs (NumPy arrays by key, one pair
per accepted reply, weights already bounded and normalised by the strategy) and returns the
weighted mean with the first update's key order and dtypes.  `rules.AveragingFedAvg` calls it
in place of Flower's `aggregate_arrayrecords`; "flower" maps to None: Flower's own arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from .streaming import weighted_mean

Update = tuple[Mapping[str, np.ndarray], float]
Average = Callable[[Iterable[Update]], dict[str, np.ndarray]]

# Accumulator precision of the "streaming" and "ray" backends.  float32, as Flower's FedAvg
# accumulates float32 replies: summing N = 100 terms costs at most ~N * 6e-8 relative error,
# far below a float16 wire's 4.9e-4 per weight, and float32 accumulation runs as one fused
# pass (bench/aggregate.py compares it with float64).  float16 replies still accumulate in
# float32 (Flower's own arithmetic would sum them in float16).
BACKEND_ACCUMULATE = "float32"
# Replies are folded 8 at a time (`StreamingWeightedMean(group=...)`): each accumulator block
# is then read and written once per 8 updates instead of once per update.  The replies are
# already in the server's memory and are read as views (`validation.array_view`), so holding
# 8 of them costs no memory (bench/aggregate.py: "streaming" vs "streaming-g1").
BACKEND_GROUP = 8


def streaming_average(updates: Iterable[Update]) -> dict[str, np.ndarray]:
    """`streaming.weighted_mean`: updates folded in place into float32 accumulators."""
    return weighted_mean(updates, accumulate_dtype=BACKEND_ACCUMULATE, group=BACKEND_GROUP)


def ray_average(updates: Iterable[Update]) -> dict[str, np.ndarray]:
    """`ray_backend.ray_weighted_mean`: Ray tasks over parameter shards, tree reduction."""
    # Imported here: Ray is heavy and only this backend needs it
    from .ray_backend import ray_weighted_mean  # pylint: disable=import-outside-toplevel

    return ray_weighted_mean(updates, accumulate_dtype=BACKEND_ACCUMULATE)


# Backend name -> its arithmetic; None: Flower's own `aggregate_arrayrecords`
BACKEND_AVERAGES: dict[str, Average | None] = {
    "flower": None,
    "streaming": streaming_average,
    "ray": ray_average,
}
