"""Update leakage: gradient inversion of one client's shipped weight update (attack 5).

Attacker: the server, or an eavesdropper on the client -> server link, that sees the update a
client ships after one local SGD step on a small batch of B images (B = 1..4).  It knows the
method, the model architecture and the weights it sent, the learning rate and weight decay, but
not the per-image permutations theta and not the client's private margin head.

Attack (Geiping et al., "Inverting Gradients - How easy is it to break privacy in federated
learning?", NeurIPS 2020): recover the gradient from the update (g = -(w_after - w_before) / lr
- wd * w_before, exact for the first SGD step, where the momentum buffer equals the gradient),
then optimise B dummy images u in [0, 1] so that the gradient they produce matches it:

    min_u  1 - cos(grad_w L(f(u), y), g)  +  tv * TV(u)

with Adam on u (optionally on the sign of the gradient, as in Geiping et al.), the learning rate
divided by 10 at 3/8, 5/8 and 7/8 of the steps, and u projected onto [0, 1] after every step.
TV is the anisotropic total variation (mean absolute difference of neighbouring pixels).
Dummies start from mid-grey plus a little seeded noise.  No restarts.

Honest modelling, stated in every report:

* OPTIMISTIC attacker (an upper bound on this attack): it is given the client's margin head and
  the true labels of the batch (both private in minusfed: only the recognizer is shared), and the
  client step is simulated with BatchNorm on running statistics and dropout off (the setting of
  Geiping et al.'s experiments; a real client trains with batch statistics and random dropout
  masks, which this does not model).  The head is a freshly initialised ArcFace head of the
  preset (the client's own in the Flower action is not used), identical for client and attacker.
* What the recognizer sees is what gradient inversion can at best recover.  Without protection
  (row "none") that is the face itself.  In MinusFace stage 2 the recognizer f_p is trained on
  X_p = d(s(r; theta)), so the update is a function of X_p only: inverted images are compared
  with the raw faces AND with X_p, and additionally pushed through the attacker's pixel inverter
  for X_p (when one is given) to score the full chain update -> X_p -> face.
* Two recognizers are attacked: the deployed architecture (the preset's IR backbone, fresh or the
  run's weights) and, optionally, a deliberately leaky PROBE (4x average pooling + one linear
  layer, whose update reveals its pooled input almost directly): the probe shows what an attack
  that fully succeeds at recovering the recognizer's input gets, which for MinusFace is X_p.

At a CPU budget (tens to hundreds of steps) gradient inversion of an IR backbone at 112 px does
not converge (Geiping et al. run 24,000 steps); the report therefore also shows a
constant mid-grey guess and a random image, and says whether the unprotected attack beat them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .metrics import identity_match_embeddings, pixel_metrics

ToModelInput = Callable[[torch.Tensor], torch.Tensor]
MIN_GI_IDENTITY = 8          # batch images below which identity columns are suppressed
LR_MILESTONES = (3 / 8, 5 / 8, 7 / 8)        # Geiping et al.: LR / 10 at these fractions


def faces_input(images01: torch.Tensor) -> torch.Tensor:
    """Unprotected recognizer input: faces in [0, 1] -> the model convention [-1, 1]."""
    return images01 * 2.0 - 1.0


def protected_input(images01: torch.Tensor) -> torch.Tensor:
    """Stage-2 recognizer input: X_p in [0, 1] is fed as is (docs/method.md: X_p is not re-mapped)."""
    return images01


class LinearProbe(nn.Module):
    """A deliberately leaky recognizer: 4x average pooling, then one linear layer to 512-d.

    Its weight gradient for one image is delta (x) pool(x): the update reveals the pooled input.
    It stands for "gradient inversion that succeeds" and is never trained or deployed."""

    def __init__(self, embedding_size: int = 512, pool: int = 4, side: int = 112) -> None:
        super().__init__()
        self.pool = pool
        self.fc = nn.Linear(3 * (side // pool) ** 2, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.avg_pool2d(x, self.pool).flatten(1))


# --------------------------------------------------------------------------- the client's step

def shared_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _set_mode(model: nn.Module, head: nn.Module, train_mode: bool) -> None:
    model.train(train_mode)
    head.train(train_mode)


def client_update(model: nn.Module, head: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                  lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                  train_mode: bool = False, local_steps: int = 1) -> dict[str, torch.Tensor]:
    """The shipped update w_after - w_before of `local_steps` SGD steps (momentum, weight decay)
    of a copy of `model` (+ `head`) on the model inputs; the caller's modules are not touched."""
    model, head = copy.deepcopy(model), copy.deepcopy(head)
    _set_mode(model, head, train_mode)
    params = shared_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(list(params.values()) + list(head.parameters()), lr=lr,
                          momentum=momentum, weight_decay=weight_decay)
    for _ in range(local_steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(model(inputs), labels), labels).backward()
        opt.step()
    return {n: (p.detach() - before[n]) for n, p in params.items()}


