"""Margin heads for L_fr (docs/method.md, "Margin heads"): ArcFace (s = 64, m = 0.5) and CosFace.

Both compare L2-normalised embeddings with L2-normalised class centres (a weight matrix of
shape (embedding_size, num_classes), init N(0, 0.01)) and return scaled logits with the margin
applied to the target class only.  The loss is plain `F.cross_entropy(logits, labels)` averaged
over the batch (the released code's model-parallel `DistCrossEntropy` is the same thing).
Eval uses `cosine`, which applies neither margin nor scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MarginHead(nn.Module):
    """Shared parts: class centres, cosine similarities and target-only margin."""

    def __init__(self, embedding_size: int, num_classes: int, s: float, m: float) -> None:
        super().__init__()
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.s, self.m = float(s), float(m)
        self.weight = nn.Parameter(torch.empty(embedding_size, num_classes))
        nn.init.normal_(self.weight, 0.0, 0.01)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos(theta) between each embedding and each class centre, (N, num_classes), fp32
        (normalising in half precision loses too much for a 64x scale)."""
        emb = F.normalize(embeddings.float(), dim=1)
        centres = F.normalize(self.weight.float(), dim=0)
        return (emb @ centres).clamp(-1.0, 1.0)

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        """Margin-adjusted cosine of the target class (before scaling)."""
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits (N, num_classes) for `F.cross_entropy(logits, labels)`."""
        cos = self.cosine(embeddings)
        idx = labels.long().view(-1, 1)
        cos = cos.scatter(1, idx, self.target_logit(cos.gather(1, idx)))  # out of place: autograd
        return cos * self.s

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"s={self.s}, m={self.m}")


class ArcFace(MarginHead):
    """Additive angular margin: target s*cos(theta + m), with the usual fallback
    s*(cos(theta) - m*sin(m)) when cos(theta) <= cos(pi - m), where theta + m would pass pi and
    cos(theta + m) would stop being monotonic in theta."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 eps: float = 1e-7) -> None:
        super().__init__(embedding_size, num_classes, s, m)
        self.eps = eps
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(m) * m

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        # clamp away from +-1 so d sqrt / d cos stays finite at theta = 0 or pi
        c = cos_t.clamp(-1.0 + self.eps, 1.0 - self.eps)
        sin_t = torch.sqrt(1.0 - c * c)
        phi = c * self.cos_m - sin_t * self.sin_m  # cos(theta + m)
        return torch.where(cos_t > self.th, phi, cos_t - self.mm)


class CosFace(MarginHead):
    """Additive cosine margin: target s*(cos(theta) - m)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0,
                 m: float = 0.35) -> None:
        super().__init__(embedding_size, num_classes, s, m)

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        return cos_t - self.m


_HEADS: dict[str, type[MarginHead]] = {"arcface": ArcFace, "cosface": CosFace}


def build_head(name: str, embedding_size: int, num_classes: int, **kw) -> MarginHead:
    """Head by name ("arcface", "cosface"); `kw` passes s, m (and eps for ArcFace)."""
    key = name.lower()
    if key not in _HEADS:
        raise ValueError(f"unknown head {name!r}; valid names: {', '.join(_HEADS)}")
    return _HEADS[key](embedding_size, num_classes, **kw)
