"""The server's guard around an aggregation rule: `SharedKeyStrategy` wraps `self.strategy`
(a Flower FedAvg or subclass, `rules.py`) as Flower's DP wrappers wrap theirs.

MinusFed sends sites only the *shared* part of the model (the private ArcFace head never
leaves a site) and, in stage 2, a frozen network they need but must not train.  The wrapper:

* adds read-only ArrayRecords (`frozen_arrays`) to every train and evaluate message;
* checks each reply against the arrays sent that round (`validation.py`) and drops a bad one
  with a logged reason instead of letting Flower raise `InconsistentMessageReplies` and end
  the run;
* bounds each accepted reply's weight (`weights.py`) and writes the effective weights,
  normalised to sum to 1, into the replies' MetricRecord (`weighted_by_key`), which is what
  every rule and backend reads: the arrays of FedAvg and MultiKrum, and the aggregated
  metrics of every rule (FedMedian, FedTrimmedAvg and Krum do not weight arrays);
* never lets one reply's data end the run: an exception while validating or aggregating is
  traced back to the reply that causes it, which is rejected (the traceback logged), and the
  round goes on with the rest;
* gives the aggregate the sent arrays' key order and dtypes, and keeps the previous arrays
  when the aggregate is not finite;
* notes which nodes were sampled, replied or dropped out (`nodes.py`).

What it saw is returned, not left behind: `start()` returns a `ReportedResult` whose `report`
(`report.RoundReport`) lists every reply with its verdict and the nodes of every phase.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from typing import Any, TypeVar, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import NDArray
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from .nodes import NodeTracker
from .report import ReportedResult, RoundReport, reply_entry
from .rules import probe_evaluate, probe_train
from .validation import (
    MAX_REASON_CHARS,
    array_view,
    name_of,
    nonfinite_count,
    reference_to_numpy,
    short,
    validate_reply_content,
    validate_update,
)
from .weights import WeightPolicy, shares

T = TypeVar("T")


class ReportingStrategy(Strategy):
    """A strategy whose `start()` returns a `ReportedResult`: Flower's `Result` plus the
    `RoundReport` of the `SharedKeyStrategy` it is or wraps."""

    @property
    @abstractmethod
    def screening(self) -> SharedKeyStrategy:
        """The `SharedKeyStrategy` whose report `start()` returns."""

    # pylint: disable=too-many-arguments
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> ReportedResult:
        """Flower's round loop; the report covers exactly the rounds of this call."""
        self.screening.take_report()
        result = super().start(grid, initial_arrays, num_rounds, timeout, train_config,
                               evaluate_config, evaluate_fn)
        return ReportedResult.of(result, self.screening.take_report())


@dataclass
class _Screened:
    """An accepted reply, its report entry and the weight it claimed (as sent)."""

    msg: Message
    entry: dict[str, Any]
    claimed: int | float

    @property
    def weights(self) -> MetricRecord:
        """The reply's (only) MetricRecord, which holds the weight."""
        return next(iter(self.msg.content.metric_records.values()))