def simulate_update(model: nn.Module, head: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                    lr: float, weight_decay: float, momentum: float, local_steps: int,
                    create_graph: bool = True) -> dict[str, torch.Tensor]:
    """`client_update` written out functionally (torch.func.functional_call), differentiable
    with respect to `inputs`: the multi-step attacker unrolls the client's local steps."""
    from torch.func import functional_call

    pm = {n: p.detach().requires_grad_(True) for n, p in shared_parameters(model).items()}
    ph = {n: p.detach().requires_grad_(True) for n, p in head.named_parameters()}
    start = dict(pm)
    bufs: dict[str, torch.Tensor] = {}
    for _ in range(local_steps):
        emb = functional_call(model, pm, (inputs,))
        loss = F.cross_entropy(functional_call(head, ph, (emb, labels)), labels)
        names = list(pm) + [f"head.{n}" for n in ph]
        values = list(pm.values()) + list(ph.values())
        grads = torch.autograd.grad(loss, values, create_graph=create_graph)
        new = {}
        for name, value, grad in zip(names, values, grads):
            d = grad + weight_decay * value
            bufs[name] = d if name not in bufs else momentum * bufs[name] + d   # torch.optim.SGD
            new[name] = value - lr * bufs[name]
        pm = {n: new[n] for n in pm}
        ph = {n: new[f"head.{n}"] for n in ph}
    return {n: pm[n] - start[n] for n in pm}


def gradient_from_update(update: dict[str, torch.Tensor], weights_before: dict[str, torch.Tensor],
                         lr: float, weight_decay: float = 0.0) -> dict[str, torch.Tensor]:
    """The client's gradient from its first-step SGD update (momentum buffer == gradient)."""
    return {n: -u / lr - weight_decay * weights_before[n] for n, u in update.items()}


# --------------------------------------------------------------------------- the inversion

def total_variation(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
            + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean())


def _cosine_distance(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor],
                     target_norm: torch.Tensor) -> torch.Tensor:
    dot = sum((a * b).sum() for a, b in zip(grads, target))
    norm = torch.sqrt(sum(a.pow(2).sum() for a in grads) + 1e-20)
    return 1.0 - dot / (norm * target_norm + 1e-20)


