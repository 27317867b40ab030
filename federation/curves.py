"""The run report's pictures: server accuracy/AUC and site training loss per round, final ROC.

Drawn with matplotlib's Agg backend (no display needed, files only) from what the run already
wrote: metrics.jsonl's round and client records and server_scores.json (the last server-side
evaluation's score per pair).  Each function writes one PNG and returns its path, or None when
the run holds nothing to draw (no rounds yet, no loss reported, no scores kept).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from minusface.eval import tar_at_far

FARS = (1e-2, 1e-3)          # the operating points marked on the ROC curve
LOSS_KEYS = ("train_loss", "loss")


def _pyplot():
    import matplotlib  # heavy: only when a picture is drawn
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _number(value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else math.nan


def _stage_spans(ax, rounds: list[dict]) -> None:
    """Shade stage 2 and label both stages, so a reader sees where g was frozen."""
    numbers = [r["round"] for r in rounds]
    ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)
    stage2 = [r["round"] for r in rounds if r["stage"] == "stage2"]
    if stage2:
        ax.axvspan(min(stage2) - 0.5, max(stage2) + 0.5, color="0.92", zorder=0)
        ax.text(min(stage2) - 0.45, 0.98, "stage 2: f_p on X_p", va="top", fontsize=8,
                color="0.35", transform=ax.get_xaxis_transform())
    if any(r["stage"] == "stage1" for r in rounds):
        ax.text(min(numbers) - 0.45, 0.98, "stage 1: g, f on r", va="top", fontsize=8,
                color="0.35", transform=ax.get_xaxis_transform())


def accuracy_curve(rounds: list[dict], path: Path) -> Path | None:
    """Server accuracy (%, with its 10-fold std) and AUC per round."""
    if not rounds:
        return None
    plt = _pyplot()
    x = [r["round"] for r in rounds]
    acc = np.array([100 * _number(r["metrics"].get("server_accuracy")) for r in rounds])
    std = np.array([100 * _number(r["metrics"].get("server_accuracy_std")) for r in rounds])
    auc = [_number(r["metrics"].get("server_auc")) for r in rounds]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    _stage_spans(ax, rounds)
    ax.errorbar(x, acc, yerr=np.nan_to_num(std), marker="o", capsize=3, color="tab:blue",
                label="server accuracy (10-fold mean ± std)")
    ax.axhline(50, color="0.5", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)", color="tab:blue")
    ax.set_ylim(0, 100)
    ax.set_xticks(x)
    ax2 = ax.twinx()
    ax2.plot(x, auc, marker="s", color="tab:orange", label="AUC")
    ax2.set_ylabel("AUC", color="tab:orange")
    ax2.set_ylim(0, 1)
    pairs = rounds[-1]["metrics"].get("server_eval_pairs", "?")
    ax.set_title(f"Server-side LFW benchmark per round ({pairs} pairs)", fontsize=10)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def site_loss(record: dict) -> float:
    """A client record's training loss (NaN when it has none)."""
    metrics = record["client"].get("metrics")
    if not isinstance(metrics, dict):
        return math.nan
    for key in LOSS_KEYS:
        if key in metrics:
            return _number(metrics[key])
    return math.nan


def loss_curve(rounds: list[dict], clients: list[dict], path: Path) -> Path | None:
    """Each site's training loss per round (train replies only)."""
    by_site: dict[str, dict[int, float]] = {}
    for rec in clients:
        if rec["client"].get("phase", "train") != "train":
            continue
        loss = site_loss(rec)
        if math.isfinite(loss):
            site = str(rec["client"].get("site") or rec["client"].get("node_id"))
            by_site.setdefault(site, {})[rec["round"]] = loss
    if not by_site:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    _stage_spans(ax, rounds)
    for site, losses in sorted(by_site.items()):
        xs = sorted(losses)
        ax.plot(xs, [losses[r] for r in xs], marker="o", label=f"site {site}")
    ax.set_xlabel("round")
    ax.set_ylabel("training loss (margin head)")
    ax.set_xticks(sorted({r for losses in by_site.values() for r in losses}))
    ax.set_title("Site training loss per round (each site's last local epoch)", fontsize=10)
    if len(by_site) <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def roc_points(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FAR, TAR) at every distinct score threshold, from accept-all to reject-all."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    thresholds = np.concatenate([[-np.inf], np.unique(s), [np.inf]])
    far = np.array([(s[~y] >= t).mean() for t in thresholds])
    tar = np.array([(s[y] >= t).mean() for t in thresholds])
    return far, tar


def roc_curve(scores: np.ndarray, same: np.ndarray, path: Path, title: str) -> Path | None:
    """ROC of the last server-side evaluation, with TAR at FAR 1e-2 and 1e-3 marked (and a note
    when the pairs are too few to resolve that FAR)."""
    y = np.asarray(same, dtype=bool)
    if y.all() or not y.any():
        return None
    plt = _pyplot()
    far, tar = roc_points(scores, y)
    fig, ax = plt.subplots(figsize=(4.8, 4.4), dpi=110)
    ax.plot(far, tar, color="tab:blue", label="ROC")
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=0.8, label="chance")
    for target, colour, marker, size in zip(FARS, ("tab:red", "tab:purple"), ("o", "x"), (70, 50)):
        op = tar_at_far(np.asarray(scores), y, target)
        note = " (too few pairs: at FAR 0)" if op["max_false_accepts"] == 0 else (
            " (few pairs)" if op["note"] else "")
        ax.scatter([op["far"]], [op["tar"]], color=colour, marker=marker, s=size, zorder=3,
                   label=f"FAR {target:g}: TAR {op['tar']:.3f}{note}")
    ax.set_xlabel(f"false accept rate ({int((~y).sum())} different pairs)")
    ax.set_ylabel(f"true accept rate ({int(y.sum())} same pairs)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def face_grid(faces: np.ndarray, protected: np.ndarray, names: list[str], path: Path,
              title: str) -> Path:
    """Faces (N, 3, H, W) in [-1, 1] in the top row, their X_p (N, 3, H, W) in [0, 1] below."""
    if len(faces) != len(protected) or len(faces) != len(names) or not len(faces):
        raise ValueError(f"face_grid: {len(faces)} faces, {len(protected)} X_p and {len(names)} "
                         "names: expected the same number, at least one")
    plt = _pyplot()
    n = len(faces)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), dpi=110, squeeze=False)
    for i in range(n):
        top = np.clip((np.asarray(faces[i]).transpose(1, 2, 0) + 1) / 2, 0, 1)
        bottom = np.clip(np.asarray(protected[i]).transpose(1, 2, 0), 0, 1)
        for row, image in ((0, top), (1, bottom)):
            axes[row][i].imshow(image)
            axes[row][i].set_xticks([])
            axes[row][i].set_yticks([])
        axes[0][i].set_title(names[i].replace("_", " "), fontsize=7)
    axes[0][0].set_ylabel("face X", fontsize=9)
    axes[1][0].set_ylabel("protected X_p", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
