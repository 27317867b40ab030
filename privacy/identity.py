"""Identity metrics on DIFFERENT photos of a person, with chance levels and intervals.

Protocol (`cross_image_identity`): the gallery holds ONE image per identity (its first image in
the given order); every other image of an identity with >= 2 images is a probe.  The probe side
and the gallery side are embedded by possibly different functions (the judge on a recovered
face vs the judge on the original; f_p on X_p vs f_p on X_p of another photo), so a probe is
never compared with its own image:

  rank-1     the nearest gallery entry is the probe's person      chance 1 / gallery size
  auc        genuine (probe, its person's gallery image) vs impostor (probe, any other gallery
             image) cosine scores                                 chance 0.5
  accuracy   10-fold (folds are identity-disjoint) best-threshold accuracy on balanced pairs:
             each genuine pair with one seeded impostor pair      chance 0.5
  tar@FAR    on all impostor pairs                                chance = FAR; None ("n/a")
             when fewer than MIN_FALSE_ACCEPTS / FAR impostor pairs resolve it
  genuine_cos / impostor_cos   mean cosine of the two kinds of pairs

Every number carries a 95 % bootstrap interval over probe identities ("<key>_ci").  With fewer
than `MIN_IDENTITIES` identities that have a probe, the metrics are suppressed (a dict with
"suppressed": why) because the sample cannot support them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from minusface.eval import MIN_FALSE_ACCEPTS, roc_auc, tar_at_far, verification_metrics

from .metrics import FARS, bootstrap_ci

MIN_IDENTITIES = 5          # identities with a probe below which identity columns are suppressed
IDENTITY_KEYS = ("rank1", "auc", "accuracy", "tar@0.01", "tar@0.001", "genuine_cos")


def needed_pairs(far: float) -> int:
    """Impostor pairs needed before TAR at `far` rests on MIN_FALSE_ACCEPTS false accepts."""
    return int(math.ceil(MIN_FALSE_ACCEPTS / far - 1e-9))


def gallery_split(labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gallery indices: the first image of each identity, probe indices: every other image)."""
    lab = np.asarray(labels).ravel()
    _, first = np.unique(lab, return_index=True)
    gallery = np.sort(first)
    probes = np.setdiff1d(np.arange(lab.size), gallery)
    return gallery, probes


def _normalise(x: torch.Tensor | np.ndarray) -> np.ndarray:
    t = torch.as_tensor(x).detach().float().cpu()
    return F.normalize(t, dim=1).double().numpy()


def cross_image_identity(probe_emb: torch.Tensor | np.ndarray,
                         gallery_emb: torch.Tensor | np.ndarray,
                         labels: Sequence[int] | np.ndarray, *, fars: Sequence[float] = FARS,
                         n_boot: int = 1000, seed: int = 0) -> dict:
    """Identity metrics of probe-side vs gallery-side embeddings of the same N images.

    ``probe_emb[i]`` / ``gallery_emb[i]``: the two sides' embeddings of image i (N, D);
    ``labels[i]`` its identity.  See the module docstring for the protocol.
    """
    lab = np.asarray(labels).ravel()
    p, g = _normalise(probe_emb), _normalise(gallery_emb)
    if p.shape != g.shape or p.shape[0] != lab.size:
        raise ValueError(f"cross_image_identity: embeddings {p.shape} / {g.shape} for "
                         f"{lab.size} labels")
    gal, probes = gallery_split(lab)
    n_ids = int(np.unique(lab[probes]).size)
    base = {"n": int(probes.size), "n_gallery": int(gal.size), "n_identities": n_ids}
    if n_ids < MIN_IDENTITIES or gal.size < 2:
        return {**base, "suppressed": f"needs >= {MIN_IDENTITIES} identities with >= 2 images, "
                                      f"has {n_ids}"}
    sim = p[probes] @ g[gal].T                                  # (probes, gallery)
    plab, glab = lab[probes], lab[gal]
    same = plab[:, None] == glab[None, :]
    groups = plab

    def rank1(idx: np.ndarray) -> float:
        return float(same[idx, sim[idx].argmax(1)].mean())

    def auc(idx: np.ndarray) -> float:
        return roc_auc(sim[idx].ravel(), same[idx].ravel())

    def gen_cos(idx: np.ndarray) -> float:
        return float(sim[idx][same[idx]].mean())

    def tar(far: float):
        def fn(idx: np.ndarray) -> float:
            s, y = sim[idx].ravel(), same[idx].ravel()
            return tar_at_far(s, y, far)["tar"]
        return fn

    all_idx = np.arange(probes.size)
    out = {**base, "chance": {"rank1": 1.0 / gal.size, "auc": 0.5, "accuracy": 0.5},
           "notes": {}}
    kw = dict(n_boot=n_boot, seed=seed)
    for key, fn in (("rank1", rank1), ("auc", auc), ("genuine_cos", gen_cos)):
        out[key] = fn(all_idx)
        out[f"{key}_ci"] = bootstrap_ci(fn, groups, **kw)
    out["impostor_cos"] = float(sim[~same].mean())
    n_imp = int((~same).sum())
    out["n_impostor"] = n_imp
    for far in fars:
        key = f"tar@{far:g}"
        out["chance"][key] = far
        if n_imp < needed_pairs(far):
            out[key] = None
            out["notes"][key] = f"n/a (needs >= {needed_pairs(far)} pairs)"
            continue
        out[key] = tar(far)(all_idx)
        out[f"{key}_ci"] = bootstrap_ci(tar(far), groups, n_boot=min(n_boot, 200), seed=seed)
    out.update(_balanced_accuracy(sim, same, plab, seed, n_boot))
    return out


def _balanced_accuracy(sim: np.ndarray, same: np.ndarray, plab: np.ndarray, seed: int,
                       n_boot: int) -> dict:
    """10-fold accuracy on one genuine + one seeded impostor pair per probe, folds by identity."""
    rng = np.random.default_rng(seed + 1)
    rows = np.arange(sim.shape[0])
    gen_col = same.argmax(1)
    imp_col = np.array([rng.choice(np.flatnonzero(~same[i])) for i in rows])
    scores = np.concatenate([sim[rows, gen_col], sim[rows, imp_col]])
    y = np.concatenate([np.ones(rows.size, bool), np.zeros(rows.size, bool)])
    ids = np.unique(plab)
    n_folds = min(10, ids.size)
    fold_of_id = dict(zip(ids[rng.permutation(ids.size)], np.arange(ids.size) % n_folds))
    folds = np.array([fold_of_id[v] for v in plab])
    folds = np.concatenate([folds, folds])
    m = verification_metrics(scores, y, n_folds=n_folds, folds=folds)
    # per-pair correctness under each fold's threshold, for the interval over identities
    thr = dict(zip(np.unique(folds), m["fold_thresholds"]))
    correct = np.array([(s >= thr[f]) == t for s, t, f in zip(scores, y, folds)], np.float64)
    groups = np.concatenate([plab, plab])
    ci = bootstrap_ci(lambda idx: correct[idx].mean(), groups, n_boot=n_boot, seed=seed)
    return {"accuracy": m["accuracy"], "accuracy_ci": ci, "accuracy_folds": int(n_folds)}