@dataclass
class Inversion:
    images: torch.Tensor                  # (B, 3, 112, 112) in [0, 1]
    gradient_cosine: float                # cos(grad of the reconstruction, observed gradient)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _match(distance: Callable[[torch.Tensor, bool], torch.Tensor], num_images: int, side: int,
           *, steps: int, lr: float, tv: float, signed: bool, seed: int, progress: bool,
           desc: str) -> Inversion:
    """The optimisation both attacks share: B dummy images from a grey start, Adam(lr) on the
    (signed) gradient of distance + tv * TV, LR / 10 at the milestones, projected onto [0, 1].
    `distance(images, create_graph)` is 1 - cos between the observed and simulated update."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    dummy = (0.5 + 0.05 * torch.randn(num_images, 3, side, side, generator=gen)).clamp(0, 1)
    dummy.requires_grad_(True)
    opt = torch.optim.Adam([dummy], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=sorted({max(1, int(f * steps)) for f in LR_MILESTONES}), gamma=0.1)
    losses: list[float] = []
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        rec = distance(dummy, True)
        (dummy_grad,) = torch.autograd.grad(rec + tv * total_variation(dummy), [dummy])
        dummy.grad = dummy_grad.sign() if signed else dummy_grad
        opt.step()
        sched.step()
        with torch.no_grad():
            dummy.clamp_(0.0, 1.0)
        losses.append(float(rec.detach()))
        bar.update(1)
        bar.set_postfix(grad_cos_dist=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    images = dummy.detach()
    cos = 1.0 - float(distance(images, False).detach())
    return Inversion(images=images, gradient_cosine=cos, losses=losses,
                     seconds=time.perf_counter() - t0)


def invert_gradient(model: nn.Module, head: nn.Module, labels: torch.Tensor,
                    target_grad: dict[str, torch.Tensor], to_model_input: ToModelInput,
                    num_images: int, *, steps: int = 48, lr: float = 0.05, tv: float = 0.01,
                    signed: bool = True, train_mode: bool = False, seed: int = 0,
                    side: int = 112, progress: bool = False, desc: str = "gradient inversion"
                    ) -> Inversion:
    """Geiping et al.'s reconstruction: B dummy images whose gradient matches `target_grad`."""
    model, head = copy.deepcopy(model), copy.deepcopy(head)
    _set_mode(model, head, train_mode)
    params = shared_parameters(model)
    names = [n for n in params if n in target_grad]
    if not names:
        raise ValueError("invert_gradient: the observed update shares no parameter with the model")
    plist = [params[n] for n in names]
    target = [target_grad[n].detach().float() for n in names]
    target_norm = torch.sqrt(sum(t.pow(2).sum() for t in target))

    def distance(images: torch.Tensor, create_graph: bool) -> torch.Tensor:
        loss_fr = F.cross_entropy(head(model(to_model_input(images)), labels), labels)
        grads = torch.autograd.grad(loss_fr, plist, create_graph=create_graph)
        return _cosine_distance(grads, target, target_norm)

    return _match(distance, num_images, side, steps=steps, lr=lr, tv=tv, signed=signed,
                  seed=seed, progress=progress, desc=desc)


def invert_update(model: nn.Module, head: nn.Module, labels: torch.Tensor,
                  observed: dict[str, torch.Tensor], to_model_input: ToModelInput,
                  num_images: int, *, local_steps: int, client_lr: float, weight_decay: float,
                  momentum: float = 0.9, steps: int = 48, lr: float = 0.05, tv: float = 0.01,
                  signed: bool = True, seed: int = 0, side: int = 112, progress: bool = False,
                  desc: str = "multi-step inversion") -> Inversion:
    """Geiping et al.'s multi-step variant: dummy images whose simulated `local_steps`-step
    update (the client's optimiser, unrolled) matches the observed update in cosine."""
    model, head = copy.deepcopy(model), copy.deepcopy(head)
    _set_mode(model, head, False)
    names = [n for n in shared_parameters(model) if n in observed]
    if not names:
        raise ValueError("invert_update: the observed update shares no parameter with the model")
    target = [observed[n].detach().float() for n in names]
    target_norm = torch.sqrt(sum(t.pow(2).sum() for t in target))

    def distance(images: torch.Tensor, create_graph: bool) -> torch.Tensor:
        sim = simulate_update(model, head, to_model_input(images), labels, client_lr,
                              weight_decay, momentum, local_steps, create_graph=create_graph)
        return _cosine_distance([sim[n] for n in names], target, target_norm)

    return _match(distance, num_images, side, steps=steps, lr=lr, tv=tv, signed=signed,
                  seed=seed, progress=progress, desc=desc)


def attack_local_steps(model: nn.Module, head: nn.Module, inputs01: torch.Tensor,
                       labels: torch.Tensor, to_model_input: ToModelInput, *, local_steps: int,
                       client_lr: float = 0.01, weight_decay: float = 5e-4,
                       **invert_kw) -> Inversion:
    """`local_steps` client steps on `inputs01`, then the multi-step attack on the update."""
    update = client_update(model, head, to_model_input(inputs01), labels, client_lr, weight_decay,
                           local_steps=local_steps)
    return invert_update(model, head, labels, update, to_model_input, inputs01.shape[0],
                         local_steps=local_steps, client_lr=client_lr,
                         weight_decay=weight_decay, side=inputs01.shape[-1], **invert_kw)


