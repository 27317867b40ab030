"""TensorBoard event files of a run, written round by round: `tensorboard --logdir OUT_DIR`.

    OUT_DIR/tensorboard/events.out.tfevents.*

Scalars per round (the step is the run's round number, stages follow each other):
`server/accuracy`, `server/auc`, `server/tar_at_far_1e-3` (and every other numeric server-side
metric under `server/`), `run/lr`, `run/round_seconds`, and `site_loss/<site>` for every site
that replied to a training message.  A resumed run purges the steps it trains again, so
TensorBoard shows the last try of a round, as the report does.  Written with tensorboardX (event
files without TensorFlow); the `tensorboard` viewer itself is not a minusfed dependency.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from federation.curves import site_loss

DIR = "tensorboard"
RUN_KEYS = ("lr", "round_seconds")


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


class RunEvents:
    """One writer per ServerApp start; `purge_from` is the first round this start trains."""

    def __init__(self, out_dir: Path, purge_from: int = 1) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(Path(out_dir) / DIR), flush_secs=5,
                                    purge_step=purge_from if purge_from > 1 else None)

    def round(self, index: int, metrics: Mapping[str, object],
              replies: Iterable[Mapping[str, object]]) -> None:
        for key, value in metrics.items():
            number = _number(value)
            if number is None:
                continue
            if key.startswith("server_"):
                self.writer.add_scalar(f"server/{key[len('server_'):]}", number, index)
            elif key in RUN_KEYS:
                self.writer.add_scalar(f"run/{key}", number, index)
        for entry in replies:
            if entry.get("phase", "train") != "train":
                continue
            loss = site_loss({"client": entry})
            if math.isfinite(loss):
                site = entry.get("site") or entry.get("node_id")
                self.writer.add_scalar(f"site_loss/{site}", loss, index)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
