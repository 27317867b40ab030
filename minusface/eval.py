"""Face verification evaluation: flip-TTA embeddings, cosine pair scores and LFW-style metrics.

Pure torch/numpy so the same code scores a plain recogniser, a MinusFace client pipeline
(transform = protection with fresh permutations) or a server-side model, on CPU or GPU.

Conventions: scores are cosine similarities (higher = same person); a pair is called "same"
when ``score >= threshold``.  Thresholds chosen by accuracy sweeps are midpoints between
neighbouring distinct scores (or -inf / +inf), so held-out folds never tie with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Batches = torch.Tensor | Iterable[torch.Tensor | Sequence[torch.Tensor]]
FAR_TARGETS: tuple[float, ...] = (1e-2, 1e-3)
MIN_FALSE_ACCEPTS = 10   # below this many negatives above threshold, a TAR@FAR is noisy


# --------------------------------------------------------------------------- embeddings

def _iter_batches(images: Batches, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"embed: expected images (N, C, H, W), got {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    for item in images:
        x = item[0] if isinstance(item, (tuple, list)) else item    # (images, labels) batches
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError("embed: every batch must be a tensor (B, C, H, W) "
                             "or a tuple whose first element is one")
        yield x


def _modules_of(*fns: object) -> list[nn.Module]:
    """Modules behind callables: the module itself or the owner of a bound method."""
    found: list[nn.Module] = []
    for fn in fns:
        for m in (fn, getattr(fn, "__self__", None)):
            if isinstance(m, nn.Module) and all(m is not f for f in found):
                found.append(m)
    return found


def embed(model_fn: Callable[[torch.Tensor], torch.Tensor], images: Batches,
          transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
          batch_size: int = 64, flip: bool = True,
          device: torch.device | str | None = None) -> torch.Tensor:
    """L2-normalised embeddings (N, D) float32 on CPU, with horizontal-flip test-time augmentation.

    e(x) = normalise(f(t(x)) + f(t(flip(x)))).  ``transform`` t is called separately on the
    original and on the flipped batch, so a random transform (MinusFace protection draws fresh
    permutations per call) gives each view its own randomness, as it would in deployment.
    Modules behind ``model_fn``/``transform`` run in eval mode under no_grad and get their
    previous mode back.  ``images`` is a tensor (N, C, H, W) or an iterable of batches
    (a DataLoader yielding (images, labels) works).  ``device`` defaults to the model's.
    """
    modules = _modules_of(model_fn, transform)
    if device is None:
        params = [p for m in modules for p in m.parameters()]
        device = params[0].device if params else None
    modes = [m.training for m in modules]

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = model_fn(transform(x) if transform is not None else x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError(f"embed: model must return embeddings (B, D), got "
                             f"{getattr(out, 'shape', type(out))}")
        return out.float()

    chunks: list[torch.Tensor] = []
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            for x in _iter_batches(images, batch_size):
                if device is not None:
                    x = x.to(device)
                e = forward(x)
                if flip:
                    e = e + forward(torch.flip(x, dims=(3,)))
                chunks.append(F.normalize(e, dim=1).cpu())
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def pair_scores(emb_a: np.ndarray | torch.Tensor, emb_b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Row-wise cosine similarity (float64); inputs need not be normalised."""
    a = np.asarray(emb_a.detach().cpu() if isinstance(emb_a, torch.Tensor) else emb_a, np.float64)
    b = np.asarray(emb_b.detach().cpu() if isinstance(emb_b, torch.Tensor) else emb_b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"pair_scores: expected two (N, D) arrays of equal shape, "
                         f"got {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)


# --------------------------------------------------------------------------- metrics

def _check(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(same).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and same differ in length: {s.size} vs {y.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("same must be boolean (or 0/1)")
        y = y.astype(bool)
    return s, y


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of ``score >= threshold`` on these pairs.

    Candidates are -inf, midpoints between neighbouring distinct scores and +inf; on ties the
    smallest threshold wins (deterministic).  O(N log N).
    """
    s, y = _check(scores, same)
    if s.size == 0:
        raise ValueError("best_threshold: no pairs")
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    uniq, start = np.unique(s, return_index=True)
    pos_below = np.concatenate([[0], np.cumsum(y)])[start]     # positives with score < uniq[i]
    neg_below = start - pos_below
    n_pos = int(y.sum())
    correct = np.append((n_pos - pos_below) + neg_below, s.size - n_pos)
    i = int(np.argmax(correct))
    if i == 0:
        thr = -math.inf
    elif i == uniq.size:
        thr = math.inf
    else:
        thr = float((uniq[i - 1] + uniq[i]) / 2)
    return thr, float(correct[i] / s.size)


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Exact ROC AUC = P(score_same > score_diff) + 0.5 P(equal) (Mann-Whitney, average ranks)."""
    s, y = _check(scores, same)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    end = np.cumsum(counts).astype(np.float64)
    avg_rank = end - (counts - 1) / 2.0                          # 1-based mean rank of each value
    rank_sum = avg_rank[inv][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> dict:
    """TAR at the smallest observed-score threshold whose FAR (on different pairs) is <= ``far``.

    Returns tar, the achieved far, threshold, n_negatives, max_false_accepts (floor(far * n_neg))
    and a note when fewer than `MIN_FALSE_ACCEPTS` negatives decide it (e.g. 1e-3 of 3,000 is 3
    pairs): the value is still computed but is noisy, or at FAR = 0 when the target is < 1/n_neg.
    """
    s, y = _check(scores, same)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("tar_at_far needs both same and different pairs")
    allowed = int(math.floor(far * neg.size + 1e-9))
    if allowed >= neg.size:
        thr = float(s.min())
    else:
        v = np.sort(neg)[::-1][allowed]                  # this negative must be rejected
        above = s[s > v]
        thr = float(above.min()) if above.size else math.inf
    note = None
    if allowed == 0:
        note = (f"target FAR {far:g} < 1/{neg.size} negatives: threshold rejects every "
                f"different pair, TAR is at FAR = 0")
    elif allowed < MIN_FALSE_ACCEPTS:
        note = (f"only {allowed} of {neg.size} different pairs may be accepted at FAR {far:g}: "
                f"too few negatives to resolve this FAR reliably")
    return {"tar": float((pos >= thr).mean()), "far": float((neg >= thr).mean()),
            "threshold": thr, "n_negatives": int(neg.size), "max_false_accepts": allowed,
            "note": note}


def _fold_ids(n: int, n_folds: int, folds: np.ndarray | None) -> np.ndarray:
    if folds is not None:
        f = np.asarray(folds).ravel()
        if f.size != n:
            raise ValueError(f"folds has {f.size} entries for {n} scores")
        return f
    if not 1 <= n_folds <= n:
        raise ValueError(f"n_folds must be in 1..{n}, got {n_folds}")
    return np.arange(n) * n_folds // n                   # consecutive, (near-)equal slices


def verification_metrics(scores: np.ndarray, same: np.ndarray, n_folds: int = 10,
                         folds: np.ndarray | None = None,
                         far_targets: Sequence[float] = FAR_TARGETS) -> dict:
    """LFW-protocol metrics for cosine ``scores`` of pairs with labels ``same``.

    accuracy / accuracy_std: for each fold, the `best_threshold` of the other folds is applied to
    it; mean and population std (ddof = 0) over folds.  Folds are consecutive equal slices in the
    given order (pairs.txt order), or the ids in ``folds``.  With one fold the threshold is fit
    and scored on the same pairs (optimistic).  Also: auc (exact, ties = 1/2), tar_at_far
    {far: tar_at_far(...)} and the all-data best threshold.
    """
    s, y = _check(scores, same)
    fid = _fold_ids(s.size, n_folds, folds)
    fold_acc, thresholds = [], []
    ids = np.unique(fid)
    for k in ids:
        test = fid == k
        fit = ~test if ids.size > 1 else test
        thr, _ = best_threshold(s[fit], y[fit])
        thresholds.append(thr)
        fold_acc.append(float(((s[test] >= thr) == y[test]).mean()))
    thr_all, acc_all = best_threshold(s, y)
    return {
        "accuracy": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "fold_accuracies": fold_acc,
        "fold_thresholds": thresholds,
        "best_threshold": thr_all,
        "best_threshold_accuracy": acc_all,
        "auc": roc_auc(s, y),
        "tar_at_far": {float(f): tar_at_far(s, y, f) for f in far_targets},
        "n_pairs": int(s.size), "n_same": int(y.sum()), "n_folds": int(ids.size),
    }
