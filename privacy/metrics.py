"""Privacy metrics: pixel similarity of recovered faces and identity matching by a judge.

All image arguments are float tensors (N, 3, H, W) in [0, 1] (data_range = 1).

* `ssim`: pytorch_msssim SSIM (11x11 Gaussian window, sigma 1.5, K = (0.01, 0.03)), per image,
  then the mean over images.
* `ms_ssim`: pytorch_msssim MS-SSIM with **win_size = 7** and the standard five scale weights
  (0.0448, 0.2856, 0.3001, 0.2363, 0.1333).  pytorch_msssim needs the short side to exceed
  (win_size - 1) * 2**4 for five scales: 112 > 96 with a 7-pixel window, while the default
  11-pixel window would need more than 160 px.  Numbers are therefore not directly comparable
  with MS-SSIM computed on larger images with the default window.
* `psnr`: 10 log10(1 / MSE) computed PER IMAGE (MSE over C, H, W), then averaged over images
  (the mean of per-image PSNRs, not the PSNR of the pooled MSE).  The per-image MSE is floored
  at 1e-10, so identical images give 100 dB instead of infinity.
* `identity_match`: TAR at FAR 1e-2 / 1e-3 and rank-1 identification of recovered faces against
  the originals, scored by a judge recognizer (see its docstring).  The report uses the
  cross-image protocol of `privacy.identity` instead (different photos of a person).
* `bootstrap_ci` / `mean_ci`: percentile 95 % intervals with IDENTITIES as the resampling unit
  (images of one person are not independent, so resampling images would narrow the interval).
* LPIPS is not computed: the `lpips` package needs torchvision and backbone weights fetched at
  run time, which this project forbids; MS-SSIM and the identity metrics stand in for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as _ms_ssim
from pytorch_msssim import ssim as _ssim

from minusface.eval import tar_at_far

MS_SSIM_WIN = 7
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
PSNR_MSE_FLOOR = 1e-10
FARS: tuple[float, ...] = (1e-2, 1e-3)


def _pair(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"{name}: expected two (N, C, H, W) tensors of equal shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.detach().float().cpu(), b.detach().float().cpu()


def ssim_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _pair(a, b, "ssim")
    return _ssim(a, b, data_range=1.0, size_average=False)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM over images (data_range 1, 11x11 Gaussian window)."""
    return float(ssim_per_image(a, b).mean())


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean MS-SSIM over images; 7x7 window and 5 scales so that it works at 112 px."""
    a, b = _pair(a, b, "ms_ssim")
    return float(_ms_ssim(a, b, data_range=1.0, size_average=False, win_size=MS_SSIM_WIN,
                          weights=list(MS_SSIM_WEIGHTS)).mean())


def psnr_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _pair(a, b, "psnr")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1).clamp_min(PSNR_MSE_FLOOR)
    return 10.0 * torch.log10(1.0 / mse)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE_i) (peak 1; MSE floored at 1e-10 -> at most 100 dB)."""
    return float(psnr_per_image(a, b).mean())


def pixel_metrics(recovered: torch.Tensor, originals: torch.Tensor) -> dict[str, float]:
    return {"ssim": ssim(recovered, originals), "ms_ssim": ms_ssim(recovered, originals),
            "psnr": psnr(recovered, originals)}


def pixel_metrics_ci(recovered: torch.Tensor, originals: torch.Tensor,
                     groups: Sequence[int] | np.ndarray, *, n_boot: int = 1000,
                     seed: int = 0) -> dict:
    """`pixel_metrics` plus "ssim_ci" / "psnr_ci": 95 % intervals over identities (`groups`),
    and "n" (images); the per-image values stay under the private "_per_image" key."""
    s_img = ssim_per_image(recovered, originals).double().numpy()
    p_img = psnr_per_image(recovered, originals).numpy()
    out = pixel_metrics(recovered, originals)
    out.update({"ssim_ci": mean_ci(s_img, groups, n_boot=n_boot, seed=seed),
                "psnr_ci": mean_ci(p_img, groups, n_boot=n_boot, seed=seed),
                "n": int(len(s_img)), "_per_image": {"ssim": s_img, "psnr": p_img}})
    return out


