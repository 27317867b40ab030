"""Training objectives of the two MinusFace stages (docs/method.md, "Stage 1" and "Stage 2").

Stage 1: L = alpha * L1(X, 2 d(g(e(X))) - 1) + beta * ArcFace(f(r)), alpha = 5, beta = 1, with
gradients of the recognition loss reaching g through r.  Stage 2: ArcFace(f_p(X_p)) with g frozen
(no gradients, eval mode): X_p is produced under no_grad, exactly as a client would ship it.
The unprotected twin is ArcFace(f(X)) on raw faces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .frontend import MinusFaceFrontend

ALPHA_GEN = 5.0
BETA_FR = 1.0


def _parts(logits: torch.Tensor, labels: torch.Tensor, **losses: torch.Tensor) -> dict[str, float]:
    """Detached scalars for logging."""
    out = {k: float(v.detach()) for k, v in losses.items()}
    out["train_acc"] = float((logits.detach().argmax(1) == labels).float().mean())
    return out


def recognition_loss(recognizer: nn.Module, head: nn.Module, inputs: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Margin-softmax cross-entropy; returns (loss, logits)."""
    logits = head(recognizer(inputs), labels)
    return F.cross_entropy(logits, labels), logits


def stage1_loss(frontend: MinusFaceFrontend, recognizer: nn.Module, head: nn.Module,
                faces: torch.Tensor, labels: torch.Tensor, alpha: float = ALPHA_GEN,
                beta: float = BETA_FR) -> tuple[torch.Tensor, dict[str, float]]:
    """Co-train g and f on the unshuffled residue r."""
    out = frontend.stage1(faces)
    gen = F.l1_loss(out.regenerated.float(), faces.float())
    fr, logits = recognition_loss(recognizer, head, out.residue, labels)
    loss = alpha * gen + beta * fr
    return loss, _parts(loss=loss, loss_gen=gen, loss_fr=fr, logits=logits, labels=labels)


def stage2_loss(frontend: MinusFaceFrontend, recognizer: nn.Module, head: nn.Module,
                faces: torch.Tensor, labels: torch.Tensor,
                rng: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Train f_p on protected images; g contributes nothing to the graph."""
    protected = frontend.protect(faces, rng=rng, register=False)   # never shipped
    fr, logits = recognition_loss(recognizer, head, protected, labels)
    return fr, _parts(loss=fr, loss_fr=fr, logits=logits, labels=labels)


def baseline_loss(recognizer: nn.Module, head: nn.Module, faces: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The unprotected ArcFace twin on raw faces."""
    fr, logits = recognition_loss(recognizer, head, faces, labels)
    return fr, _parts(loss=fr, loss_fr=fr, logits=logits, labels=labels)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and requires_grad=False: how g is held in stage 2 and at deployment."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
