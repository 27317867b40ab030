"""Central differential privacy for MinusFed: Flower's client-side fixed clipping wrapper,
Flower's RDP accountant, and a per-client privacy-budget ledger (`dp_ledger.json`).

Mechanism (DP-FedAvg, McMahan et al. 2018): each sampled site clips its update to L2 norm
`C` (`clients/dp.py`, Flower's `fixedclipping_mod`), the server averages the m sampled updates
with equal weights and adds Gaussian noise of std `z * C / m` to the average (Flower's
`DifferentialPrivacyClientSideFixedClipping`).  Nothing here reimplements noise, clipping or
accounting: this module only wires Flower's pieces to MinusFed and writes the ledger.

Why not Flower's built-in `accountant=` argument: in 1.42 the wrapper accepts an accountant
only for a strategy whose `aggregate_train` *is* `FedAvg.aggregate_train` (ours validates
replies first), only with `sampling_method="no-amplification"`, and only with equal
`num-examples` across clients.  So the wrapper runs without one and `AccountedClientSide
FixedClipping` composes one event per released aggregate into Flower's own `RdpAccountant`
(backend: Google's `dp-accounting`, extra `flwr[dp]`).  It wraps the server's
`SharedKeyStrategy` (validation first), whose rule is `UniformFedAvg`: a plain average.

Accounting model: FedAvg samples m of the N nodes uniformly without replacement, so the
accountant uses Flower's pairing `without-replacement` + `replace-one` (client-level DP with
respect to replacing one client's whole update).  Under replace-one the sum of clipped
updates has L2 sensitivity 2C, so the Gaussian event is composed with noise multiplier z / 2
(noise std / sensitivity); if fewer than m updates are averaged (rejected replies) the
per-round multiplier is z * k / m.  Training and evaluation *metrics* (losses,
`num-examples`, accuracies) are sent in the clear and are not covered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.differential_privacy import compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

from minusface.atomic import write_atomic
from task.config import normalize_backend, normalize_rule

from .aggregation import make_strategy
from .rules import RuleOptions
from .screening import ReportingStrategy, SharedKeyStrategy

LEDGER_NAME = "dp_ledger.json"
DP_WEIGHT_KEY = "dp-uniform-weight"
REPLACE_ONE_SENSITIVITY = 2.0      # ||u - u'|| <= 2C when one clipped update is replaced

NOTES = [
    ("Guarantee: client-level (epsilon, delta)-DP of the sequence of released global models "
     "(every noised aggregate, including the stage-2 frozen generator, which is post-processing) "
     "with respect to replacing one client's whole update by any other update of norm <= "
     "clipping_norm (neighboring relation 'replace-one'). Record-level privacy inside a site is "
     "at least as strong but is not separately accounted."),
    ("Accountant: Flower's RdpAccountant (flwr.serverapp.RdpAccountant, backend dp-accounting "
     "RDP), sampling_method 'without-replacement' with sampling rate m/N (FedAvg samples m of N "
     "nodes uniformly at random each round); the Gaussian event per released round uses noise "
     "multiplier z/2 because replace-one sensitivity of the sum is 2 * clipping_norm, and "
     "z * k/m if only k < m updates were averaged. 'epsilon' is the federation-level value and "
     "applies to every client of the population, sampled or not; it relies on the sampling "
     "being uniformly random and secret from the adversary."),
    ("Per client, 'epsilon_participation' composes (with the same accountant, "
     "no-amplification, add-or-remove-one at multiplier z/2, which equals replace-one at z) only "
     "the released rounds the client was sampled in: a bound that does not rely on the sampling "
     "being secret. With fraction-train 1.0 both values coincide."),
    ("The server is trusted to add the noise (central DP); sites clip with Flower's "
     "fixedclipping_mod. Not covered: metrics sent in the clear (train loss, num-examples, "
     "evaluation accuracy), the choice of clipping_norm if it was tuned on the same data, and "
     "rounds whose aggregation was skipped (nothing was released). Integer buffers "
     "(num_batches_tracked) are sent back unchanged; BatchNorm running_var is clamped at 0 after "
     "noise (post-processing)."),
]


@dataclass(frozen=True)
class DpSettings:
    """Central DP of a run (run-config keys "dp-*", `task.config.RunConfig`), DP on."""

    noise_multiplier: float          # z > 0
    clipping_norm: float             # C > 0
    target_delta: float              # in (0, 1)
    max_epsilon: float | None        # stop before epsilon would exceed it; None: no cap

    def __post_init__(self) -> None:
        z, c, delta, cap = (self.noise_multiplier, self.clipping_norm, self.target_delta,
                            self.max_epsilon)
        if not (z > 0 and np.isfinite(z)):
            raise ValueError(f"DP noise_multiplier (run config 'dp-noise-multiplier') must be "
                             f"> 0 with DP on, got {z}")
        if not (c > 0 and np.isfinite(c)):
            raise ValueError(f"DP clipping_norm (run config 'dp-clipping-norm') must be > 0, "
                             f"got {c}")
        if not 0 < delta < 1:
            raise ValueError(f"DP target_delta (run config 'dp-target-delta') must be in "
                             f"(0, 1), got {delta}")
        if cap is not None and not (cap > 0 and np.isfinite(cap)):
            raise ValueError(f"DP max_epsilon (run config 'dp-max-epsilon') must be > 0 or "
                             f"None (no cap), got {cap}")


def dp_settings(noise_multiplier: float, clipping_norm: float, target_delta: float,
                max_epsilon: float) -> DpSettings | None:
    """The run's DP settings from the run-config values, or None when the noise multiplier
    is 0 (DP off); a `max_epsilon` of 0 means no cap."""
    if noise_multiplier == 0:
        return None
    return DpSettings(float(noise_multiplier), float(clipping_norm), float(target_delta),
                      float(max_epsilon) or None)


def expected_sample_size(num_nodes: int, fraction_train: float, min_train_nodes: int) -> int:
    """How many nodes FedAvg.configure_train samples per round (its own formula)."""
    return max(int(num_nodes * fraction_train), min_train_nodes)


class UniformFedAvg(FedAvg):
    """FedAvg averaging train updates with weight 1 each: the noise std z*C/m assumes a plain
    average.  Evaluation metrics stay weighted by `weighted_by_key`."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        for content in contents:
            for record in content.metric_records.values():
                record[DP_WEIGHT_KEY] = 1       # dropped from the aggregated metrics by Flower
        return (aggregate_arrayrecords(contents, DP_WEIGHT_KEY),
                self.train_metrics_aggr_fn(contents, DP_WEIGHT_KEY))