def bootstrap_ci(stat: Callable[[np.ndarray], float], groups: Sequence | np.ndarray, *,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float] | None:
    """Percentile `level` interval of ``stat(idx)`` when identities are resampled.

    ``groups[i]`` is the identity of sample i (an image, or a pair grouped by its probe's
    identity).  Each replicate draws as many identities as there are, with replacement, and
    passes ``stat`` the indices of all their samples (an identity drawn twice appears twice).
    Non-finite replicates are dropped; None when there is one identity or no finite replicate.
    """
    g = np.asarray(groups).ravel()
    _, inv = np.unique(g, return_inverse=True)
    k = int(inv.max()) + 1 if g.size else 0
    if k < 2:
        return None
    members = [np.flatnonzero(inv == j) for j in range(k)]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([members[j] for j in rng.integers(0, k, k)])
        v = float(stat(idx))
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return None
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(vals), [a, 1.0 - a])
    return float(lo), float(hi)


def mean_ci(values: Sequence[float] | np.ndarray, groups: Sequence | np.ndarray, *,
            n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """95 % interval of the mean of per-sample ``values``, identities resampled."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size != np.asarray(groups).size:
        raise ValueError(f"mean_ci: {v.size} values for {np.asarray(groups).size} groups")
    return bootstrap_ci(lambda idx: v[idx].mean(), groups, n_boot=n_boot, seed=seed, level=level)


def identity_match_embeddings(probe: torch.Tensor, gallery: torch.Tensor,
                              labels: Sequence[int] | np.ndarray | None = None,
                              fars: Sequence[float] = FARS) -> dict:
    """Identity metrics from embeddings: probe_i (recovered / attacker's) vs gallery (originals).

    Genuine pairs: (probe_i, gallery_i).  Impostor pairs: (probe_i, gallery_j) for every i != j,
    restricted to labels[i] != labels[j] when labels are given (same person, other image: neither
    genuine nor impostor).  TAR at each FAR uses `minusface.eval.tar_at_far` (its `note` says when
    too few impostors resolve the FAR).  Rank-1: the nearest gallery entry of probe_i is gallery_i
    (no labels) or has probe_i's label (labels given: closed-set identification).
    """
    p = F.normalize(probe.detach().float().cpu(), dim=1)
    g = F.normalize(gallery.detach().float().cpu(), dim=1)
    if p.shape != g.shape or p.dim() != 2:
        raise ValueError(f"identity_match: expected (N, D) embeddings of equal shape, "
                         f"got {tuple(p.shape)} and {tuple(g.shape)}")
    n = p.shape[0]
    if n < 2:
        raise ValueError("identity_match needs at least two images")
    sim = (p.double() @ g.double().T).numpy()
    genuine = np.diag(sim).copy()
    off = ~np.eye(n, dtype=bool)
    if labels is not None:
        lab = np.asarray(labels).ravel()
        if lab.size != n:
            raise ValueError(f"identity_match: {lab.size} labels for {n} images")
        off &= lab[:, None] != lab[None, :]
    impostor = sim[off]
    if impostor.size == 0:
        raise ValueError("identity_match: no impostor pairs (all images of one identity?)")
    scores = np.concatenate([genuine, impostor])
    same = np.concatenate([np.ones(n, bool), np.zeros(impostor.size, bool)])
    nearest = sim.argmax(axis=1)
    if labels is None:
        rank1 = float((nearest == np.arange(n)).mean())
    else:
        rank1 = float((lab[nearest] == lab).mean())
    out: dict = {"rank1": rank1, "genuine_cos": float(genuine.mean()),
                 "impostor_cos": float(impostor.mean()), "n_genuine": int(n),
                 "n_impostor": int(impostor.size), "notes": {}}
    for far in fars:
        t = tar_at_far(scores, same, far)
        out[f"tar@{far:g}"] = t["tar"]
        if t["note"]:
            out["notes"][f"tar@{far:g}"] = t["note"]
    return out


def identity_match(judge_embed_fn: Callable[[torch.Tensor], torch.Tensor],
                   recovered: torch.Tensor, originals: torch.Tensor,
                   labels: Sequence[int] | np.ndarray | None = None,
                   fars: Sequence[float] = FARS) -> dict:
    """TAR at FAR 1e-2 / 1e-3 and rank-1 of recovered faces against the original faces.

    ``judge_embed_fn`` maps images in [0, 1] (N, 3, H, W) to embeddings (N, D); see
    `identity_match_embeddings` for the pairs and the rank-1 definition.
    """
    _pair(recovered, originals, "identity_match")
    return identity_match_embeddings(judge_embed_fn(recovered), judge_embed_fn(originals),
                                     labels, fars)
