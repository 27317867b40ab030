"""What a round produced besides the model: every reply with its verdict, and which nodes
were sampled, replied or dropped out.

`SharedKeyStrategy.start()` returns it inside a `ReportedResult` (Flower's `Result` plus
`report`); the ServerApp writes `report.replies` to metrics.jsonl, one "client" line each, and
`report.node_summary()` into the round's metrics.  Every entry is bounded: a hostile reply
cannot bloat metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from flwr.app import Message
from flwr.serverapp.strategy import Result

from .validation import INT64_MAX, MAX_KEY_CHARS, MAX_LIST_LEN, MAX_METRIC_KEYS, short

# Metrics of a rejected reply copied into its entry: enough to see what it was, not enough
# to bloat metrics.jsonl (16 keys of at most 8 values)
LOGGED_KEYS_OF_REJECTED = 16
LOGGED_LIST_OF_REJECTED = 8


@dataclass
class RoundReport:
    """The replies and node lists of the rounds one `start()` (or direct calls) went through.

    replies : one entry per reply, in arrival order: {"round", "phase", "node_id", "metrics"
        (the reply's own, bounded; the claimed weight first), "accepted", "problems", "weight"
        (the effective weight, None if rejected or not weighed), "notes"}, and
        "metrics_left_out" when metrics were cut.
    nodes : per round and phase, {"round", "phase", "sampled", "replied", "dropped",
        "silent"} (node ids, sorted).
    """

    replies: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rejected(self) -> list[dict[str, Any]]:
        """The rejected replies: {"round", "phase", "node_id", "problems"} each."""
        return [{k: e[k] for k in ("round", "phase", "node_id", "problems")}
                for e in self.replies if not e["accepted"]]

    def node_summary(self) -> dict[str, Any]:
        """Sampled / replied / dropped node ids per phase (the last round's, if several).

        Returns ``{"nodes": {phase: {"sampled": [...], "replied": [...], "dropped": [...],
        "silent": [...]}}, "dropped": [...]}`` (ids sorted; the top-level "dropped" over all
        phases).  "replied" counts any reply the node sent itself, an error reply included;
        "dropped" are sampled nodes that sent none (dead, unreachable, or too slow for the
        round timeout); "silent" those of them without even a SuperLink-made error reply (the
        round timed out on them).
        """
        nodes = {
            entry["phase"]: {k: entry[k] for k in ("sampled", "replied", "dropped", "silent")}
            for entry in self.nodes
        }
        dropped = sorted({n for entry in self.nodes for n in entry["dropped"]})
        return {"nodes": nodes, "dropped": dropped}


@dataclass
class ReportedResult(Result):
    """Flower's `Result` of a `start()` call, with the `RoundReport` of its rounds."""

    report: RoundReport = field(default_factory=RoundReport)

    @classmethod
    def of(cls, result: Result, report: RoundReport) -> ReportedResult:
        return cls(**{f.name: getattr(result, f.name) for f in fields(Result)}, report=report)


def reply_entry(server_round: int, phase: str, node_id: int, msg: Message, weight_key: str,
                problems: list[str]) -> dict[str, Any]:
    """A reply's entry in `RoundReport.replies` (its weight is filled in once weighed)."""
    metrics, left_out = _metrics_dict(
        msg, weight_key,
        *((LOGGED_KEYS_OF_REJECTED, LOGGED_LIST_OF_REJECTED) if problems
          else (MAX_METRIC_KEYS, MAX_LIST_LEN)))
    entry: dict[str, Any] = {
        "round": server_round,
        "phase": phase,
        "node_id": node_id,
        "metrics": metrics,
        "accepted": not problems,
        "problems": problems,
        "weight": None,
        "notes": [],
    }
    if left_out:
        entry["metrics_left_out"] = left_out
    return entry


def _loggable(value: Any, list_len: int = MAX_LIST_LEN) -> Any:
    """A metric value as JSON can hold it: lists cut to `list_len`, no giant ints."""
    if isinstance(value, list):
        return [_loggable(v) for v in value[:list_len]]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        return "int outside int64"
    return value


def _metrics_dict(msg: Message, first: str, limit: int,
                  list_len: int) -> tuple[dict[str, Any], int]:
    """Bounded plain copy of a reply's metrics (all MetricRecords merged), and how many keys
    were left out: at most `limit` keys (`first`, the weight, first), names cut to
    MAX_KEY_CHARS, lists to `list_len` values."""
    if msg.has_error():
        return {}, 0
    records = list(msg.content.metric_records.values())
    merged: dict[str, Any] = {}
    for record in records:
        if first in record:
            merged[first] = _loggable(record[first], list_len)
            break
    for record in records:
        for key, value in record.items():
            if len(merged) >= limit:
                break
            merged.setdefault(short(key, MAX_KEY_CHARS), _loggable(value, list_len))
    total = sum(len(record) for record in records)
    return merged, max(0, total - len(merged))
