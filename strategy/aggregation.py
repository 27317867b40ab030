"""`make_strategy`: the server's strategy from run-config names.

The rule comes from the rule table (`rules.RULE_FACTORIES`), the arithmetic of "fedavg" from
the backend table (`backends.BACKEND_AVERAGES`), and the result is wrapped in the server's
screening (`screening.SharedKeyStrategy`: validation, weight bounds, frozen arrays, node
tracking, the round report).
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord
from flwr.common.logger import log

from task.config import normalize_backend, normalize_rule

from .backends import BACKEND_ACCUMULATE, BACKEND_AVERAGES, BACKEND_GROUP  # noqa: F401
from .rules import RULE_FACTORIES, RuleFactory, RuleOptions
from .screening import SharedKeyStrategy
from .weights import WeightPolicy

RULES = tuple(RULE_FACTORIES)
BACKENDS = tuple(BACKEND_AVERAGES)


# pylint: disable=too-many-arguments
def make_strategy(
    rule: str = "fedavg",
    *,
    backend: str = "flower",
    beta: float = 0.2,
    num_malicious_nodes: int = 0,
    num_nodes_to_select: int | None = None,
    max_update_norm: float | None = None,
    max_update_bytes: int | None = None,
    frozen_arrays: Mapping[str, ArrayRecord] | None = None,
    weighting: str = "num-examples",
    max_num_examples: int | None = None,
    max_weight_ratio: float | None = None,
    rules: Mapping[str, RuleFactory] = RULE_FACTORIES,
    **fedavg_kwargs: Any,
) -> SharedKeyStrategy:
    """The rule `rule` (one of `RULES`, "Trimmed_Mean" accepted), screened.

    backend : one of `BACKENDS`, the arithmetic of "fedavg" (other rules use Flower's).
    beta, num_malicious_nodes, num_nodes_to_select : the rules' own (`rules.RuleOptions`).
    max_update_norm, max_update_bytes, frozen_arrays : `SharedKeyStrategy`'s.
    weighting, max_num_examples, max_weight_ratio : the `weights.WeightPolicy`; the defaults
        trust every claim (the ServerApp passes the run config's bounds).
    rules : the table `rule` is looked up in.
    fedavg_kwargs : Flower's FedAvg arguments (fraction_train, min_train_nodes, ...,
        weighted_by_key, train_metrics_aggr_fn, ...), given to the rule.
    """
    rule = normalize_rule(rule)
    backend = normalize_backend(backend)
    if backend != "flower" and rule != "fedavg":
        log(WARNING, "aggregation backend %r applies to rule 'fedavg' only; "
            "rule %r uses Flower's arithmetic", backend, rule)
    options = RuleOptions(beta=beta, num_malicious_nodes=num_malicious_nodes,
                          num_nodes_to_select=num_nodes_to_select,
                          average=BACKEND_AVERAGES[backend] if rule == "fedavg" else None)
    weights = WeightPolicy(weighting, max_num_examples, max_weight_ratio)
    return SharedKeyStrategy(rules[rule](options, fedavg_kwargs),
                             max_update_norm=max_update_norm, max_update_bytes=max_update_bytes,
                             frozen_arrays=frozen_arrays, weights=weights)