# pylint: disable=too-many-instance-attributes
class SharedKeyStrategy(ReportingStrategy):
    """Validation, weight bounds, frozen arrays and node tracking around a Flower rule.

    Parameters
    ----------
    strategy : FedAvg
        The rule (`rules.RULE_FACTORIES`): its sampling, record keys and `weighted_by_key`
        are used.
    max_update_norm : Optional[float] (default: None)
        Reject replies whose L2 distance to the sent arrays exceeds this.
    max_update_bytes : Optional[int] (default: None)
        Reject replies whose ArrayRecord is larger than this, before decoding.
    frozen_arrays : Optional[dict[str, ArrayRecord]] (default: None)
        Read-only ArrayRecords added to every message under their names; never aggregated and
        not expected back.
    weights : WeightPolicy (default: trust every claim)
        How much each accepted reply counts (`weights.py`).
    """

    def __init__(
        self,
        strategy: FedAvg,
        *,
        max_update_norm: float | None = None,
        max_update_bytes: int | None = None,
        frozen_arrays: Mapping[str, ArrayRecord] | None = None,
        weights: WeightPolicy | None = None,
    ) -> None:
        if max_update_norm is not None and not max_update_norm > 0:
            raise ValueError("`max_update_norm` must be > 0 or None.")
        self.strategy = strategy
        self.max_update_norm = max_update_norm
        self.max_update_bytes = max_update_bytes
        self.weights = weights or WeightPolicy()
        self.frozen_arrays = dict(frozen_arrays or {})
        # Global arrays sent in the current round, decoded once (read-only views)
        self._reference: dict[str, NDArray] | None = None
        self._nodes = NodeTracker()
        self._report = RoundReport()
        self._averaged: tuple[int, ...] = ()

    @property
    def screening(self) -> SharedKeyStrategy:
        return self

    @property
    def weighted_by_key(self) -> str:
        return self.strategy.weighted_by_key

    @property
    def arrayrecord_key(self) -> str:
        return self.strategy.arrayrecord_key

    @property
    def frozen_arrays(self) -> dict[str, ArrayRecord]:
        """Read-only ArrayRecords added to each message (settable per stage)."""
        return self._frozen_arrays

    @frozen_arrays.setter
    def frozen_arrays(self, value: Mapping[str, ArrayRecord]) -> None:
        reserved = {self.strategy.arrayrecord_key, self.strategy.configrecord_key}
        for name, record in value.items():
            if name in reserved:
                raise ValueError(f"frozen_arrays name {name!r} clashes with {reserved}")
            if not isinstance(record, ArrayRecord):
                raise TypeError(f"frozen_arrays[{name!r}] must be an ArrayRecord")
        self._frozen_arrays = dict(value)

    @property
    def averaged_nodes(self) -> tuple[int, ...]:
        """Nodes whose train replies the current round's aggregate used (empty until then)."""
        return self._averaged

    def take_report(self) -> RoundReport:
        """What the phases since the last call produced; the next report starts empty."""
        report, self._report = self._report, RoundReport()
        return report

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Shared-key screening around %s:", type(self.strategy).__name__)
        log(INFO, "\t│\t├── Max update norm: %s", self.max_update_norm)
        log(INFO, "\t│\t├── Max update bytes: %s", self.max_update_bytes)
        log(INFO, "\t│\t├── Weighting: %s (max num-examples %s, max weight ratio %s)",
            self.weights.weighting, self.weights.max_num_examples, self.weights.max_weight_ratio)
        log(INFO, "\t│\t└── Frozen ArrayRecords: %s", list(self.frozen_arrays))
        self.strategy.summary()

    # -- configure: frozen arrays, and what was sent to whom ---------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The rule's train messages with the frozen arrays; remembers what was sent."""
        # Read-only views of the immutable bytes sent: later changes to `arrays` cannot reach them
        self._reference = reference_to_numpy(arrays)
        self._averaged = ()
        messages = self._with_frozen(
            self.strategy.configure_train(server_round, arrays, config, grid))
        self._nodes.sent("train", messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation needs the frozen arrays too (stage 2 protects with the frozen g)."""
        messages = self._with_frozen(
            self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self._nodes.sent("evaluate", messages)
        return messages

    def _with_frozen(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            for name, record in self.frozen_arrays.items():
                msg.content[name] = record
        return messages

    # -- aggregate ---------------------------------------------------------------------------

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
        reference = self._reference
        screened = self._screen(server_round, "train", replies, self._train_reply_problems)

        def aggregate(accepted: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            arrays, metrics = self.strategy.aggregate_train(server_round, accepted)
            return (None if arrays is None else _like_reference(arrays, reference)), metrics

        def probe(msg: Message) -> None:
            probe_train(self.strategy, server_round, msg)

        result, used = self._guarded(server_round, "train", screened, aggregate, probe)
        self._averaged = tuple(int(r.entry["node_id"]) for r in used)
        if result is None:
            log(WARNING, "aggregate_train: no valid replies in round %d; "
                "the previous global arrays stand", server_round)
            return None, None
        arrays, metrics = result
        if arrays is not None:
            bad = _nonfinite_keys(arrays)
            if bad:
                log(WARNING, "aggregate_train: round %d: the aggregate of %d replies is not "
                    "finite in %d array(s) (%s); the previous global arrays stand",
                    server_round, len(used), len(bad), name_of(bad[0]))
                return None, metrics
        return arrays, metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Aggregate evaluation metrics of the valid replies; report every node."""
        screened = self._screen(server_round, "evaluate", replies,
                                self._evaluate_reply_problems)

        def aggregate(accepted: list[Message]) -> MetricRecord | None:
            return self.strategy.aggregate_evaluate(server_round, accepted)

        def probe(msg: Message) -> None:
            probe_evaluate(self.strategy, server_round, msg)

        metrics, _ = self._guarded(server_round, "evaluate", screened, aggregate, probe)
        return metrics

    # -- screening ---------------------------------------------------------------------------

    def _train_reply_problems(self, msg: Message) -> list[str]:
        if msg.has_error():
            return [_error_problem(msg)]
        problems = validate_reply_content(
            msg.content, weighted_by_key=self.weighted_by_key,
            arrayrecord_key=self.arrayrecord_key,
            max_num_examples=self.weights.max_num_examples)
        if problems:
            return problems
        return validate_update(
            cast(ArrayRecord, msg.content[self.arrayrecord_key]),
            cast(dict[str, NDArray], self._reference),
            self.max_update_norm,
            max_bytes=self.max_update_bytes,
        )

    def _evaluate_reply_problems(self, msg: Message) -> list[str]:
        if msg.has_error():
            return [_error_problem(msg)]
        return validate_reply_content(
            msg.content, weighted_by_key=self.weighted_by_key, arrayrecord_key=None,
            max_num_examples=self.weights.max_num_examples)

    def _screen(
        self,
        server_round: int,
        phase: str,
        replies: Iterable[Message],
        problems_of: Callable[[Message], list[str]],
    ) -> list[_Screened]:
        """Report every reply, reject bad ones, return the good ones."""
        accepted: list[_Screened] = []
        replies = list(replies)
        nodes = self._nodes.replies_of(phase)
        for msg in replies:
            node_id = nodes.node_of(msg)
            problems = self._problems_safely(phase, node_id, msg, problems_of)
            entry = reply_entry(server_round, phase, node_id, msg, self.weighted_by_key,
                                problems)
            self._report.replies.append(entry)
            if problems:
                _log_rejection(phase, node_id, problems)
            else:
                claimed = cast(int | float, next(iter(
                    msg.content.metric_records.values()))[self.weighted_by_key])
                accepted.append(_Screened(msg, entry, claimed))
        record = nodes.record(server_round)
        if record is not None:
            self._report.nodes.append(record)
        log(INFO, "aggregate_%s: accepted %d of %d replies", phase, len(accepted), len(replies))
        if accepted:
            _harmonize_metric_keys([r.msg for r in accepted], phase)
        return accepted

    @staticmethod
    def _problems_safely(
        phase: str,
        node_id: int,
        msg: Message,
        problems_of: Callable[[Message], list[str]],
    ) -> list[str]:
        """`problems_of(msg)`; a check that raises on a reply's data rejects that reply (the
        traceback is logged: it is a bug of ours or of a library, and must be seen)."""
        try:
            return problems_of(msg)
        except Exception as exc:  # noqa: BLE001  # pylint: disable=broad-except
            log(ERROR, "aggregate_%s: validating the reply of node %d raised; rejecting it",
                phase, node_id, exc_info=True)
            return [f"validation failed: {_exc_text(exc)}"]

    def _weigh(self, phase: str, replies: list[_Screened]) -> None:
        """Effective weights (`weights.py`): noted in the report and written, normalised to
        sum to 1, into each reply's MetricRecord for the arithmetic."""
        weighed = self.weights.weigh([float(r.claimed) for r in replies])
        for r, w in zip(replies, weighed, strict=True):
            r.entry["notes"] = []           # weighed again if a reply was rejected late
            if w.note is not None:
                log(WARNING, "aggregate_%s: node %d: %s", phase, r.entry["node_id"], w.note)
                r.entry["notes"] = [w.note]
        for r, w, share in zip(replies, weighed, shares([w.weight for w in weighed]),
                               strict=True):
            r.entry["weight"] = int(w.weight) if float(w.weight).is_integer() else w.weight
            r.weights[self.weighted_by_key] = share

    def _guarded(
        self,
        server_round: int,
        phase: str,
        replies: list[_Screened],
        aggregate: Callable[[list[Message]], T],
        probe: Callable[[Message], None],
    ) -> tuple[T | None, list[_Screened]]:
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
                reply.entry.update(accepted=False, problems=[problem], weight=None, notes=[])
                _log_rejection(phase, reply.entry["node_id"], [problem])
            bad = {id(reply) for reply, _ in culprits}
            replies = [r for r in replies if id(r) not in bad]
        return None, replies

    def _restore(self, replies: list[_Screened], saved: list[dict[str, Array] | None]) -> None:
        key = self.arrayrecord_key
        for reply, arrays in zip(replies, saved, strict=True):
            reply.weights[self.weighted_by_key] = reply.claimed
            if arrays is not None and (
                key not in reply.msg.content.array_records
                or len(reply.msg.content[key]) != len(arrays)
            ):
                reply.msg.content[key] = ArrayRecord(arrays)

    @staticmethod
    def _culprits(replies: list[_Screened], probe: Callable[[Message], None]
                  ) -> list[tuple[_Screened, str]]:
        """The replies that make `probe` raise on their own."""
        culprits = []
        for reply in replies:
            try:
                probe(reply.msg)
            except Exception as exc:  # noqa: BLE001  # pylint: disable=broad-except
                culprits.append((reply, f"aggregation failed on this reply: {_exc_text(exc)}"))
        return culprits


def _log_rejection(phase: str, node_id: int, problems: list[str]) -> None:
    log(WARNING, "aggregate_%s: rejected reply from node %d: %s", phase, node_id,
        "; ".join(problems))


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
    log(WARNING, "aggregate_%s: metrics %s are not reported alike by all nodes; "
        "left out of the aggregated metrics", phase, sorted(dropped))
    for record in records:
        for key in dropped & set(record.keys()):
            del record[key]


def _like_reference(arrays: ArrayRecord, reference: Mapping[str, NDArray]) -> ArrayRecord:
    """Give the aggregate the reference's key order and dtypes.

    Flower's averaging turns integer buffers (e.g. `num_batches_tracked`) into
    float64 and `np.median` may upcast; clients would then send back int64 for a
    float64 reference and be rejected next round.  An aggregate that already matches
    (the backends') is returned as it is.
    """
    if list(arrays.keys()) == list(reference) and all(
            arrays[key].dtype == str(expected.dtype) for key, expected in reference.items()):
        return arrays
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


__all__ = ["ReportingStrategy", "SharedKeyStrategy"]
