"""How much each accepted reply counts: the bounds on a site's self-reported weight.

FedAvg weights each reply by the `num-examples` the site itself reports, so an unchecked claim
lets one site take over the global model.  `WeightPolicy` holds the server's answer:

1. a claim that is not a whole number >= 1 (0.5, NaN, inf, bool, negative), or that is above
   `max_num_examples`, is rejected (`validation.weight_problem`: a claim that large is a lie or
   a misconfiguration, so it is refused, not clipped);
2. with `weighting="equal"` every accepted reply weighs 1 (no trust in claims; a small site then
   counts as much as a big one);
3. with `weighting="num-examples"` each claim is clipped to `max_weight_ratio` x the lower
   median of the round's accepted claims.  With n sites of equal honest size one liar then
   holds at most ratio / (ratio + n - 1) of the weight (4 sites: 57%, 10 sites: 31%) instead
   of all of it.  The trade-off: an honest site more than `ratio` times the median also counts
   as only `ratio` x the median (non-IID federations with very unequal sites may want a larger
   ratio); the lower median of two claims is the smaller, so with 2 sites the larger counts at
   most `ratio` times the smaller.

The ServerApp passes the run-config keys `weighting`, `max-num-examples` and
`max-weight-ratio`; built without them the policy trusts every claim, as Flower's FedAvg does.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from task.config import normalize_weighting


def fmt_weight(value: float) -> str:
    """A weight as a log line shows it: whole numbers without a fraction."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"


def shares(weights: list[float]) -> list[float]:
    """Weights normalised to sum to 1, in float64 without overflow for any finite weights."""
    top = max(weights)
    scaled = [w / top for w in weights]
    total = math.fsum(scaled)
    return [w / total for w in scaled]


@dataclass(frozen=True)
class Weighed:
    """One reply's effective weight, and why it differs from its claim (None: it does not)."""

    weight: float
    note: str | None = None


@dataclass(frozen=True)
class WeightPolicy:
    """The bounds on claimed weights (module doc).

    weighting : "num-examples" weighs by the (bounded) claim, "equal" by 1.
    max_num_examples : a larger claim rejects the reply; None: no cap.
    max_weight_ratio : clip each weight to this many times the lower median of the round's
        accepted claims; None (or 0) : off.
    """

    weighting: str = "num-examples"
    max_num_examples: int | None = None
    max_weight_ratio: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weighting", normalize_weighting(self.weighting))
        cap = self.max_num_examples
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"`max_num_examples` must be an int >= 1 or None, got {cap!r}")
        ratio = self.max_weight_ratio
        if ratio and not (math.isfinite(ratio) and ratio >= 1):
            raise ValueError(f"`max_weight_ratio` must be >= 1, or 0/None (off), got {ratio!r}")
        object.__setattr__(self, "max_weight_ratio", float(ratio) if ratio else None)

    def weigh(self, claims: list[float]) -> list[Weighed]:
        """The effective weight of each accepted claim of one round, in order."""
        if self.weighting == "equal":
            return [Weighed(1.0) for _ in claims]
        if self.max_weight_ratio is None:
            return [Weighed(claim) for claim in claims]
        median = float(statistics.median_low(claims))
        cap = self.max_weight_ratio * median
        out = []
        for claim in claims:
            if claim <= cap:
                out.append(Weighed(claim))
                continue
            note = (f"weight clipped from {fmt_weight(claim)} to {fmt_weight(cap)} "
                    f"(max-weight-ratio {fmt_weight(self.max_weight_ratio)} x median "
                    f"{fmt_weight(median)})")
            out.append(Weighed(cap, note))
        return out


__all__ = ["Weighed", "WeightPolicy", "fmt_weight", "shares"]
