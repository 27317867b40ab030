"""Server-side aggregation for MinusFed: validation, robust rules, checkpoints."""

from .aggregation import RULES, SharedKeyFedAvg, make_strategy, normalize_rule
from .checkpoint import CheckpointError, CheckpointStore
from .validation import validate_reply_content, validate_update

__all__ = [
    "RULES",
    "CheckpointError",
    "CheckpointStore",
    "SharedKeyFedAvg",
    "make_strategy",
    "normalize_rule",
    "validate_reply_content",
    "validate_update",
]
