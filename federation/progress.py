"""One progress line per round on the ServerApp's log, instead of Flower's per-round blocks.

Each round is its own `Strategy.start(num_rounds=1)` (federation/server_app.py), so Flower would
print its strategy summary, a "[ROUND 1/1]" header, sampling lines and a "Final results" block
once per round: pages of text in which a newcomer watching `flwr run --stream` or `make demo`
cannot see where the run is or how long it will still take.  `quiet_strategy()` keeps Flower's
INFO chatter out while a round runs (warnings and errors still pass), and `RoundClock` writes the
one line that replaces it: stage, round i/N, elapsed, ETA and the server-side accuracy.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

FLOWER_LOGGER = "flwr"
KEEP_PREFIXES = ("DP:",)        # INFO lines a round still shows: the privacy ledger's epsilon


class _RoundChatter(logging.Filter):
    """Drops INFO and DEBUG records of one thread (the ServerApp's, running the strategy) except
    those starting with KEEP_PREFIXES.  Other threads pass: in a simulation the engine shares
    the process and logs there (e.g. its actor pool), and that is not round chatter."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO or record.thread != self.thread:
            return True
        return str(record.msg).startswith(KEEP_PREFIXES)


@contextmanager
def quiet_strategy() -> Iterator[None]:
    """Flower's per-round INFO lines are dropped inside this block; warnings pass."""
    logger = logging.getLogger(FLOWER_LOGGER)
    chatter = _RoundChatter()
    logger.addFilter(chatter)
    try:
        yield
    finally:
        logger.removeFilter(chatter)


def duration(seconds: float) -> str:
    """"42 s", "3 min 05 s", "1 h 02 min": a time a person reads at a glance."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class RoundClock:
    """Times the rounds of one run and estimates what is left.

    A stage-1 round (g and f trained on r) costs several stage-2 rounds on a CPU, so the ETA
    prices each remaining round at the mean of its own stage's rounds so far, and at the mean of
    all timed rounds while its stage has none.
    """

    def __init__(self, plan: list[tuple[str, int]], already_done: int = 0) -> None:
        self.plan = plan
        self.already_done = already_done          # rounds a resumed run skips
        self.started = time.monotonic()
        self.seconds: dict[str, list[float]] = {}

    def record(self, stage: str, seconds: float) -> None:
        self.seconds.setdefault(stage, []).append(seconds)

    def eta(self, index: int) -> float | None:
        """Seconds the rounds after `index` (1-based) should take; None before any was timed."""
        timed = [s for values in self.seconds.values() for s in values]
        if not timed:
            return None
        overall = sum(timed) / len(timed)
        left = 0.0
        for stage, _ in self.plan[index:]:
            mine = self.seconds.get(stage)
            left += sum(mine) / len(mine) if mine else overall
        return left

    def line(self, index: int, stage: str, stage_round: int, metrics: Mapping[str, object]) -> str:
        """The progress line after round `index` of the plan."""
        planned = sum(1 for s, _ in self.plan if s == stage)
        parts = [f"minusfed: round {index}/{len(self.plan)}",
                 f"{stage} {stage_round}/{planned}",
                 f"{duration(time.monotonic() - self.started)} elapsed"]
        eta = self.eta(index)
        parts.append("done" if index == len(self.plan) else
                     f"ETA {duration(eta)}" if eta is not None else "ETA -")
        acc, auc = metrics.get("server_accuracy"), metrics.get("server_auc")
        if isinstance(acc, float) and math.isfinite(acc):
            shown = f"server accuracy {100 * acc:.2f} %"
            if isinstance(auc, float) and math.isfinite(auc):
                shown += f" (AUC {auc:.3f}, {metrics.get('server_eval_pairs', '?')} pairs)"
            parts.append(shown)
        elif isinstance(acc, float):
            parts.append("server accuracy NaN (model not finite)")
        nodes = metrics.get("nodes")
        train = nodes.get("train") if isinstance(nodes, dict) else None
        if isinstance(train, dict) and isinstance(train.get("sampled"), list):
            parts.append(f"sites {len(train.get('replied') or [])}/{len(train['sampled'])} replied")
        return " | ".join(parts)
