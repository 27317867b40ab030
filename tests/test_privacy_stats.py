"""The privacy evaluation's honesty machinery: intervals, chance, cross-image identity, gates,
early stopping and the gradient-inversion verdict (fast, no data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from privacy.attacks import train_inverter, views_fn
from privacy.gates import judge_gate, pixel_gate, pixel_verdict
from privacy.gradient_inversion import verdict
from privacy.identity import cross_image_identity, gallery_split, needed_pairs
from privacy.metrics import bootstrap_ci, mean_ci

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- intervals

def test_bootstrap_two_identities_worked_example():
    """Values 0 and 1 on two identities: resampled means are 0, 0.5, 1 with probability 1/4,
    1/2, 1/4, so the 2.5 % and 97.5 % quantiles are exactly 0 and 1."""
    assert mean_ci([0.0, 1.0], ["a", "b"], n_boot=4000, seed=3) == (0.0, 1.0)
    assert mean_ci([0.7, 0.7, 0.7], [1, 2, 3]) == pytest.approx((0.7, 0.7))
    assert mean_ci([1.0, 2.0], [1, 1]) is None                  # one identity: no interval


def test_bootstrap_resamples_identities_not_images():
    """Ten images of a person who is always recognised and ten of one who never is: over
    identities the interval is [0, 1]; resampling the 20 images as if independent would give
    about [0.3, 0.7] - the narrowing this helper exists to avoid."""
    values = np.r_[np.ones(10), np.zeros(10)]
    groups = np.r_[np.zeros(10), np.ones(10)]
    assert mean_ci(values, groups, n_boot=2000, seed=0) == (0.0, 1.0)
    lo, hi = mean_ci(values, np.arange(20), n_boot=2000, seed=0)
    assert 0.2 < lo < 0.4 and 0.6 < hi < 0.8


def test_bootstrap_matches_the_normal_approximation_with_many_identities():
    rng = np.random.default_rng(0)
    v = (rng.random(400) < 0.3).astype(float)
    lo, hi = mean_ci(v, np.arange(400), n_boot=2000, seed=1)
    se = math.sqrt(v.mean() * (1 - v.mean()) / 400)
    assert lo == pytest.approx(v.mean() - 1.96 * se, abs=0.01)
    assert hi == pytest.approx(v.mean() + 1.96 * se, abs=0.01)
    # a statistic of the selected indices (here: a max) works too
    assert bootstrap_ci(lambda idx: v[idx].max(), np.arange(400), n_boot=50) == (1.0, 1.0)


# --------------------------------------------------------------------------- identity

def _people(n_ids: int, per: int, dim: int = 32, noise: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per)
    return centres[labels] + noise * rng.normal(size=(labels.size, dim)), labels


def test_gallery_has_one_image_per_person_and_probes_are_other_photos():
    labels = np.array([3, 3, 1, 2, 2, 2, 1])
    gallery, probes = gallery_split(labels)
    assert gallery.tolist() == [0, 2, 3] and probes.tolist() == [1, 4, 5, 6]


def test_cross_image_identity_separates_people_and_prints_chance():
    emb, labels = _people(20, 3)
    m = cross_image_identity(emb, emb, labels, n_boot=200)
    assert m["n"] == 40 and m["n_gallery"] == 20
    assert m["chance"]["rank1"] == pytest.approx(1 / 20)
    assert m["rank1"] == 1.0 and m["auc"] > 0.99 and m["accuracy"] > 0.95
    assert m["rank1_ci"][0] <= m["rank1"] <= m["rank1_ci"][1]
    # 40 probes x 19 other people = 760 impostor pairs: 1e-2 needs 1,000, 1e-3 needs 10,000
    assert m["n_impostor"] == 760 and needed_pairs(1e-2) == 1000
    assert m["tar@0.01"] is None and m["tar@0.001"] is None
    assert m["notes"]["tar@0.001"] == "n/a (needs >= 10000 pairs)"


def test_cross_image_identity_never_matches_an_image_with_itself():
    """Every image its own random embedding, identical on both sides: matching the SAME image
    would score 1.0, different photos of a person score chance."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(30), 2)
    emb = rng.normal(size=(60, 64))
    m = cross_image_identity(emb, emb, labels, n_boot=200)
    assert m["rank1"] < 0.25 and 0.3 < m["auc"] < 0.7
    assert m["rank1_ci"][0] <= m["chance"]["rank1"] + 0.05


def test_identity_suppressed_when_the_sample_cannot_support_it():
    emb, labels = _people(4, 3)
    m = cross_image_identity(emb, emb, labels)
    assert "suppressed" in m and "rank1" not in m


