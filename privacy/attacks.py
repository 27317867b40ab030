"""Attacks on MinusFace protected images, and the views of the ablation baselines.

Attacker (docs/method.md, "Attacker model"): a white-box eavesdropper on the client -> server
link.  It knows the method and the client's generator g (minusfed ships g to every client), can
run the pipeline on its own faces, but never sees the per-image permutations theta, r or the
client's faces.  It trains only on AUXILIARY faces whose identities are disjoint from the
evaluated client's.

* Pixel recovery (attacks 1/2): a 3 -> 3 U-Net inverter, L1 between inverter(view) and the face,
  Adam lr 1e-3 (the paper's attacker), trained on (view, face) pairs the attacker makes itself.
* Linkage (attack 3): the global recognizer f_p itself, with zero training (`privacy.report`),
  a recognizer "student" trained from scratch with a cosine loss to map X_p to the judge's
  embedding of the original face (FaceLinkGen's loss), and a student that starts from a
  pretrained recognizer (the judge) behind a prepended conv (FaceLinkGen's recipe, our scale).
* Fixed permutation (attack 4): an inverter trained on views made with ONE known theta, then
  tested on that theta and on fresh CSPRNG permutations.
* Gradient inversion of shipped updates (attack 5): `privacy.gradient_inversion`.

Faces are float tensors (N, 3, 112, 112) in [-1, 1] (the model convention) or uint8 NHWC arrays;
views and recovered images are in [0, 1].
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from minusface.backbones import build_backbone
from minusface.dct import CHANNELS, decode, encode
from minusface.frontend import MinusFaceFrontend
from minusface.generator import UNetGenerator
from minusface.images import to_signed
from minusface.shuffle import shuffle_channels

VIEW_KINDS = ("minusface", "none", "no-shuffle", "no-subtraction", "fixed-permutation")
ViewsFn = Callable[[torch.Tensor], torch.Tensor]


def as_faces(faces: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 NHWC array or float tensor in [-1, 1] -> float32 tensor (N, 3, 112, 112) in [-1, 1]."""
    if isinstance(faces, np.ndarray):
        return to_signed(faces)
    if faces.dim() != 4 or faces.shape[1] != 3:
        raise ValueError(f"expected faces (N, 3, H, W), got {tuple(faces.shape)}")
    return faces.float()


