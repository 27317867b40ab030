"""Verification metrics against hand-computed values and brute force; flip-TTA embedding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from minusface.eval import best_threshold, embed, pair_scores, roc_auc, tar_at_far, verification_metrics

# Hand example, 2 folds of 4 pairs (p = same, n = different):
#   fold 0: 0.9p 0.6p 0.5n 0.2n      fold 1: 0.8p 0.4p 0.7n 0.1n
# Fit on fold 1 (sorted 0.1n 0.4p 0.7n 0.8p): thresholds -inf:2/4, 0.25:3/4, 0.55:2/4,
#   0.75:3/4, +inf:2/4 -> smallest best = 0.25.  On fold 0: 0.9 ok, 0.6 ok, 0.5n wrong, 0.2 ok
#   -> 3/4.
# Fit on fold 0 (0.2n 0.5n 0.6p 0.9p): 0.55 gives 4/4.  On fold 1: 0.8 ok, 0.4p wrong,
#   0.7n wrong, 0.1 ok -> 2/4.   accuracy = (0.75 + 0.5) / 2 = 0.625, std = 0.125.
# AUC: pos {0.9, 0.6, 0.8, 0.4} vs neg {0.5, 0.2, 0.7, 0.1}: wins 4 + 3 + 4 + 2 = 13 / 16.
# TAR@FAR 0.25 (1 of 4 negatives may pass): the 2nd highest negative 0.5 must be rejected ->
#   threshold = smallest score > 0.5 = 0.6; TAR = {0.9, 0.6, 0.8} = 3/4; FAR = {0.7} = 1/4.
# TAR@FAR 0.1 (0 negatives): reject 0.7 -> threshold 0.8, TAR = 2/4, FAR = 0.
SCORES = np.array([0.9, 0.6, 0.5, 0.2, 0.8, 0.4, 0.7, 0.1])
SAME = np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)


def test_hand_computed_example() -> None:
    m = verification_metrics(SCORES, SAME, n_folds=2, far_targets=(0.25, 0.1))
    assert m["fold_thresholds"] == pytest.approx([0.25, 0.55])   # fit on the other fold
    assert m["fold_accuracies"] == pytest.approx([0.75, 0.5])
    assert m["accuracy"] == pytest.approx(0.625)
    assert m["accuracy_std"] == pytest.approx(0.125)
    assert m["auc"] == pytest.approx(13 / 16)
    t25, t10 = m["tar_at_far"][0.25], m["tar_at_far"][0.1]
    assert (t25["threshold"], t25["tar"], t25["far"]) == pytest.approx((0.6, 0.75, 0.25))
    assert (t10["threshold"], t10["tar"], t10["far"]) == pytest.approx((0.8, 0.5, 0.0))
    assert t10["note"] is not None and "FAR = 0" in t10["note"]
    assert m["n_pairs"] == 8 and m["n_same"] == 4 and m["n_folds"] == 2


def test_explicit_folds_override_slices() -> None:
    folds = np.array([1, 1, 1, 1, 0, 0, 0, 0])          # same grouping, other ids
    m = verification_metrics(SCORES, SAME, folds=folds, far_targets=())
    assert sorted(m["fold_accuracies"]) == pytest.approx([0.5, 0.75])


def test_best_threshold_hand() -> None:
    # 0.1n 0.2n 0.3n 0.4p 0.6n 0.7p 0.8p 0.9p: 0.35 and 0.65 both give 7/8; smallest wins.
    s = np.array([0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.2, 0.1])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    assert best_threshold(s, y) == pytest.approx((0.35, 0.875))
    assert best_threshold(np.array([0.1, 0.2]), np.array([1, 1])) == (-math.inf, 1.0)
    assert best_threshold(np.array([0.1, 0.2]), np.array([0, 0])) == (math.inf, 1.0)


def test_auc_extremes() -> None:
    y = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    assert roc_auc(np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), y) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), y) == 0.0
    assert roc_auc(np.full(6, 0.5), y) == 0.5
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_auc_and_tar_match_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=300), 1)                # many ties
    y = rng.random(300) < 0.4
    s[y] += 0.5
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum())
    assert roc_auc(s, y) == pytest.approx(brute / (pos.size * neg.size), abs=1e-12)
    for far in (0.0, 0.01, 0.05, 0.3, 1.0):
        best = max(((pos >= t).mean(), -t) for t in np.append(s, np.inf)
                    if (neg >= t).mean() <= far + 1e-12)
        r = tar_at_far(s, y, far)
        assert r["tar"] == pytest.approx(best[0]) and r["far"] <= far + 1e-12


def test_best_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=200), 1)
    y = rng.random(200) < 0.5
    s[y] += 0.7
    brute = max(((s >= t) == y).mean() for t in np.concatenate([s, [np.inf]]))
    thr, acc = best_threshold(s, y)
    assert acc == pytest.approx(brute) and ((s >= thr) == y).mean() == pytest.approx(acc)


def test_far_resolution_note() -> None:
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(3000, bool), np.zeros(3000, bool)]
    s = np.r_[rng.normal(1, 1, 3000), rng.normal(-1, 1, 3000)]
    m = verification_metrics(s, y)
    r3 = m["tar_at_far"][1e-3]
    assert r3["max_false_accepts"] == 3 and r3["note"] and r3["far"] <= 1e-3
    assert m["tar_at_far"][1e-2]["max_false_accepts"] == 30
    assert m["tar_at_far"][1e-2]["note"] is None
    assert m["n_folds"] == 10 and len(m["fold_accuracies"]) == 10


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        verification_metrics(np.array([0.1, np.nan]), np.array([1, 0]), n_folds=1)
    with pytest.raises(ValueError):
        verification_metrics(np.array([0.1, 0.2]), np.array([1, 0, 1]), n_folds=1)


def test_pair_scores_cosine() -> None:
    a = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [-3.0, -4.0], [1.0, -1.0]])
    assert pair_scores(a, b) == pytest.approx([1.0, -1.0, 0.0])
    assert pair_scores(torch.tensor(a), torch.tensor(b)) == pytest.approx([1.0, -1.0, 0.0])


class _Probe(nn.Module):
    """Linear embedding that records its mode; dropout would make eval-mode errors visible."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 4 * 5, 8)
        self.drop = nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.drop(self.fc(x.flatten(1)))


def test_embed_flip_tta_and_eval_mode() -> None:
    x = torch.randn(10, 3, 4, 5)
    model = _Probe().train()
    out = embed(model, x, batch_size=4)
    assert model.training and model.modes and not any(model.modes)
    with torch.no_grad():
        want = nn.functional.normalize(model.fc(x.flatten(1)) + model.fc(x.flip(3).flatten(1)))
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(10))
    no_flip = embed(model, x, flip=False)
    assert torch.allclose(no_flip, nn.functional.normalize(model.fc(x.flatten(1)).detach()),
                          atol=1e-6)
    batches = [(x[:6], torch.zeros(6)), (x[6:], torch.zeros(4))]
    assert torch.allclose(embed(model, batches), out, atol=1e-6)


def test_embed_calls_transform_separately_per_view() -> None:
    x = torch.randn(5, 3, 4, 5)
    seen: list[torch.Tensor] = []

    def transform(b: torch.Tensor) -> torch.Tensor:
        seen.append(b.clone())
        return b + 0.01 * torch.randn_like(b)          # random per call

    embed(_Probe(), x, transform=transform, batch_size=5)
    assert len(seen) == 2
    assert torch.equal(seen[0], x) and torch.equal(seen[1], x.flip(3))
