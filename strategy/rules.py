"""The aggregation rules, one table: rule name -> the Flower strategy that does its arithmetic.

Every rule is Flower's own class or a small FedAvg subclass of it, so the arithmetic is
exactly Flower's; `SharedKeyStrategy` (screening.py) wraps the chosen one and hands it only
replies that passed validation, with their weights already bounded and normalised.

* "fedavg": Flower's FedAvg, or `AveragingFedAvg` when an aggregation backend supplies the
  arithmetic (backends.py: "streaming", "ray");
* "median": FedMedian (coordinate-wise); "trimmed-mean": FedTrimmedAvg with `beta`;
* "krum" / "multi-krum": Krum / MultiKrum with `num_malicious_nodes` f, warning when a round
  has too few replies for their assumption n > 2f + 2; MultiKrum averages `num_nodes_to_select`
  replies, n - f of the round's n when not given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from .backends import Average
from .validation import reference_to_numpy


@dataclass(frozen=True)
class RuleOptions:
    """What the rules besides FedAvg's sampling and keys need (each uses its own)."""

    beta: float = 0.2                        # trimmed-mean: fraction cut from each tail
    num_malicious_nodes: int = 0             # krum / multi-krum: assumed Byzantine nodes f
    num_nodes_to_select: int | None = None   # multi-krum: None = n - f of the n replies
    average: Average | None = None           # fedavg: a backend's arithmetic; None = Flower's

    def __post_init__(self) -> None:
        if self.num_malicious_nodes < 0:
            raise ValueError("`num_malicious_nodes` must be >= 0.")
        if self.num_nodes_to_select is not None and self.num_nodes_to_select < 1:
            raise ValueError("`num_nodes_to_select` must be >= 1 or None.")


class AveragingFedAvg(FedAvg):
    """FedAvg whose weighted average of the arrays is `average` (an aggregation backend).

    Replies are read as views of their received bytes (no decoded copies) and handed to
    `average` one at a time, so besides the replies only its accumulators are in memory."""

    def __init__(self, average: Average, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.average = average

    def summary(self) -> None:
        log(INFO, "\t├──> Weighted average by: %s", getattr(self.average, "__name__", "?"))
        super().summary()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        key = self.arrayrecord_key

        def updates() -> Iterable[tuple[dict[str, np.ndarray], float]]:
            for msg in valid:
                metrics = next(iter(msg.content.metric_records.values()))
                weight = float(cast(float, metrics[self.weighted_by_key]))
                yield reference_to_numpy(cast(ArrayRecord, msg.content[key])), weight

        mean = self.average(updates())
        # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,)
        arrays = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in mean.items()})
        metrics = self.train_metrics_aggr_fn([msg.content for msg in valid],
                                             self.weighted_by_key)
        return arrays, metrics


def probe_train(rule: FedAvg, server_round: int, msg: Message) -> None:
    """One reply alone through the arithmetic every rule shares: FedAvg's weighted average of
    its arrays (the backend's, for `AveragingFedAvg`) and the aggregation of its metrics.

    Not the rule's own selection logic, nor an instance's overrides: an exception that every
    reply would reproduce there is a bug of ours, not a reply's, and must not reject them all."""
    base = AveragingFedAvg if isinstance(rule, AveragingFedAvg) else FedAvg
    base.aggregate_train(rule, server_round, [msg])


def probe_evaluate(rule: FedAvg, server_round: int, msg: Message) -> None:
    """One evaluate reply alone through FedAvg's metric aggregation (every rule's)."""
    FedAvg.aggregate_evaluate(rule, server_round, [msg])


def _warn_if_too_few(rule: str, num_replies: int, num_malicious_nodes: int) -> None:
    if num_replies <= 2 * num_malicious_nodes + 2:
        log(WARNING, "aggregate_train: %s assumes n > 2f + 2; got n=%d, f=%d",
            rule, num_replies, num_malicious_nodes)


class CheckedKrum(Krum):
    """Flower's Krum, warning when the round has too few replies for its assumption."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        _warn_if_too_few("krum", len(replies), self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


class SizedMultiKrum(MultiKrum):
    """Flower's MultiKrum averaging `num_nodes_to_select` of the round's n replies (at most n;
    n - f when None), warning when the round has too few replies for its assumption."""

    def __init__(self, *, num_nodes_to_select: int | None = None, **kwargs: Any) -> None:
        super().__init__(num_nodes_to_select=num_nodes_to_select or 1, **kwargs)
        self.requested = num_nodes_to_select

    def summary(self) -> None:
        log(INFO, "\t├──> Nodes to select: %s", self.requested or "n - f")
        super().summary()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        n, f = len(replies), self.num_malicious_nodes
        _warn_if_too_few("multi-krum", n, f)
        self.num_nodes_to_select = min(n, self.requested or max(1, n - f))
        return super().aggregate_train(server_round, replies)


def _fedavg(options: RuleOptions, kwargs: dict[str, Any]) -> FedAvg:
    if options.average is None:
        return FedAvg(**kwargs)
    return AveragingFedAvg(options.average, **kwargs)


RuleFactory = Callable[[RuleOptions, dict[str, Any]], FedAvg]

# Rule name (task.config.AGGREGATION_RULES) -> its builder from the options and FedAvg's
# keyword arguments (sampling fractions and minimums, record keys, metric aggregation)
RULE_FACTORIES: dict[str, RuleFactory] = {
    "fedavg": _fedavg,
    "median": lambda options, kwargs: FedMedian(**kwargs),
    "trimmed-mean": lambda options, kwargs: FedTrimmedAvg(beta=options.beta, **kwargs),
    "krum": lambda options, kwargs: CheckedKrum(
        num_malicious_nodes=options.num_malicious_nodes, **kwargs),
    "multi-krum": lambda options, kwargs: SizedMultiKrum(
        num_malicious_nodes=options.num_malicious_nodes,
        num_nodes_to_select=options.num_nodes_to_select, **kwargs),
}
