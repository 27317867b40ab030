"""FedAvg for shared keys only, with per-reply validation and a choice of rules.

MinusFed sends clients only the *shared* part of the model (the private ArcFace
head never leaves the client) and, in stage 2, a frozen network they need but
must not train. This strategy:

* checks each train reply against the arrays sent that round (see
  `validation.py`) and drops bad replies with a logged reason instead of letting
  Flower raise `InconsistentMessageReplies` and end the run;
* aggregates the remaining replies with one of Flower's own rules (FedAvg,
  FedMedian, FedTrimmedAvg, Krum, MultiKrum) by delegating to an inner Flower
  strategy, so the arithmetic is exactly Flower's; for "fedavg" the weighted
  average can instead be computed by `streaming.py` (one reply decoded at a
  time, in-place accumulators) or `ray_backend.py` (Ray tasks over parameter
  shards, tree reduction): the `backend` option;
* adds read-only ArrayRecords (`frozen_arrays`) to every train message;
* bounds each reply's influence on the weighted rules (see "Weights" below);
* never lets one reply's data end the run: an exception while validating or
  aggregating is traced back to the reply that causes it, which is rejected (with
  the traceback logged), and the round goes on with the rest;
* keeps per-node metrics in `round_log` for per-client reporting (bounded: a
  hostile reply cannot bloat `metrics.jsonl`);
* records, per round and phase, which nodes were sampled, which replied and
  which dropped out (`round_nodes`, `node_summary()`): a node that dies
  mid-round gets an error reply from the SuperLink (Node Unavailable, once it
  misses its heartbeats) or no reply within the `start(timeout=...)`; either
  way the round goes on with the replies that came, and the node is listed
  under "dropped".

Weights
-------
FedAvg weights each reply by the `num-examples` the site itself reports, so an
unchecked claim lets one site take over the global model.  The server therefore:

1. rejects a claim that is not a whole number >= 1 (0.5, NaN, inf, bool, negative)
   or is above `max_num_examples` (run config `max-num-examples`, default 1,000,000:
   CASIA-WebFace, 494k images, fits at one site; a site with more must raise it);
2. with `weighting="equal"` gives every accepted reply weight 1 (no trust in claims;
   a small site then counts as much as a big one);
3. with `weighting="num-examples"` (default) clips each claim to `max_weight_ratio`
   x the lower median of the round's accepted claims (run config `max-weight-ratio`,
   default 4; 0 = off).  With n sites of equal honest size one liar then holds at
   most ratio / (ratio + n - 1) of the weight (4 sites: 57%, 10 sites: 31%) instead
   of all of it.  The trade-off: an honest site more than `ratio` times the median
   also counts as only `ratio` x the median (non-IID federations with very unequal
   sites may want a larger ratio); the lower median of two claims is the smaller, so
   with 2 sites the larger counts at most `ratio` times the smaller.
   Clipping is logged and noted per reply in `round_log` ("weight clipped from N to M").

The effective weights are written, normalised to sum to 1, into the accepted
replies' MetricRecord (`weighted_by_key`), which is what every Flower rule and the
"streaming"/"ray" backends read: the arrays of FedAvg and MultiKrum, and the
aggregated metrics of every rule (FedMedian, FedTrimmedAvg and Krum do not weight
arrays).  `round_log` keeps the claimed value under "metrics" and the effective
one under "weight".
"""

import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from typing import Any, cast

import numpy as np

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import NDArray
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from task.config import AGGREGATION_BACKENDS as BACKENDS
from task.config import AGGREGATION_RULES as RULES
from task.config import WEIGHTINGS, normalize_backend, normalize_rule, normalize_weighting

from .streaming import weighted_mean
from .validation import (
    INT64_MAX,
    MAX_KEY_CHARS,
    MAX_LIST_LEN,
    MAX_METRIC_KEYS,
    MAX_REASON_CHARS,
    array_view,
    name_of,
    nonfinite_count,
    reference_to_numpy,
    short,
    validate_reply_content,
    validate_update,
)