def to_unit(faces: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (faces * 0.5 + 0.5).clamp(0.0, 1.0)


def random_permutation(channels: int = CHANNELS, seed: int | None = None) -> torch.Tensor:
    """A permutation of the DCT channels: seeded (attack 4's known theta) or from the CSPRNG."""
    if seed is None:
        from minusface.shuffle import csprng_permutations
        return csprng_permutations(1, channels)[0]
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(channels, generator=g)


# --------------------------------------------------------------------------- views

def _check_permutation(permutation: torch.Tensor | None) -> torch.Tensor:
    if permutation is None:
        raise ValueError("make_views(kind='fixed-permutation') needs a permutation tensor")
    perm = torch.as_tensor(permutation, dtype=torch.long).flatten()
    if perm.numel() != CHANNELS or not torch.equal(perm.sort().values, torch.arange(CHANNELS)):
        raise ValueError(f"permutation must be a permutation of 0..{CHANNELS - 1}")
    return perm


@torch.no_grad()
def _views_chunk(frontend: MinusFaceFrontend | None, x: torch.Tensor, kind: str,
                 perm: torch.Tensor | None) -> torch.Tensor:
    if kind == "none":
        return to_unit(x)
    if kind == "no-subtraction":
        return decode(shuffle_channels(encode(x)))
    return views_from_residue(frontend.residue(x), kind, perm)


@torch.no_grad()
def views_from_residue(r: torch.Tensor, kind: str, permutation: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Views that depend on the residue r = e(X) - g(e(X)) only (to reuse one r for several)."""
    if kind == "no-shuffle":
        return decode(r)
    if kind == "fixed-permutation":
        return decode(r.index_select(1, _check_permutation(permutation).to(r.device)))
    if kind != "minusface":
        raise ValueError(f"view kind {kind!r} is not made from the residue")
    # "minusface": exactly MinusFaceFrontend.forward == what protect() computes (fresh CSPRNG
    # theta per image), minus the provenance registration: these views never leave the process.
    return decode(shuffle_channels(r))


def make_views(frontend: MinusFaceFrontend | None, faces: torch.Tensor | np.ndarray, kind: str,
               permutation: torch.Tensor | None = None, micro_batch: int = 8) -> torch.Tensor:
    """The image the attacker sees for each baseline, (N, 3, 112, 112) in [0, 1].

    minusface          X_p = d(s(e(X) - g(e(X)); theta)), fresh CSPRNG theta per image and call
    none               no protection: the face itself mapped to [0, 1]
    no-shuffle         subtraction without shuffling: d(r)
    no-subtraction     shuffling without subtraction: d(s(e(X); theta))
    fixed-permutation  X_p made with the one given `permutation` (192 channel indices) for all
    """
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view kind {kind!r}; valid: {', '.join(VIEW_KINDS)}")
    perm = _check_permutation(permutation) if kind == "fixed-permutation" else None
    if frontend is None and kind in ("minusface", "no-shuffle", "fixed-permutation"):
        raise ValueError(f"make_views(kind={kind!r}) needs the frontend (generator g)")
    x = as_faces(faces)
    if frontend is not None:
        x = x.to(next(frontend.generator.parameters()).device)
        frontend.eval()
    out = [_views_chunk(frontend, x[s:s + micro_batch], kind, perm)
           for s in range(0, x.shape[0], micro_batch)]
    return torch.cat(out).float() if out else x.new_zeros((0, 3, 112, 112))


def views_fn(frontend: MinusFaceFrontend | None, kind: str,
             permutation: torch.Tensor | None = None) -> ViewsFn:
    """`make_views` bound to a frontend and kind: faces in [-1, 1] -> views in [0, 1]."""
    return functools.partial(make_views, frontend, kind=kind, permutation=permutation)


# --------------------------------------------------------------------------- pixel inverter

class Inverter(nn.Module):
    """3 -> 3 U-Net (the generator's architecture with 3 channels) with a sigmoid output."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.unet = UNetGenerator(channels=3, width=width)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.unet(views * 2.0 - 1.0))


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    bs = max(1, min(batch_size, n))
    return [order[s:s + bs] for s in range(0, n - bs + 1, bs)]


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of n auxiliary faces: `fraction` held out (>= 2 images,
    at most 256), none when n < 6 (too few to spare)."""
    order = np.random.default_rng(seed + 101).permutation(n)
    k = 0 if n < 6 or fraction <= 0 else int(min(256, max(2, round(fraction * n))))
    return np.sort(order[k:]), np.sort(order[:k])


def _fit(model: nn.Module, views: ViewsFn, faces: torch.Tensor, targets: torch.Tensor,
         loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], *,
         epochs: int, batch_size: int, lr: float, seed: int, fresh_views: bool, progress: bool,
         desc: str, metric: str, min_batch: int = 1, holdout: float = 0.1,
         eval_every: int = 25, patience: int = 4,
         param_groups: list[dict] | None = None) -> nn.Module:
    """The attackers' shared loop: Adam(lr) on `loss_fn(model, views, targets)` over the
    auxiliary faces, fresh views per batch (or made once), seeded batches.

    A held-out part of the auxiliary faces (`holdout`, views made once) is scored every
    `eval_every` steps; training stops when that loss has not improved for `patience` checks or
    after `epochs` epochs (the step budget), and the best checkpoint is kept.  The curve is left
    on the model as ``model.training_curve`` (steps, train loss, held-out loss, why it stopped).
    `param_groups` (Adam's, each with its own lr) replace "every parameter at `lr`".
    Returns the model in eval mode."""
    train_idx, held_idx = holdout_split(len(faces), holdout, seed)
    held_views = views(faces[torch.from_numpy(held_idx)]) if held_idx.size else None
    held_targets = targets[torch.from_numpy(held_idx)] if held_idx.size else None
    opt = torch.optim.Adam(param_groups or model.parameters(), lr=lr)
    train_faces, train_targets = faces[torch.from_numpy(train_idx)], targets[torch.from_numpy(train_idx)]
    fixed = None if fresh_views else views(train_faces)
    rng = np.random.default_rng(seed)
    steps = [_batches(len(train_faces), batch_size, rng) for _ in range(epochs)]
    budget = sum(len(s) for s in steps)
    bar = tqdm(total=budget, desc=desc, unit="step", disable=not progress, leave=False)
    curve = {"step": [], "train_loss": [], "heldout_loss": [], "budget_steps": budget,
             "n_train": int(len(train_idx)), "n_heldout": int(held_idx.size), "metric": metric}
    best, best_state, since, step, run_loss = math.inf, None, 0, 0, []

    def check() -> bool:
        nonlocal best, best_state, since
        model.eval()
        with torch.no_grad():
            losses = [float(loss_fn(model, held_views[s:s + 64], held_targets[s:s + 64]))
                      * len(held_views[s:s + 64]) for s in range(0, len(held_views), 64)]
        model.train()
        h = sum(losses) / len(held_views)
        curve["step"].append(step)
        curve["train_loss"].append(float(np.mean(run_loss)) if run_loss else math.nan)
        curve["heldout_loss"].append(h)
        run_loss.clear()
        if h < best - 1e-5:
            best, since = h, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
        return since >= patience

    model.train()
    stopped = "step budget"
    for epoch_batches in steps:
        for idx in epoch_batches:
            if len(idx) < min_batch:
                continue
            idx_t = torch.from_numpy(idx)
            v = views(train_faces[idx_t]) if fixed is None else fixed[idx_t]
            loss = loss_fn(model, v, train_targets[idx_t])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            run_loss.append(loss.item())
            bar.update(1)
            bar.set_postfix({metric: f"{loss.item():.4f}"}, refresh=False)
            if held_views is not None and step % max(1, eval_every) == 0 and check():
                stopped = f"held-out loss did not improve for {patience} checks"
                break
        else:
            continue
        break
    if held_views is not None and (not curve["step"] or curve["step"][-1] != step):
        check()
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    curve.update({"steps": step, "stopped": stopped,
                  "best_heldout_loss": None if best == math.inf else best})
    model.training_curve = curve
    return model.eval()


def train_inverter(views: ViewsFn, aux_faces: torch.Tensor | np.ndarray, epochs: int,
                   batch_size: int, lr: float = 1e-3, width: int = 16, seed: int = 0,
                   fresh_views: bool = True, progress: bool = True,
                   desc: str = "inverter", **stopping) -> Inverter:
    """Train a U-Net inverter view -> face (in [0, 1]) with L1 and Adam(lr) on auxiliary faces.

    ``views`` maps faces in [-1, 1] to attacker-visible images (see `views_fn`).  With
    ``fresh_views`` the views of each batch are made anew every epoch (new permutations each time,
    as an attacker querying the pipeline would get); otherwise they are made once up front.
    ``stopping``: holdout / eval_every / patience of `_fit` (early stopping on held-out faces).
    Returns the model in eval mode (its loss curve in ``.training_curve``).
    """
    faces = as_faces(aux_faces)
    torch.manual_seed(seed)
    model = Inverter(width)
    return _fit(model, views, faces, to_unit(faces),
                lambda m, v, target: F.l1_loss(m(v), target),
                epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, fresh_views=fresh_views,
                progress=progress, desc=desc, metric="l1", **stopping)


class RecognizerFeatures(nn.Module):
    """A frozen recognizer's differentiable features of images in [0, 1]: the stem and the first
    stage (for a perceptual loss; IResNet only, else none) and the embedding (identity loss)."""

    def __init__(self, recognizer: nn.Module) -> None:
        super().__init__()
        self.net = recognizer.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self._taps: list[torch.Tensor] = []
        stem, body = getattr(recognizer, "input_layer", None), getattr(recognizer, "body", None)
        for module in ([stem, body[0]] if stem is not None and body is not None else []):
            module.register_forward_hook(lambda _m, _i, out: self._taps.append(out))

    def forward(self, images01: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        self._taps = []
        emb = self.net(images01 * 2.0 - 1.0)
        return self._taps, emb


def perceptual_identity_loss(features: RecognizerFeatures, perceptual: float, identity: float
                             ) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """L1 + `perceptual` x feature MSE + `identity` x (1 - cos of embeddings) between the
    reconstruction and the face, both seen through `features`."""
    def loss(model: nn.Module, views: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rec = model(views)
        taps_r, emb_r = features(rec)
        with torch.no_grad():
            taps_t, emb_t = features(target)
        value = F.l1_loss(rec, target)
        if taps_r:
            value = value + perceptual * sum(F.mse_loss(a, b) for a, b in zip(taps_r, taps_t)) / len(taps_r)
        return value + identity * (1.0 - F.cosine_similarity(emb_r, emb_t, dim=1)).mean()
    return loss


def train_perceptual_inverter(views: ViewsFn, aux_faces: torch.Tensor | np.ndarray,
                              recognizer: nn.Module, epochs: int, batch_size: int,
                              lr: float = 1e-3, width: int = 16, perceptual: float = 1.0,
                              identity: float = 1.0, seed: int = 0, fresh_views: bool = True,
                              progress: bool = True, **stopping) -> Inverter:
    """The second pixel attacker: `train_inverter`'s U-Net and data with a perceptual + identity
    loss through `recognizer` (an unprotected face recognizer the attacker holds)."""
    faces = as_faces(aux_faces)
    torch.manual_seed(seed)
    model = Inverter(width)
    features = RecognizerFeatures(recognizer)
    return _fit(model, views, faces, to_unit(faces),
                perceptual_identity_loss(features, perceptual, identity),
                epochs=epochs, batch_size=max(2, batch_size), lr=lr, seed=seed,
                fresh_views=fresh_views, progress=progress, desc="inverter [perceptual+identity]",
                metric="l1+perc+id", min_batch=1, **stopping)


@torch.no_grad()
def recover(inverter: nn.Module, views: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """The inverter's faces (N, 3, 112, 112) in [0, 1] for attacker views in [0, 1]."""
    inverter.eval()
    out = [inverter(views[s:s + batch_size]) for s in range(0, views.shape[0], batch_size)]
    return torch.cat(out) if out else views.new_zeros(views.shape)


# --------------------------------------------------------------------------- linkage student

def judge_embed_fn(
    judge: nn.Module, flip: bool = True, batch_size: int = 64,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Embedding function of a recognizer trained on faces in [-1, 1], taking images in [0, 1]."""
    from minusface.eval import embed

    def fn(images01: torch.Tensor) -> torch.Tensor:
        return embed(judge, images01 * 2.0 - 1.0, flip=flip, batch_size=batch_size)
    return fn


def train_linkage_student(views: ViewsFn, aux_faces: torch.Tensor | np.ndarray,
                          judge_embed: Callable[[torch.Tensor], torch.Tensor], epochs: int,
                          batch_size: int, lr: float = 1e-3, backbone: str = "ir18",
                          width: int | None = 16, seed: int = 0, fresh_views: bool = True,
                          progress: bool = True, **stopping) -> nn.Module:
    """Linkage student trained FROM SCRATCH: a recognizer on X_p trained to output the judge's
    embedding of the original face (loss 1 - cos), Adam(lr), on auxiliary faces.  (FaceLinkGen
    distils a pretrained recognizer on ~90K faces; this shares only its loss.)  Returns it in
    eval mode."""
    faces = as_faces(aux_faces)
    targets = F.normalize(judge_embed(to_unit(faces)).float(), dim=1)
    torch.manual_seed(seed)
    student = build_backbone(backbone, in_channels=3, width=width,
                             embedding_size=targets.shape[1])
    return _fit(student, views, faces, targets,
                lambda m, v, target: (1.0 - F.cosine_similarity(m(v * 2.0 - 1.0), target,
                                                                dim=1)).mean(),
                epochs=epochs, batch_size=max(2, batch_size),   # BatchNorm needs two samples
                lr=lr, seed=seed, fresh_views=fresh_views, progress=progress,
                desc="linkage student", metric="cos_loss", min_batch=2, **stopping)


class AdaptedRecognizer(nn.Module):
    """A pretrained recognizer with a learnable 1x1 conv in front (FaceLinkGen's prepended
    layer), which starts as the identity map: at step 0 the student IS the pretrained model."""

    def __init__(self, recognizer: nn.Module) -> None:
        super().__init__()
        self.adapter = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.adapter.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.adapter.bias.zero_()
        self.recognizer = recognizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.recognizer(self.adapter(x))


PRETRAINED_BODY_LR_RATIO = 0.1   # the pretrained body is fine-tuned, the adapter trained


def train_pretrained_student(views: ViewsFn, aux_faces: torch.Tensor | np.ndarray,
                             pretrained: nn.Module,
                             judge_embed: Callable[[torch.Tensor], torch.Tensor], epochs: int,
                             batch_size: int, lr: float = 1e-3, seed: int = 0,
                             fresh_views: bool = True, progress: bool = True,
                             **stopping) -> nn.Module:
    """Linkage student that STARTS FROM A PRETRAINED face recognizer (FaceLinkGen's recipe at
    our scale): a copy of `pretrained` (a recognizer of unprotected faces in [-1, 1], e.g. the
    judge, trained on identities disjoint from the client's) behind an identity-initialised 1x1
    conv, fine-tuned on X_p with the cosine loss to the judge's embedding of the original face;
    the adapter at `lr`, the body at lr x PRETRAINED_BODY_LR_RATIO.  Returns it in eval mode."""
    import copy

    faces = as_faces(aux_faces)
    targets = F.normalize(judge_embed(to_unit(faces)).float(), dim=1)
    torch.manual_seed(seed)
    # a trainable copy (the judge is frozen) in NCHW: a judge trained under the CPU policy's
    # channels_last plan keeps channels_last weights, and training that copy on NCHW input
    # aborted the process in torch 2.13's CPU backward ("double free or corruption")
    body = copy.deepcopy(pretrained).to(memory_format=torch.contiguous_format)
    student = AdaptedRecognizer(body.requires_grad_(True))
    groups = [{"params": student.adapter.parameters(), "lr": lr},
              {"params": student.recognizer.parameters(), "lr": lr * PRETRAINED_BODY_LR_RATIO}]
    return _fit(student, views, faces, targets,
                lambda m, v, target: (1.0 - F.cosine_similarity(m(v * 2.0 - 1.0), target,
                                                                dim=1)).mean(),
                epochs=epochs, batch_size=max(2, batch_size), lr=lr, seed=seed,
                fresh_views=fresh_views, progress=progress, desc="linkage student (pretrained)",
                metric="cos_loss", min_batch=2, param_groups=groups, **stopping)


def student_embed_fn(student: nn.Module, flip: bool = False,
                     batch_size: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
    """Embeddings of the linkage student for views in [0, 1].  No flip TTA by default: a flipped
    X_p is not the X_p of the flipped face."""
    return judge_embed_fn(student, flip=flip, batch_size=batch_size)