# --------------------------------------------------------------------------- gates

def _rows(none_psnr: float, none_ssim: float, mf_psnr: float, mf_ssim: float) -> dict:
    return {"none": {"psnr": none_psnr, "ssim": none_ssim},
            "minusface": {"psnr": mf_psnr, "ssim": mf_ssim},
            "constant: mean aux face": {"psnr": 13.1, "ssim": 0.36},
            "constant: median aux face": {"psnr": 13.0, "ssim": 0.37}}


def test_pixel_gate_and_verdicts():
    weak = _rows(24.1, 0.80, 12.4, 0.30)                 # the cpu-quick control: below the gate
    gate = pixel_gate(weak, 30.0, 0.95)
    assert not gate["passed"] and "24.10 dB" in gate["reason"]
    v = pixel_verdict("minusface", weak["minusface"], gate, {"psnr": 13.1, "ssim": 0.37})
    assert v == "no evidence (gate failed)"

    below_constant = _rows(12.0, 0.30, 11.0, 0.2)       # even lenient thresholds: not above guess
    assert not pixel_gate(below_constant, 5.0, 0.1)["passed"]

    strong = _rows(31.0, 0.96, 11.5, 0.30)
    gate = pixel_gate(strong, 30.0, 0.95)
    assert gate["passed"]
    const = {"psnr": 13.1, "ssim": 0.37}
    assert "target (SSIM <= 0.50, PSNR <= 12 dB) met" in pixel_verdict(
        "minusface", strong["minusface"], gate, const)
    assert pixel_verdict("minusface", {"psnr": 15.0, "ssim": 0.5}, gate, const).startswith("leaks")


def test_judge_gate_refuses_a_weak_judge():
    assert not judge_gate({"auc": 0.65, "tar@0.001": None}, 0.9)["passed"]
    assert "refused" in judge_gate({"auc": 0.65, "tar@0.001": None}, 0.9)["reason"]
    assert judge_gate({"auc": 0.97, "tar@0.001": 0.4}, 0.9)["passed"]
    assert not judge_gate({"suppressed": "too few"}, 0.9)["passed"]


def test_gradient_inversion_verdict_needs_x_p_recovered_with_matched_gradients():
    base = {"reference: grey guess": {"psnr": 11.6}, "reference: grey guess vs X_p": {"psnr": 18.8},
            "gi/none": {"psnr": 15.2, "grad_cos": 0.95}}
    failed = {**base, "gi/minusface": {"psnr": 9.6, "grad_cos": 0.90},
              "gi/minusface vs X_p": {"psnr": 13.5, "grad_cos": 0.90}}
    v = verdict(failed)
    assert "no evidence either way" in v and "not protection" in v
    worked = {**base, "gi/minusface": {"psnr": 11.0, "grad_cos": 0.97},
              "gi/minusface vs X_p": {"psnr": 22.0, "grad_cos": 0.97}}
    assert "reveals X_p" in verdict(worked)
    leaky = {**worked, "gi/minusface": {"psnr": 14.0, "grad_cos": 0.97}}
    assert "LEAKS" in verdict(leaky)
    unmatched = {**worked, "gi/none": {"psnr": 15.2, "grad_cos": 0.5}}
    assert "did not recover even unprotected" in verdict(unmatched)


# --------------------------------------------------------------------------- early stopping

def test_attacker_stops_when_held_out_loss_stops_improving():
    """lr = 0: the held-out loss never improves after the first check, so training stops
    after `patience` more checks, far inside the step budget; the curve is kept."""
    faces = torch.rand(40, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inv = train_inverter(views_fn(None, "none"), faces, epochs=20, batch_size=4, lr=0.0,
                         width=2, progress=False, eval_every=2, patience=2)
    c = inv.training_curve
    assert c["n_heldout"] == 4 and c["n_train"] == 36 and c["budget_steps"] == 20 * 9
    assert c["steps"] == 6 and c["step"] == [2, 4, 6] and "did not improve" in c["stopped"]
    assert len(c["heldout_loss"]) == 3 and len(set(c["heldout_loss"])) == 1
    inv = train_inverter(views_fn(None, "none"), faces, epochs=2, batch_size=4, lr=1e-3,
                         width=2, progress=False, eval_every=3, patience=10)
    c = inv.training_curve
    assert c["steps"] == 18 and c["stopped"] == "step budget" and c["step"][-1] == 18
    assert min(c["heldout_loss"]) == c["best_heldout_loss"] < c["heldout_loss"][0]