def _uniform_fedavg(options: RuleOptions, kwargs: dict[str, Any]) -> FedAvg:
    return UniformFedAvg(**kwargs)


class AccountedClientSideFixedClipping(ReportingStrategy,
                                       DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping wrapper plus Flower's RDP accountant, composed once
    per released (noised) aggregate; `take_round()` returns what a round sampled, averaged
    and released.  `start()` returns the wrapped strategy's round report with the result.

    `accountant` (Flower's, see module doc) is kept under `rdp`: the base class's own
    `accountant` stays None because its checks do not fit this strategy."""

    strategy: SharedKeyStrategy

    def __init__(self, strategy: SharedKeyStrategy, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int, *, population_size: int, target_delta: float,
                 max_epsilon: float | None = None) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        from flwr.serverapp import RdpAccountant  # needs flwr[dp] (dp-accounting)
        self.population_size = population_size
        self.target_delta = target_delta
        self.max_epsilon = max_epsilon
        self.rdp = RdpAccountant(PrivacyConfig(
            target_delta=target_delta, population_size=population_size,
            neighboring_relation=NeighboringRelation.REPLACE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT, max_epsilon=max_epsilon))
        self._round: dict[str, Any] = {}
        self._projected: tuple[tuple[int, GaussianPrivacyEvent], Any] | None = None

    def __repr__(self) -> str:
        return "Differential Privacy Strategy Wrapper (Client-Side Fixed Clipping, RDP accounted)"

    @property
    def screening(self) -> SharedKeyStrategy:
        return self.strategy

    def take_round(self) -> dict[str, Any]:
        """What the last round sampled, averaged and released (for the ledger); the next
        round starts empty."""
        info, self._round = self._round, {}
        return info

    @property
    def noise_std(self) -> float:
        return compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)

    def event(self, sample_size: int, num_averaged: int | None = None) -> GaussianPrivacyEvent:
        """The Gaussian release of one round, for the replace-one accountant (module doc)."""
        m = self.num_sampled_clients
        k = m if num_averaged is None else num_averaged
        z_eff = self.noise_multiplier * min(1.0, k / m)
        return GaussianPrivacyEvent(noise_multiplier=z_eff / REPLACE_ONE_SENSITIVITY,
                                    sample_size=min(max(sample_size, 1), self.population_size),
                                    population_size=self.population_size)

    def would_exceed_budget(self) -> bool:
        """Would one more round of m sampled, m averaged updates exceed max_epsilon?

        Same answer as Flower's `RdpAccountant.would_exceed`, which replays every past
        release (about 0.6 s each with sampling rate < 1): a second Flower accountant that is
        one planned release ahead is kept instead and rebuilt only when a round differed."""
        if self.max_epsilon is None:
            return False
        planned = self.event(self.num_sampled_clients)
        key = (self.rdp.num_releases, planned)
        if self._projected is None or self._projected[0] != key:
            from flwr.serverapp import RdpAccountant
            ahead = RdpAccountant(self.rdp.config)
            ahead.load_state_dict(self.rdp.state_dict())
            ahead.compose(planned)
            self._projected = (key, ahead)
        return self._projected[1].get_epsilon(self.target_delta) > self.max_epsilon

    def _advance_projection(self, released: GaussianPrivacyEvent) -> None:
        """After a release equal to the planned one, move the projection one step ahead."""
        if self._projected is None:
            return
        (releases, planned), ahead = self._projected
        if releases + 1 == self.rdp.num_releases and planned == released:
            ahead.compose(planned)
            self._projected = ((self.rdp.num_releases, planned), ahead)
        else:
            self._projected = None

    def privacy_spent(self):  # type: ignore[override]
        return self.rdp.get_privacy_spent()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        sampled = [int(m.metadata.dst_node_id) for m in messages]
        if len(sampled) != self.num_sampled_clients:
            log(WARNING, "DP: sampled %d nodes, noise is calibrated for %d",
                len(sampled), self.num_sampled_clients)
        self._round = {"sampled": sampled, "aggregated": [], "released": False}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        averaged = sorted(self.strategy.averaged_nodes)  # empty if Flower's wrapper skipped
        info = self._round or {"sampled": [], "released": False}
        info["aggregated"] = averaged
        if arrays is None:
            log(WARNING, "DP: no aggregate released this round (nothing composed)")
            self._round = info
            return arrays, metrics
        event = self.event(len(info["sampled"]) or self.num_sampled_clients, len(averaged))
        self.rdp.compose(event)
        self._advance_projection(event)
        spent = self.rdp.get_privacy_spent()
        info.update(released=True, noise_std=self.noise_std,
                    noise_multiplier_effective=event.noise_multiplier * REPLACE_ONE_SENSITIVITY,
                    sample_size=event.sample_size, epsilon_after=spent.epsilon)
        self._round = info
        log(INFO, "DP: released round, epsilon %.4f at delta %g (replace-one, %d releases)",
            spent.epsilon, spent.delta, spent.num_releases)
        return _clamp_running_var(arrays), metrics


def _clamp_running_var(arrays: ArrayRecord) -> ArrayRecord:
    """Noise can make BatchNorm variances negative (NaN in eval mode): clamp at 0
    (post-processing of a DP output, so the guarantee is unchanged)."""
    out = ArrayRecord()
    for key, value in arrays.items():
        if key.endswith("running_var"):
            value = Array(np.maximum(value.numpy(), 0).astype(value.numpy().dtype))
        out[key] = value
    return out


class DpRun:
    """Everything DP for one ServerApp run: builds the strategy and its wrapper, checks the
    budget before a round, and writes `<out-dir>/dp_ledger.json` after every round."""

    def __init__(self, settings: DpSettings, out_dir: Path, node_ids: Iterable[int],
                 fraction_train: float, min_train_nodes: int, *,
                 wire_dtype: str = "float32") -> None:
        if wire_dtype != "float32":   # rounding the clipped reply to float16 can push it past C
            raise ValueError(f"differential privacy needs wire-dtype 'float32', got "
                             f"{wire_dtype!r}")
        self.settings = settings
        self.path = Path(out_dir) / LEDGER_NAME
        self.node_ids = sorted(int(n) for n in node_ids)
        self.population = len(self.node_ids)
        if fraction_train <= 0:
            raise ValueError("differential privacy needs fraction-train > 0")
        self.num_sampled = min(expected_sample_size(self.population, fraction_train,
                                                    min_train_nodes), max(self.population, 1))
        self.rounds: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.wrapper: AccountedClientSideFixedClipping | None = None

    def make_strategy(self, rule: str, **kwargs: Any) -> SharedKeyStrategy:
        """Like `strategy.make_strategy`, with equal weights (DP needs a plain average):
        only rule "fedavg" (the sensitivity of median/trimmed-mean/Krum is not C/m) with
        Flower's arithmetic (the other backends weight by num-examples themselves).

        `weighting` is forced to "equal" so that the round report records the weight DP
        really uses (1 each); `max_num_examples` still rejects absurd claims."""
        if normalize_rule(rule) != "fedavg":
            raise ValueError(f"differential privacy needs aggregation 'fedavg', got {rule!r}")
        backend = normalize_backend(kwargs.pop("backend", "flower"))
        if backend != "flower":
            raise ValueError(f"differential privacy needs aggregation-backend 'flower', "
                             f"got {backend!r}")
        if kwargs.get("weighting", "equal") != "equal":
            log(INFO, "DP: weighting %r ignored: differential privacy averages with equal "
                "weights", kwargs["weighting"])
        kwargs["weighting"] = "equal"
        return make_strategy("fedavg", rules={"fedavg": _uniform_fedavg}, **kwargs)

    def wrap(self, strategy: SharedKeyStrategy) -> AccountedClientSideFixedClipping:
        s = self.settings
        self.wrapper = AccountedClientSideFixedClipping(
            strategy, s.noise_multiplier, s.clipping_norm, self.num_sampled,
            population_size=self.population, target_delta=s.target_delta,
            max_epsilon=s.max_epsilon)
        return self.wrapper

    def resume(self) -> None:
        """Continue the ledger (and accountant) of an interrupted run, if there is one.
        Rounds recorded but not checkpointed stay in it: their aggregates were released."""
        if not self.path.exists() or self.wrapper is None:
            return
        data = json.loads(self.path.read_text(encoding="utf-8"))
        try:
            self.wrapper.rdp.load_state_dict(data["accountant"]["state"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"cannot resume the privacy ledger {self.path}: the DP settings or "
                             f"the population changed ({exc}); use a new out-dir") from exc
        self.rounds = list(data.get("rounds", []))
        log(INFO, "DP: resumed ledger with %d rounds, epsilon %.4f",
            len(self.rounds), self.wrapper.privacy_spent().epsilon)

    def budget_exhausted(self) -> bool:
        """True (and the reason recorded) if the next round would exceed dp-max-epsilon."""
        assert self.wrapper is not None
        if self.wrapper.would_exceed_budget():
            spent = self.wrapper.privacy_spent()
            self.stop_reason = (f"the next round would exceed dp-max-epsilon "
                                f"{self.settings.max_epsilon} (spent {spent.epsilon:.4f})")
            log(WARNING, "DP: stopping the run: %s", self.stop_reason)
            return True
        return False

    def record_round(self, index: int, stage: str) -> None:
        assert self.wrapper is not None
        info = self.wrapper.take_round()
        self.rounds.append({"round": index, "stage": stage, **info})
        self.write()

    def finish(self) -> None:
        self.write()

    # -- the ledger --------------------------------------------------------------------------

    def _participation_epsilon(self, events: list[GaussianPrivacyEvent]) -> float:
        """Composition of the rounds one client was exposed in, without sampling
        amplification (add-or-remove-one at z/2 == replace-one at z)."""
        if not events:
            return 0.0
        from flwr.serverapp import RdpAccountant
        acc = RdpAccountant(PrivacyConfig(
            target_delta=self.settings.target_delta, population_size=self.population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        counts: dict[GaussianPrivacyEvent, int] = {}
        for ev in events:
            counts[ev] = counts.get(ev, 0) + 1
        for ev, n in counts.items():
            acc.compose(ev, n)
        return acc.get_epsilon(self.settings.target_delta)

    def ledger(self) -> dict[str, Any]:
        assert self.wrapper is not None
        s, w = self.settings, self.wrapper
        spent = w.privacy_spent()
        rate = self.num_sampled / self.population if self.population else 0.0
        clients: dict[str, dict[str, Any]] = {}
        for node in sorted(set(self.node_ids) | {n for r in self.rounds for n in r.get("sampled", [])}):
            sampled = [r for r in self.rounds if node in r.get("sampled", [])]
            exposed = [r for r in sampled if r.get("released")]
            participated = [r["round"] for r in exposed if node in r.get("aggregated", [])]
            events = [GaussianPrivacyEvent(
                noise_multiplier=r["noise_multiplier_effective"] / REPLACE_ONE_SENSITIVITY,
                sample_size=r["sample_size"], population_size=self.population) for r in exposed]
            clients[str(node)] = {
                "node_id": node, "rounds_participated": len(participated),
                "participated_rounds": participated, "times_sampled": len(sampled),
                "released_rounds_sampled": len(exposed), "sampling_rate": rate,
                "noise_multiplier": s.noise_multiplier, "clipping_norm": s.clipping_norm,
                "epsilon": spent.epsilon, "delta": spent.delta,
                "epsilon_participation": self._participation_epsilon(events),
            }
        return {
            "schema_version": 1,
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "mechanism": "DP-FedAvg: client-side fixed clipping (Flower fixedclipping_mod) + "
                         "server-side Gaussian noise (Flower DifferentialPrivacyClientSideFixedClipping)",
            "noise_multiplier": s.noise_multiplier, "clipping_norm": s.clipping_norm,
            "target_delta": s.target_delta, "max_epsilon": s.max_epsilon,
            "population_size": self.population, "num_sampled_per_round": self.num_sampled,
            "sampling_rate": rate, "noise_std": w.noise_std,
            "rounds_recorded": len(self.rounds), "releases": spent.num_releases,
            "epsilon": spent.epsilon, "delta": spent.delta,
            "budget_exhausted": self.stop_reason is not None, "stop_reason": self.stop_reason,
            "accountant": {"name": "flwr RdpAccountant (dp-accounting RDP)",
                           "neighboring_relation": "replace-one",
                           "sampling_method": "without-replacement",
                           "optimal_order": spent.optimal_order,
                           "state": w.rdp.state_dict()},
            "rounds": self.rounds,
            "clients": clients,
            "notes": NOTES,
        }

    def write(self) -> Path:
        text = json.dumps(self.ledger(), indent=2, sort_keys=True)
        write_atomic(self.path, lambda f: f.write(text.encode("utf-8")))
        return self.path


__all__ = [
    "DP_WEIGHT_KEY",
    "LEDGER_NAME",
    "AccountedClientSideFixedClipping",
    "DpRun",
    "DpSettings",
    "UniformFedAvg",
    "dp_settings",
    "expected_sample_size",
]
