"""Server-side checks on what a client sends back.

Flower's strategies only check that replies are *consistent with each other*
(one ArrayRecord, one MetricRecord, same keys) and raise if they are not, which
stops the whole run. A federated face-recognition server must instead expect
individual bad replies: a private head returned by mistake, a model of another
preset, NaNs from a diverged client, or a deliberately scaled update. These
functions compare each reply with the global arrays the server itself sent, so a
bad reply can be dropped with a readable reason while the round goes on.
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np

from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common import NDArray

MAX_LISTED_KEYS = 8


def _fmt_keys(keys: Sequence[str]) -> str:
    """List keys readably without flooding the log for a wholly wrong model."""
    shown = ", ".join(repr(k) for k in keys[:MAX_LISTED_KEYS])
    rest = len(keys) - MAX_LISTED_KEYS
    return f"{shown}, ... (+{rest} more)" if rest > 0 else shown


def _as_numpy(value: Array | NDArray) -> NDArray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def reference_to_numpy(reference: ArrayRecord) -> dict[str, NDArray]:
    """Decode the global arrays once per round instead of once per reply."""
    return {key: array.numpy() for key, array in reference.items()}


# pylint: disable=too-many-locals,too-many-branches
def validate_update(
    arrays: ArrayRecord,
    reference: ArrayRecord | Mapping[str, NDArray],
    max_update_norm: float | None = None,
    *,
    max_bytes: int | None = None,
) -> list[str]:
    """Return the problems of `arrays` as an update of `reference` (empty = valid).

    Checks, in order: total size (before anything is decoded), key set, each
    array's shape and dtype (both its declared header and its decoded data, since
    a sender controls both), finiteness, and the L2 norm of ``arrays - reference``
    over all floating-point arrays. Integer buffers such as BatchNorm's
    ``num_batches_tracked`` are counters, not weights: they are checked for shape
    and dtype but left out of the norm, where they would otherwise dominate.
    """
    problems: list[str] = []
    if max_bytes is not None:
        size = arrays.count_bytes()
        if size > max_bytes:
            # Do not decode an oversized payload at all
            return [f"oversized update: {size} bytes > limit {max_bytes}"]

    missing = [key for key in reference if key not in arrays]
    extra = [key for key in arrays if key not in reference]
    if missing:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_fmt_keys(extra)}")

    squared_norm = 0.0
    for key in reference:
        if key not in arrays:
            continue
        expected = _as_numpy(reference[key])
        sent = arrays[key]
        try:
            value = sent.numpy()
        except (TypeError, ValueError, OSError, EOFError) as exc:
            problems.append(f"{key!r}: cannot decode array ({exc})")
            continue
        if tuple(sent.shape) != value.shape or sent.dtype != str(value.dtype):
            problems.append(
                f"{key!r}: header says {sent.dtype}{list(sent.shape)} but data is "
                f"{value.dtype}{list(value.shape)}"
            )
            continue
        if value.shape != expected.shape:
            problems.append(
                f"{key!r}: shape {list(value.shape)} != expected "
                f"{list(expected.shape)}"
            )
            continue
        if value.dtype != expected.dtype:
            problems.append(
                f"{key!r}: dtype {value.dtype} != expected {expected.dtype}"
            )
            continue
        if not np.issubdtype(value.dtype, np.inexact):
            continue
        num_bad = value.size - int(np.count_nonzero(np.isfinite(value)))
        if num_bad:
            problems.append(f"{key!r}: {num_bad} non-finite value(s) (NaN/Inf)")
            continue
        diff = value.astype(np.float64) - expected.astype(np.float64)
        squared_norm += float(np.vdot(diff, diff))

    if max_update_norm is not None:
        norm = math.sqrt(squared_norm)
        if norm > max_update_norm:
            problems.append(
                f"update norm {norm:.6g} exceeds max_update_norm {max_update_norm:.6g}"
            )
    return problems


def validate_reply_content(
    content: RecordDict,
    *,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str | None = "arrays",
) -> list[str]:
    """Return structural problems of a reply (empty = valid).

    Mirrors Flower's `validate_message_reply_consistency`, but per reply and
    without raising: exactly one ArrayRecord (named `arrayrecord_key`; pass None
    for evaluate replies, which carry none) and exactly one MetricRecord holding
    a finite scalar weight `weighted_by_key` > 0. Extra ConfigRecords are allowed.
    """
    problems: list[str] = []
    if arrayrecord_key is not None:
        names = list(content.array_records.keys())
        if names != [arrayrecord_key]:
            problems.append(
                f"expected exactly one ArrayRecord named {arrayrecord_key!r}, "
                f"got {names}"
            )
    metric_names = list(content.metric_records.keys())
    if len(metric_names) != 1:
        problems.append(f"expected exactly one MetricRecord, got {metric_names}")
        return problems
    metrics = content.metric_records[metric_names[0]]
    if weighted_by_key not in metrics:
        problems.append(f"MetricRecord lacks the weight {weighted_by_key!r}")
        return problems
    weight = metrics[weighted_by_key]
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        problems.append(
            f"{weighted_by_key!r} must be a scalar, got {type(weight).__name__}"
        )
    elif not math.isfinite(weight) or weight <= 0:
        problems.append(f"{weighted_by_key!r} must be finite and > 0, got {weight}")
    return problems
