"""Server-side aggregation for MinusFed: validation, robust rules, checkpoints."""

import minusface  # noqa: F401  (its allocator switch must precede any tensor)

from .aggregation import (
    BACKENDS,
    RULES,
    SharedKeyFedAvg,
    make_strategy,
    normalize_backend,
    normalize_rule,
)
from .checkpoint import CheckpointError, CheckpointStore
from .streaming import StreamingWeightedMean, weighted_mean
from .validation import validate_reply_content, validate_update

__all__ = [
    "BACKENDS",
    "RULES",
    "CheckpointError",
    "CheckpointStore",
    "SharedKeyFedAvg",
    "StreamingWeightedMean",
    "make_strategy",
    "normalize_backend",
    "normalize_rule",
    "validate_reply_content",
    "validate_update",
    "weighted_mean",
]
