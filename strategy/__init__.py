"""Server-side aggregation for MinusFed: Flower's rules from a table, the server's screening
around them (validation, weight bounds, frozen arrays, node tracking), backends, checkpoints."""

import minusface  # noqa: F401  (its allocator switch must precede any tensor)

from .aggregation import BACKENDS, RULES, make_strategy
from .checkpoint import CheckpointError, CheckpointStore
from .report import ReportedResult, RoundReport
from .screening import SharedKeyStrategy
from .streaming import StreamingWeightedMean, weighted_mean
from .validation import validate_reply_content, validate_update
from .weights import WeightPolicy

__all__ = [
    "BACKENDS",
    "RULES",
    "CheckpointError",
    "CheckpointStore",
    "ReportedResult",
    "RoundReport",
    "SharedKeyStrategy",
    "StreamingWeightedMean",
    "WeightPolicy",
    "make_strategy",
    "validate_reply_content",
    "validate_update",
    "weighted_mean",
]