# Accumulator precision of the "streaming" and "ray" backends.  float32, as Flower's FedAvg
# accumulates float32 replies: summing N = 100 terms costs at most ~N * 6e-8 relative error,
# far below a float16 wire's 4.9e-4 per weight, and float32 accumulation runs as one fused
# pass (2.1-2.6x the float64 speed in bench/aggregate.py).  float16 replies still accumulate in
# float32 (Flower's own arithmetic would sum them in float16).
BACKEND_ACCUMULATE = "float32"
# Replies are folded 8 at a time (`StreamingWeightedMean(group=...)`): each accumulator block
# is then read and written once per 8 updates instead of once per update.  The replies are
# already in the server's memory and are read as views (`validation.array_view`), so holding
# 8 of them costs no memory (bench/aggregate.py: "streaming" vs "streaming-g1").
BACKEND_GROUP = 8

# Defaults of the run-config keys max-num-examples / max-weight-ratio (module doc, "Weights")
DEFAULT_MAX_NUM_EXAMPLES = 1_000_000
DEFAULT_MAX_WEIGHT_RATIO = 4.0
# Metrics of a rejected reply copied into round_log (and metrics.jsonl): enough to see what
# it was, not enough to bloat the file (16 keys of at most 8 values)
LOGGED_KEYS_OF_REJECTED = 16
LOGGED_LIST_OF_REJECTED = 8

MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]


@dataclass
class _Screened:
    """An accepted reply, its `round_log` entry and the weight it claimed (as sent)."""

    msg: Message
    entry: dict[str, Any]
    claimed: int | float

    @property
    def weights(self) -> MetricRecord:
        """The reply's (only) MetricRecord, which holds the weight."""
        return next(iter(self.msg.content.metric_records.values()))


def _loggable(value: Any, list_len: int = MAX_LIST_LEN) -> Any:
    """A metric value as JSON can hold it: lists cut to `list_len`, no giant ints."""
    if isinstance(value, list):
        return [_loggable(v) for v in value[:list_len]]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        return "int outside int64"
    return value


def _metrics_dict(msg: Message, first: str, limit: int,
                  list_len: int) -> tuple[dict[str, Any], int]:
    """Bounded plain copy of a reply's metrics (all MetricRecords merged) for `round_log`, and
    how many keys were left out: at most `limit` keys (`first`, the weight, first), names cut
    to MAX_KEY_CHARS, lists to `list_len` values."""
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