def attack_update(model: nn.Module, head: nn.Module, inputs01: torch.Tensor,
                  labels: torch.Tensor, to_model_input: ToModelInput, *, client_lr: float = 0.01,
                  weight_decay: float = 5e-4, train_mode: bool = False, **invert_kw) -> Inversion:
    """One client step on `inputs01` (what the recognizer sees, in [0, 1]), then the attack on
    the shipped update; the attacker knows `model`'s weights before the step, lr and wd.

    ``train_mode=True`` runs client and attacker with batch statistics and dropout, as a real
    client trains (needs B >= 2); the dropout masks are then NOT shared with the attacker."""
    update = client_update(model, head, to_model_input(inputs01), labels, client_lr, weight_decay,
                           train_mode=train_mode)
    before = {n: p.detach() for n, p in shared_parameters(model).items()}
    grad = gradient_from_update(update, before, client_lr, weight_decay)
    return invert_gradient(model, head, labels, grad, to_model_input, inputs01.shape[0],
                           train_mode=train_mode, side=inputs01.shape[-1], **invert_kw)


# --------------------------------------------------------------------------- evaluation

def pick_batch(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of `size` images, distinct identities first (labels then tell images apart)."""
    labels = np.asarray(labels).ravel()
    order = np.random.default_rng(seed).permutation(len(labels))
    first, rest, seen = [], [], set()
    for i in order:
        (rest if labels[i] in seen else first).append(int(i))
        seen.add(labels[i])
    return np.array((first + rest)[:size], dtype=np.int64)


def _identity(judge_embed: Callable[[torch.Tensor], torch.Tensor] | None, recovered: torch.Tensor,
              judge_orig: torch.Tensor | None, labels: np.ndarray) -> dict:
    """Identity metrics of a reconstruction, only where the batch can support them: with B
    images of B identities rank-1's chance is 1 / B, so B <= 4 says nothing (none computed)."""
    if judge_embed is None or judge_orig is None or recovered.shape[0] < MIN_GI_IDENTITY \
            or len(np.unique(labels)) < MIN_GI_IDENTITY:
        return {}
    return identity_match_embeddings(judge_embed(recovered), judge_orig, labels)


def evaluate_gradient_inversion(faces: torch.Tensor, labels: Sequence[int] | np.ndarray,
                                protect_fn: Callable[[torch.Tensor], torch.Tensor],
                                recognizer: nn.Module, head: nn.Module, *,
                                images: int = 2, steps: int = 48, lr: float = 0.05,
                                tv: float = 0.01, signed: bool = True, probe_steps: int = 200,
                                client_lr: float = 0.01, weight_decay: float = 5e-4,
                                judge_embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                inverter: nn.Module | None = None, seed: int = 0,
                                progress: bool = False, local_steps: int = 0) -> dict:
    """Attack a no-protection update and a MinusFace stage-2 update of the same batch.

    ``probe_steps``: steps of the attack on the leaky `LinearProbe` (0 = not run).
    ``local_steps`` >= 2 adds rows "gi-steps{K}/...": the client takes K local steps on the batch
    (momentum, weight decay) and the attacker unrolls them (`invert_update`), `steps` steps.
    ``faces``: the client's faces (N, 3, 112, 112) in [-1, 1]; a batch of `images` of them (one
    per identity where possible) is used.  ``protect_fn`` maps those faces to X_p in [0, 1]
    (fresh CSPRNG permutations).  ``recognizer``/``head``: 3-channel recognizer and margin head
    whose weights both clients start from (the same for both rows, so only the input differs).
    Returns {"metrics": rows, "images": {...}, "attacker": {...}, "batch_labels", "seconds"}.
    """
    t0 = time.perf_counter()
    labels = np.asarray(labels).ravel()
    idx = pick_batch(labels, images, seed)
    batch = faces[torch.from_numpy(idx)].float()
    blabels = labels[idx]
    _, y = np.unique(blabels, return_inverse=True)            # the optimistic attacker's labels
    y = torch.as_tensor(y, dtype=torch.long)
    if head.weight.shape[1] < int(y.max()) + 1:
        raise ValueError(f"head has {head.weight.shape[1]} classes, batch needs {int(y.max()) + 1}")
    originals = (batch * 0.5 + 0.5).clamp(0, 1)
    with torch.no_grad():
        x_p = protect_fn(batch).float()
    judge_orig = judge_embed(originals) if judge_embed is not None else None
    kw = dict(lr=lr, tv=tv, signed=signed, seed=seed, client_lr=client_lr,
              weight_decay=weight_decay, progress=progress)
    rows: dict[str, dict] = {}
    out_images: dict[str, torch.Tensor] = {"original": originals, "X_p": x_p}

    def row(name: str, rec: torch.Tensor, ref: torch.Tensor, extra: dict, identity: bool = True):
        m = pixel_metrics(rec, ref)
        if identity:
            m.update(_identity(judge_embed, rec, judge_orig, blabels))
        m.update(extra)
        rows[name] = m

    models = [("gi", recognizer, head, steps)]
    if probe_steps > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 17)
            probe_model = LinearProbe(embedding_size=head.weight.shape[0])
        models.append(("gi-probe", probe_model, copy.deepcopy(head), probe_steps))
    for prefix, model, h, n_steps in models:
        kw["steps"] = n_steps
        raw = attack_update(model, h, originals, y, faces_input, desc=f"{prefix} [none]", **kw)
        row(f"{prefix}/none", raw.images, originals,
            {"grad_cos": raw.gradient_cosine, "seconds": raw.seconds})
        mf = attack_update(model, h, x_p, y, protected_input, desc=f"{prefix} [minusface]", **kw)
        extra = {"grad_cos": mf.gradient_cosine, "seconds": mf.seconds}
        row(f"{prefix}/minusface", mf.images, originals, extra)
        row(f"{prefix}/minusface vs X_p", mf.images, x_p, extra, identity=False)
        out_images[f"{prefix}/none"] = raw.images
        out_images[f"{prefix}/minusface"] = mf.images
        if inverter is not None:
            from .attacks import recover
            chained = recover(inverter, mf.images)
            row(f"{prefix}/minusface + inverter", chained, originals, {})
            out_images[f"{prefix}/minusface + inverter"] = chained
    if local_steps >= 2:
        prefix = f"gi-steps{local_steps}"
        multi = dict(lr=lr, tv=tv, signed=signed, seed=seed, client_lr=client_lr,
                     weight_decay=weight_decay, progress=progress, steps=steps,
                     local_steps=local_steps)
        raw = attack_local_steps(recognizer, head, originals, y, faces_input,
                                 desc=f"{prefix} [none]", **multi)
        row(f"{prefix}/none", raw.images, originals,
            {"grad_cos": raw.gradient_cosine, "seconds": raw.seconds})
        mf = attack_local_steps(recognizer, head, x_p, y, protected_input,
                                desc=f"{prefix} [minusface]", **multi)
        extra = {"grad_cos": mf.gradient_cosine, "seconds": mf.seconds}
        row(f"{prefix}/minusface", mf.images, originals, extra)
        row(f"{prefix}/minusface vs X_p", mf.images, x_p, extra, identity=False)
        out_images[f"{prefix}/none"] = raw.images
        out_images[f"{prefix}/minusface"] = mf.images
    gen = torch.Generator().manual_seed(seed + 3)
    row("reference: grey guess", torch.full_like(originals, 0.5), originals, {})
    row("reference: grey guess vs X_p", torch.full_like(x_p, 0.5), x_p, {}, identity=False)
    row("reference: random image", torch.rand(originals.shape, generator=gen), originals, {})
    return {"metrics": rows, "_images": out_images, "batch_size": int(len(idx)),
            "batch_identities": int(len(np.unique(blabels))), "seconds": time.perf_counter() - t0}


