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
* keeps per-node metrics in `round_log` for per-client reporting;
* records, per round and phase, which nodes were sampled, which replied and
  which dropped out (`round_nodes`, `node_summary()`): a node that dies
  mid-round gets an error reply from the SuperLink (Node Unavailable, once it
  misses its heartbeats) or no reply within the `start(timeout=...)`; either
  way the round goes on with the replies that came, and the node is listed
  under "dropped".
"""

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
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

from .streaming import weighted_mean
from .validation import reference_to_numpy, validate_reply_content, validate_update

RULES = ("fedavg", "median", "trimmed-mean", "krum", "multi-krum")
BACKENDS = ("flower", "streaming", "ray")
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

MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]


def normalize_rule(rule: str) -> str:
    """Accept `Trimmed_Mean` for `trimmed-mean`; reject unknown rules clearly."""
    name = rule.strip().lower().replace("_", "-")
    if name not in RULES:
        raise ValueError(
            f"Unknown aggregation rule {rule!r}; valid rules: {', '.join(RULES)}"
        )
    return name


def normalize_backend(backend: str) -> str:
    """Accept `Streaming` for `streaming`; reject unknown aggregation backends clearly."""
    name = backend.strip().lower()
    if name not in BACKENDS:
        raise ValueError(
            f"Unknown aggregation backend {backend!r}; valid backends: "
            f"{', '.join(BACKENDS)}"
        )
    return name


def _metrics_dict(msg: Message) -> dict[str, Any]:
    """Plain copy of a reply's metrics (all MetricRecords merged) for logging."""
    if msg.has_error():
        return {}
    merged: dict[str, Any] = {}
    for record in msg.content.metric_records.values():
        for key, value in record.items():
            merged[key] = list(value) if isinstance(value, list) else value
    return merged


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
            return [f"error reply (code {msg.error.code}): {msg.error.reason}"]
        problems = validate_reply_content(
            msg.content,
            weighted_by_key=self.weighted_by_key,
            arrayrecord_key=self.arrayrecord_key,
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
    ) -> list[Message]:
        """Log every reply in `round_log`, reject bad ones, return the good ones."""
        accepted: list[Message] = []
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
            problems = problems_of(msg)
            self.round_log.append(
                {
                    "round": server_round,
                    "phase": phase,
                    "node_id": node_id,
                    "metrics": _metrics_dict(msg),
                    "accepted": not problems,
                    "problems": problems,
                }
            )
            if problems:
                self._reject(server_round, phase, node_id, problems)
            else:
                accepted.append(msg)
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
            _harmonize_metric_keys(accepted, phase)
        return accepted

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
        accepted = self._screen(
            server_round, "train", replies, self._train_reply_problems
        )
        if not accepted:
            log(
                WARNING,
                "aggregate_train: no valid replies in round %d; "
                "the previous global arrays stand",
                server_round,
            )
            return None, None

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
            arrays = _like_reference(arrays, self._reference)
        return arrays, metrics

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
            return [f"error reply (code {msg.error.code}): {msg.error.reason}"]
        return validate_reply_content(
            msg.content, weighted_by_key=self.weighted_by_key, arrayrecord_key=None
        )

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Aggregate evaluation metrics of the valid replies; log every node."""
        accepted = self._screen(
            server_round, "evaluate", replies, self._evaluate_reply_problems
        )
        if not accepted:
            return None
        return super().aggregate_evaluate(server_round, accepted)


def make_strategy(rule: str, **kwargs: Any) -> SharedKeyFedAvg:
    """Build a `SharedKeyFedAvg` for `rule` (one of `RULES`).

    Keyword arguments go to `SharedKeyFedAvg` (e.g. `fraction_train`, `beta`,
    `num_malicious_nodes`, `max_update_norm`, `frozen_arrays`, `backend`).
    """
    return SharedKeyFedAvg(rule=normalize_rule(rule), **kwargs)