def _fmt_weight(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"


def _shares(weights: list[float]) -> list[float]:
    """Weights normalised to sum to 1, in float64 without overflow for any finite weights."""
    top = max(weights)
    scaled = [w / top for w in weights]
    total = math.fsum(scaled)
    return [w / total for w in scaled]


def _harmonize_metric_keys(replies: list[Message], phase: str) -> None:
    """Drop metrics that cannot be averaged across all accepted replies.

    Flower raises `InconsistentMessageReplies` (ending the run) when clients
    report different metric keys, and fails on lists of unequal length. A metric
    only some clients report is not worth losing their updates for, so it is
    removed from the replies (Flower's FedMedian mutates replies too).
    """
    records = [next(iter(m.content.metric_records.values())) for m in replies]
    shared = set.intersection(*(set(r.keys()) for r in records))
    dropped = set().union(*(set(r.keys()) for r in records)) - shared
    for key in shared:
        kinds = {
            len(value) if isinstance(value, list) else -1
            for value in (rec[key] for rec in records)
        }
        if len(kinds) > 1:
            dropped.add(key)
    if not dropped:
        return
    log(
        WARNING,
        "aggregate_%s: metrics %s are not reported alike by all nodes; "
        "left out of the aggregated metrics",
        phase,
        sorted(dropped),
    )
    for record in records:
        for key in dropped & set(record.keys()):
            del record[key]


def _like_reference(
    arrays: ArrayRecord, reference: Mapping[str, NDArray]
) -> ArrayRecord:
    """Give the aggregate the reference's key order and dtypes.

    Flower's averaging turns integer buffers (e.g. `num_batches_tracked`) into
    float64 and `np.median` may upcast; clients would then send back int64 for a
    float64 reference and be rejected next round.
    """
    out = ArrayRecord()
    for key, expected in reference.items():
        value = arrays[key].numpy()
        if value.dtype != expected.dtype:
            if np.issubdtype(expected.dtype, np.integer):
                value = np.rint(value)
            value = value.astype(expected.dtype)
        # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,)
        out[key] = Array(np.asarray(value, order="C"))
    return out


# pylint: disable=too-many-instance-attributes
class SharedKeyFedAvg(FedAvg):
    """FedAvg with reply validation, robust aggregation rules and frozen arrays.

    Parameters
    ----------
    fraction_train ... evaluate_metrics_aggr_fn
        As for Flower's `FedAvg`; sampling and evaluation are FedAvg's.
    rule : str (default: "fedavg")
        One of `RULES`: "fedavg" (weighted by `weighted_by_key`), "median"
        (coordinate-wise, Flower's FedMedian), "trimmed-mean" (Flower's
        FedTrimmedAvg with `beta`), "krum" / "multi-krum" (Flower's Krum /
        MultiKrum with `num_malicious_nodes`).
    beta : float (default: 0.2)
        Fraction trimmed from each tail for "trimmed-mean", in [0, 0.5).
    num_malicious_nodes : int (default: 0)
        Assumed number of Byzantine nodes f for "krum" / "multi-krum".
    num_nodes_to_select : Optional[int] (default: None)
        Updates averaged by "multi-krum"; None selects n - f of the n accepted.
    max_update_norm : Optional[float] (default: None)
        Reject replies whose L2 distance to the sent arrays exceeds this.
    max_update_bytes : Optional[int] (default: None)
        Reject replies whose ArrayRecord is larger than this, before decoding.
    frozen_arrays : Optional[dict[str, ArrayRecord]] (default: None)
        Read-only ArrayRecords added to every train message under their names.
        Never aggregated and not expected back.
    weighting : str (default: "num-examples")
        One of `WEIGHTINGS`: weight replies by their (bounded) `weighted_by_key`
        claim, or "equal" (weight 1 each). See the module doc, "Weights".
    max_num_examples : Optional[int] (default: 1,000,000)
        Reject a reply whose `weighted_by_key` claim is larger; None: no cap.
    max_weight_ratio : Optional[float] (default: 4.0)
        Clip each weight to this many times the lower median of the round's
        accepted weights; None or 0: off.
    backend : str (default: "flower")
        One of `BACKENDS`, the arithmetic of rule "fedavg": "flower" (Flower's
        own `aggregate_arrayrecords`), "streaming" (`streaming.py`: replies
        decoded and folded one at a time into float32 accumulators) or "ray"
        (`ray_backend.py`: Ray tasks over parameter shards on the connected or a
        local Ray cluster). Other rules always use Flower's arithmetic.
    """

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggrFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggrFn | None = None,
        *,
        rule: str = "fedavg",
        beta: float = 0.2,
        num_malicious_nodes: int = 0,
        num_nodes_to_select: int | None = None,
        max_update_norm: float | None = None,
        max_update_bytes: int | None = None,
        frozen_arrays: Mapping[str, ArrayRecord] | None = None,
        backend: str = "flower",
        weighting: str = "num-examples",
        max_num_examples: int | None = DEFAULT_MAX_NUM_EXAMPLES,
        max_weight_ratio: float | None = DEFAULT_MAX_WEIGHT_RATIO,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if num_malicious_nodes < 0:
            raise ValueError("`num_malicious_nodes` must be >= 0.")
        if num_nodes_to_select is not None and num_nodes_to_select < 1:
            raise ValueError("`num_nodes_to_select` must be >= 1 or None.")
        if max_update_norm is not None and not max_update_norm > 0:
            raise ValueError("`max_update_norm` must be > 0 or None.")
        if max_num_examples is not None and (
            isinstance(max_num_examples, bool) or not isinstance(max_num_examples, int)
            or max_num_examples < 1
        ):
            raise ValueError(f"`max_num_examples` must be an int >= 1 or None, "
                             f"got {max_num_examples!r}")
        if max_weight_ratio and not (math.isfinite(max_weight_ratio) and max_weight_ratio >= 1):
            raise ValueError(f"`max_weight_ratio` must be >= 1, or 0/None (off), "
                             f"got {max_weight_ratio!r}")
        self.weighting = normalize_weighting(weighting)
        self.max_num_examples = max_num_examples
        self.max_weight_ratio = float(max_weight_ratio) if max_weight_ratio else None
        self.rule = normalize_rule(rule)
        self.backend = normalize_backend(backend)
        if self.backend != "flower" and self.rule != "fedavg":
            log(
                WARNING,
                "aggregation backend %r applies to rule 'fedavg' only; "
                "rule %r uses Flower's arithmetic",
                self.backend,
                self.rule,
            )
        self.beta = beta
        self.num_malicious_nodes = num_malicious_nodes
        self.num_nodes_to_select = num_nodes_to_select
        self.max_update_norm = max_update_norm
        self.max_update_bytes = max_update_bytes
        self.frozen_arrays = dict(frozen_arrays or {})
        self._inner = self._make_inner(train_metrics_aggr_fn, evaluate_metrics_aggr_fn)

        # Global arrays sent in the current round, decoded once
        self._reference: dict[str, NDArray] | None = None
        self.rejected: list[dict[str, Any]] = []
        self.round_log: list[dict[str, Any]] = []
        # Per phase: sampled / replied / dropped node ids (see `node_summary`)
        self.round_nodes: list[dict[str, Any]] = []
        # Metadata of the messages sent in the current round, per phase: the grid
        # fills in their message ids when it pushes them, which maps a reply the
        # SuperLink generated (src = SuperLink) back to the node it was meant for
        self._sent: dict[str, list[Any]] = {}

    @property
    def frozen_arrays(self) -> dict[str, ArrayRecord]:
        """Read-only ArrayRecords added to each train message (settable per stage)."""
        return self._frozen_arrays

    @frozen_arrays.setter
    def frozen_arrays(self, value: Mapping[str, ArrayRecord]) -> None:
        reserved = {self.arrayrecord_key, self.configrecord_key}
        for name, record in value.items():
            if name in reserved:
                raise ValueError(f"frozen_arrays name {name!r} clashes with {reserved}")
            if not isinstance(record, ArrayRecord):
                raise TypeError(f"frozen_arrays[{name!r}] must be an ArrayRecord")
        self._frozen_arrays = dict(value)

    def _make_inner(
        self,
        train_metrics_aggr_fn: MetricsAggrFn | None,
        evaluate_metrics_aggr_fn: MetricsAggrFn | None,
    ) -> FedAvg:
        """Build the Flower strategy whose `aggregate_train` does the arithmetic."""
        common: dict[str, Any] = {
            "weighted_by_key": self.weighted_by_key,
            "arrayrecord_key": self.arrayrecord_key,
            "configrecord_key": self.configrecord_key,
            "train_metrics_aggr_fn": train_metrics_aggr_fn,
            "evaluate_metrics_aggr_fn": evaluate_metrics_aggr_fn,
        }
        if self.rule == "median":
            return FedMedian(**common)
        if self.rule == "trimmed-mean":
            return FedTrimmedAvg(**common, beta=self.beta)
        if self.rule == "krum":
            return Krum(**common, num_malicious_nodes=self.num_malicious_nodes)
        if self.rule == "multi-krum":
            return MultiKrum(
                **common,
                num_malicious_nodes=self.num_malicious_nodes,
                num_nodes_to_select=self.num_nodes_to_select or 1,
            )
        return FedAvg(**common)

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> SharedKeyFedAvg settings:")
        log(INFO, "\t│\t├── Aggregation rule: %s", self.rule)
        log(INFO, "\t│\t├── Aggregation backend: %s", self.backend)
        if self.rule == "trimmed-mean":
            log(INFO, "\t│\t├── beta: %s", self.beta)
        if self.rule in ("krum", "multi-krum"):
            log(INFO, "\t│\t├── Malicious nodes: %d", self.num_malicious_nodes)
        if self.rule == "multi-krum":
            selected = self.num_nodes_to_select or "n - f"
            log(INFO, "\t│\t├── Nodes to select: %s", selected)
        log(INFO, "\t│\t├── Max update norm: %s", self.max_update_norm)
        log(INFO, "\t│\t├── Max update bytes: %s", self.max_update_bytes)
        log(INFO, "\t│\t├── Weighting: %s (max num-examples %s, max weight ratio %s)",
            self.weighting, self.max_num_examples, self.max_weight_ratio)
        log(INFO, "\t│\t└── Frozen ArrayRecords: %s", list(self.frozen_arrays))
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of training and remember what was sent."""
        # Read-only views of the immutable bytes sent: later changes to `arrays` cannot reach them
        self._reference = reference_to_numpy(arrays)
        messages = self._with_frozen(
            super().configure_train(server_round, arrays, config, grid)
        )
        self._sent["train"] = [msg.metadata for msg in messages]
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation needs the frozen arrays too (stage 2 protects with the frozen g)."""
        messages = self._with_frozen(
            super().configure_evaluate(server_round, arrays, config, grid)
        )
        self._sent["evaluate"] = [msg.metadata for msg in messages]
        return messages

    def node_summary(self) -> dict[str, Any]:
        """Sampled / replied / dropped node ids of the phases since the last call.

        Returns ``{"nodes": {phase: {"sampled": [...], "replied": [...],
        "dropped": [...], "silent": [...]}}, "dropped": [...]}`` (ids sorted;
        the top-level "dropped" over all phases) and clears `round_nodes`.
        "replied" counts any reply the node sent itself, an error reply
        included; "dropped" are sampled nodes that sent none (dead, unreachable,
        or too slow for the round timeout); "silent" those of them without even
        a SuperLink-made error reply (the round timed out on them).
        """
        nodes = {
            entry["phase"]: {
                k: entry[k] for k in ("sampled", "replied", "dropped", "silent")
            }
            for entry in self.round_nodes
        }
        dropped = sorted({n for entry in self.round_nodes for n in entry["dropped"]})
        self.round_nodes.clear()
        return {"nodes": nodes, "dropped": dropped}

    def _with_frozen(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            for name, record in self.frozen_arrays.items():
                msg.content[name] = record
        return messages

    def _reject(
        self, server_round: int, phase: str, node_id: int, problems: list[str]
    ) -> None:
        log(
            WARNING,
            "aggregate_%s: rejected reply from node %d: %s",
            phase,
            node_id,
            "; ".join(problems),
        )
        self.rejected.append(
            {
                "round": server_round,
                "phase": phase,
                "node_id": node_id,
                "problems": problems,
            }
        )

    def _train_reply_problems(self, msg: Message) -> list[str]:
        if msg.has_error():
            return [_error_problem(msg)]
        problems = validate_reply_content(
            msg.content,
            weighted_by_key=self.weighted_by_key,
            arrayrecord_key=self.arrayrecord_key,
            max_num_examples=self.max_num_examples,
        )
        if problems:
            return problems
        return validate_update(
            cast(ArrayRecord, msg.content[self.arrayrecord_key]),
            cast(dict[str, NDArray], self._reference),
            self.max_update_norm,
            max_bytes=self.max_update_bytes,
        )

    def _screen(
        self,
        server_round: int,
        phase: str,
        replies: Iterable[Message],
        problems_of: Callable[[Message], list[str]],
    ) -> list[_Screened]:
        """Log every reply in `round_log`, reject bad ones, return the good ones."""
        accepted: list[_Screened] = []
        replies = list(replies)
        sent = self._sent.pop(phase, None)
        # message id -> node it was sent to (ids are set once the grid pushed them)
        sent_to = {md.message_id: md.dst_node_id for md in sent or [] if md.message_id}
        replied: set[int] = set()  # nodes that answered themselves (maybe an error)
        heard: set[int] = set()  # nodes with any reply (also one the SuperLink made)
        for msg in replies:
            node_id = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            heard.add(node_id)
            if msg.metadata.src_node_id == node_id:
                replied.add(node_id)
            problems = self._problems_safely(phase, node_id, msg, problems_of)
            metrics, left_out = _metrics_dict(
                msg, self.weighted_by_key,
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
            self.round_log.append(entry)
            if problems:
                self._reject(server_round, phase, node_id, problems)
            else:
                weights = next(iter(msg.content.metric_records.values()))
                claimed = cast(int | float, weights[self.weighted_by_key])
                accepted.append(_Screened(msg, entry, claimed))
        if sent:
            self._record_nodes(server_round, phase, sent, replied, heard)
        log(
            INFO,
            "aggregate_%s: accepted %d of %d replies",
            phase,
            len(accepted),
            len(replies),
        )
        if accepted:
            _harmonize_metric_keys([r.msg for r in accepted], phase)
        return accepted

    def _problems_safely(
        self,
        phase: str,
        node_id: int,
        msg: Message,
        problems_of: Callable[[Message], list[str]],
    ) -> list[str]:
        """`problems_of(msg)`; a check that raises on a reply's data rejects that reply (the
        traceback is logged: it is a bug of ours or of a library, and must be seen)."""
        try:
            return problems_of(msg)
        except Exception as exc:  # pylint: disable=broad-except
            log(ERROR, "aggregate_%s: validating the reply of node %d raised; rejecting it",
                phase, node_id, exc_info=True)
            return [f"validation failed: {_exc_text(exc)}"]

    def _weigh(self, phase: str, replies: list[_Screened]) -> None:
        """Effective weights (module doc, "Weights"): note them in `round_log` and write them,
        normalised to sum to 1, into each reply's MetricRecord for the arithmetic."""
        claims = [float(r.claimed) for r in replies]
        for r in replies:                   # weighed again if a reply was rejected late
            r.entry["notes"] = []
        if self.weighting == "equal":
            weights = [1.0] * len(replies)
        elif self.max_weight_ratio is None:
            weights = claims
        else:
            median = float(statistics.median_low(claims))
            cap = self.max_weight_ratio * median
            weights = [min(w, cap) for w in claims]
            for r, claim, weight in zip(replies, claims, weights, strict=True):
                if weight < claim:
                    note = (f"weight clipped from {_fmt_weight(claim)} to "
                            f"{_fmt_weight(weight)} (max-weight-ratio "
                            f"{_fmt_weight(self.max_weight_ratio)} x median "
                            f"{_fmt_weight(median)})")
                    log(WARNING, "aggregate_%s: node %d: %s", phase, r.entry["node_id"], note)
                    r.entry["notes"] = [note]
        for r, weight, share in zip(replies, weights, _shares(weights), strict=True):
            r.entry["weight"] = int(weight) if float(weight).is_integer() else weight
            r.weights[self.weighted_by_key] = share

    def _reject_late(self, server_round: int, reply: _Screened, problem: str) -> None:
        """Reject a reply that passed screening but breaks the arithmetic."""
        reply.entry.update(accepted=False, problems=[problem], weight=None, notes=[])
        self._reject(server_round, reply.entry["phase"], reply.entry["node_id"], [problem])

    def _guarded(
        self,
        server_round: int,
        phase: str,
        replies: list[_Screened],
        aggregate: Callable[[list[Message]], Any],
        probe: Callable[[Message], None],
    ) -> tuple[Any, list[_Screened]]:
        """`aggregate` the weighed replies; if it raises, find the replies whose data alone
        make `probe` raise, reject them and aggregate the rest.  An exception no single reply
        reproduces is ours: logged and raised.  Returns (result or None, replies used).

        The replies are left as they came (claimed weight, arrays: Flower's median and
        trimmed mean pop them), so a retry, or a caller, sees them unchanged."""
        key = self.arrayrecord_key
        while replies:
            self._weigh(phase, replies)
            saved = [dict(cast(ArrayRecord, r.msg.content[key]).items())
                     if key in r.msg.content.array_records else None for r in replies]
            try:
                return aggregate([r.msg for r in replies]), replies
            except Exception:  # pylint: disable=broad-except
                log(ERROR, "aggregate_%s: aggregation raised; looking for the reply that "
                    "causes it", phase, exc_info=True)
                self._restore(replies, saved)
                culprits = self._culprits(replies, probe)
                if not culprits:
                    raise
            finally:
                self._restore(replies, saved)
            for reply, problem in culprits:
                self._reject_late(server_round, reply, problem)
            bad = {id(reply) for reply, _ in culprits}
            replies = [r for r in replies if id(r) not in bad]
        return None, replies

    def _restore(self, replies: list[_Screened],
                 saved: list[dict[str, Array] | None]) -> None:
        for reply, arrays in zip(replies, saved, strict=True):
            reply.weights[self.weighted_by_key] = reply.claimed
            if arrays is not None and (
                self.arrayrecord_key not in reply.msg.content.array_records
                or len(reply.msg.content[self.arrayrecord_key]) != len(arrays)
            ):
                reply.msg.content[self.arrayrecord_key] = ArrayRecord(arrays)

    @staticmethod
    def _culprits(replies: list[_Screened], probe: Callable[[Message], None]
                  ) -> list[tuple[_Screened, str]]:
        culprits = []
        for reply in replies:
            try:
                probe(reply.msg)
            except Exception as exc:  # pylint: disable=broad-except
                culprits.append((reply, f"aggregation failed on this reply: {_exc_text(exc)}"))
        return culprits

    def _record_nodes(
        self,
        server_round: int,
        phase: str,
        sent: list[Any],
        replied: set[int],
        heard: set[int],
    ) -> None:
        """Note sampled vs replied nodes. A dropped node with a SuperLink-made error
        reply (Node Unavailable) is in `round_log` already; one with no reply at all
        (round timeout) is listed under "silent" and only here."""
        sampled = sorted({int(md.dst_node_id) for md in sent})
        dropped = [n for n in sampled if n not in replied]
        silent = [n for n in dropped if n not in heard]
        if dropped:
            log(
                WARNING,
                "aggregate_%s: round %d: %d of %d sampled nodes dropped out: %s "
                "(no reply at all before the round timeout: %s)",
                phase,
                server_round,
                len(dropped),
                len(sampled),
                dropped,
                silent,
            )
        self.round_nodes.append(
            {
                "round": server_round,
                "phase": phase,
                "sampled": sampled,
                "replied": sorted(replied),
                "dropped": dropped,
                "silent": silent,
            }
        )

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid replies; (None, None) keeps the previous arrays."""
        if self._reference is None:
            raise RuntimeError(
                "aggregate_train called before configure_train: "
                "no global arrays to validate replies against"
            )
        screened = self._screen(
            server_round, "train", replies, self._train_reply_problems
        )
        result, screened = self._guarded(
            server_round, "train", screened,
            lambda accepted: self._aggregate_arrays(server_round, accepted), self._probe_train,
        )
        if result is None:
            log(
                WARNING,
                "aggregate_train: no valid replies in round %d; "
                "the previous global arrays stand",
                server_round,
            )
            return None, None
        arrays, metrics = result
        if arrays is not None:
            bad = _nonfinite_keys(arrays)
            if bad:
                log(WARNING, "aggregate_train: round %d: the aggregate of %d replies is not "
                    "finite in %d array(s) (%s); the previous global arrays stand",
                    server_round, len(screened), len(bad), name_of(bad[0]))
                return None, metrics
        return arrays, metrics

    def _aggregate_arrays(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The rule's arithmetic on replies that passed validation and were weighed."""
        reference = cast(dict[str, NDArray], self._reference)
        num_accepted = len(accepted)
        if self.rule in ("krum", "multi-krum"):
            if num_accepted <= 2 * self.num_malicious_nodes + 2:
                log(
                    WARNING,
                    "aggregate_train: %s assumes n > 2f + 2; got n=%d, f=%d",
                    self.rule,
                    num_accepted,
                    self.num_malicious_nodes,
                )
            if self.rule == "multi-krum":
                cast(MultiKrum, self._inner).num_nodes_to_select = min(
                    num_accepted,
                    self.num_nodes_to_select
                    or max(1, num_accepted - self.num_malicious_nodes),
                )

        if self.rule == "fedavg" and self.backend != "flower":
            return self._backend_average(accepted), self.train_metrics_aggr_fn(
                [msg.content for msg in accepted], self.weighted_by_key
            )
        arrays, metrics = self._inner.aggregate_train(server_round, accepted)
        if arrays is not None:
            arrays = _like_reference(arrays, reference)
        return arrays, metrics

    def _probe_train(self, msg: Message) -> None:
        """One reply alone through the arithmetic that failed: its arrays decoded as the
        configured backend decodes them, and its metrics aggregated."""
        if self.rule == "fedavg" and self.backend != "flower":
            record = cast(ArrayRecord, msg.content[self.arrayrecord_key])
            weighted_mean([(reference_to_numpy(record), 1.0)], like=self._reference,
                          accumulate_dtype=BACKEND_ACCUMULATE)
        else:
            aggregate_arrayrecords([msg.content], self.weighted_by_key)
        self.train_metrics_aggr_fn([msg.content], self.weighted_by_key)

    def _backend_average(self, accepted: list[Message]) -> ArrayRecord:
        """Weighted average of accepted replies by the "streaming" or "ray" backend.

        Replies are read as views of their received bytes (no decoded copies), so besides
        the replies themselves only the accumulators are in memory.
        """
        reference = cast(dict[str, NDArray], self._reference)

        def updates() -> Iterable[tuple[dict[str, NDArray], float]]:
            for msg in accepted:
                metrics = next(iter(msg.content.metric_records.values()))
                weight = float(cast(float, metrics[self.weighted_by_key]))
                record = cast(ArrayRecord, msg.content[self.arrayrecord_key])
                yield reference_to_numpy(record), weight

        if self.backend == "ray":
            # Imported here: Ray is heavy and only needed by this backend
            from .ray_backend import ray_weighted_mean  # pylint: disable=import-outside-toplevel

            mean = ray_weighted_mean(updates(), like=reference,
                                     accumulate_dtype=BACKEND_ACCUMULATE)
        else:
            mean = weighted_mean(updates(), like=reference, accumulate_dtype=BACKEND_ACCUMULATE,
                                 group=BACKEND_GROUP)
        # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,)
        return ArrayRecord(
            {key: Array(np.asarray(mean[key], order="C")) for key in reference}
        )

    def _evaluate_reply_problems(self, msg: Message) -> list[str]:
        if msg.has_error():
            return [_error_problem(msg)]
        return validate_reply_content(
            msg.content, weighted_by_key=self.weighted_by_key, arrayrecord_key=None,
            max_num_examples=self.max_num_examples,
        )

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Aggregate evaluation metrics of the valid replies; log every node."""
        screened = self._screen(
            server_round, "evaluate", replies, self._evaluate_reply_problems
        )

        def aggregate(accepted: list[Message]) -> MetricRecord | None:
            return FedAvg.aggregate_evaluate(self, server_round, accepted)

        def probe(msg: Message) -> None:
            self.evaluate_metrics_aggr_fn([msg.content], self.weighted_by_key)

        metrics, _ = self._guarded(server_round, "evaluate", screened, aggregate, probe)
        return cast(MetricRecord | None, metrics)


def _nonfinite_keys(arrays: ArrayRecord) -> list[str]:
    """Keys of floating-point arrays holding NaN/Inf (one summing pass over the aggregate)."""
    return [key for key, array in arrays.items()
            if np.issubdtype(np.dtype(array.dtype), np.inexact)
            and nonfinite_count(array_view(array))]


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {short(str(exc), MAX_REASON_CHARS)}"


def _error_problem(msg: Message) -> str:
    """An error reply's reason, bounded (a node chooses it)."""
    reason = short(str(msg.error.reason or ""), MAX_REASON_CHARS)
    return f"error reply (code {msg.error.code}): {reason}"


def make_strategy(rule: str, **kwargs: Any) -> SharedKeyFedAvg:
    """Build a `SharedKeyFedAvg` for `rule` (one of `RULES`).

    Keyword arguments go to `SharedKeyFedAvg` (e.g. `fraction_train`, `beta`,
    `num_malicious_nodes`, `max_update_norm`, `frozen_arrays`, `backend`,
    `weighting`, `max_num_examples`, `max_weight_ratio`).
    """
    return SharedKeyFedAvg(rule=normalize_rule(rule), **kwargs)