def describe_attacker(images: int, steps: int, lr: float, tv: float, signed: bool,
                      probe_steps: int, recognizer: str) -> dict:
    return {
        "threat_model": "server / eavesdropper sees ONE client update (one SGD step, momentum "
                        "0.9, on a batch of B images) and knows the method, the model and its "
                        "weights, lr and weight decay; not theta, not the private head",
        "optimistic": "upper bound: the attacker is GIVEN the client's margin head and the batch "
                      "labels; the client step uses BatchNorm running statistics, no dropout",
        "attack": f"Geiping et al. 2020: 1 - cos(gradients) + {tv:g} TV, Adam lr {lr:g} on "
                  f"{'signed ' if signed else ''}input gradients, LR / 10 at 3/8, 5/8, 7/8 of "
                  f"{steps} steps, images projected onto [0, 1], grey start, no restarts",
        "batch": f"B = {images} client images (distinct identities where possible)",
        "recognizer": recognizer,
        "probe": (f"also a leaky linear probe (4x avg-pool + linear, {probe_steps} steps): what "
                  "a successful inversion of the recognizer input gives") if probe_steps > 0
                 else "not run",
        "compared": "none: reconstruction vs raw faces; minusface: reconstruction of the stage-2 "
                    "update (recognizer input X_p) vs raw faces, vs X_p, and through the X_p "
                    "pixel inverter vs raw faces",
    }


GI_MARGIN_DB = 1.0        # a reconstruction must beat the grey guess by this much to count
GI_MATCHED_COS = 0.9      # gradient cosine above which the attack counts as having matched


def verdict(rows: dict[str, dict], prefix: str = "gi", margin: float = GI_MARGIN_DB,
            matched: float = GI_MATCHED_COS) -> str:
    """One sentence, never calling a failed attack protection.

    1. The unprotected attack must beat the grey guess by `margin` dB with matched gradients
       (cosine >= `matched`); else: no evidence either way.
    2. The MinusFace attack must recover what the recognizer saw, X_p, better than the grey guess
       against X_p by `margin` dB, with matched gradients; else: no evidence either way.
    3. Only then: leakage (reconstruction above the grey guess against the faces) or "the update
       reveals X_p, and no more of the face than X_p does".
    """
    def get(row: str, key: str = "psnr"):
        return rows.get(row, {}).get(key)

    grey, grey_xp = get("reference: grey guess"), get("reference: grey guess vs X_p")
    none, none_cos = get(f"{prefix}/none"), get(f"{prefix}/none", "grad_cos")
    mf, mf_xp = get(f"{prefix}/minusface"), get(f"{prefix}/minusface vs X_p")
    mf_cos = get(f"{prefix}/minusface", "grad_cos")
    if grey is None or none is None or mf_xp is None or grey_xp is None:
        return "not run"
    if none <= grey + margin or (none_cos or 0.0) < matched:
        return (f"{prefix}: no evidence either way: the attack did not recover even unprotected "
                f"faces ({none:.2f} dB vs grey {grey:.2f} dB, needs +{margin:g}; grad cos "
                f"{none_cos:.3f}, needs >= {matched:g}) at this budget")
    if mf_xp <= grey_xp + margin or (mf_cos or 0.0) < matched:
        return (f"{prefix}: no evidence either way: the unprotected attack works ({none:.2f} dB "
                f"vs grey {grey:.2f}), but from the MinusFace update it did not recover X_p, "
                f"the input the recognizer saw ({mf_xp:.2f} dB vs grey {grey_xp:.2f} dB against "
                f"X_p, grad cos {mf_cos:.3f}): a failed inversion, not protection")
    if mf > grey + margin:
        return (f"{prefix}: LEAKS: from the MinusFace update the attack recovers X_p ({mf_xp:.2f} "
                f"dB) and the face above the grey guess ({mf:.2f} vs {grey:.2f} dB)")
    return (f"{prefix}: the MinusFace update reveals X_p ({mf_xp:.2f} dB vs grey {grey_xp:.2f} "
            f"against X_p, grad cos {mf_cos:.3f}) but not the face beyond a grey guess "
            f"({mf:.2f} vs {grey:.2f} dB): its leakage is X_p's leakage (pixel rows above)")
