"""SGD with the paper's parameter groups and the one LR step plan (batches, epochs or rounds).

Groups: recognizer (+ head) weights with weight decay; BatchNorm parameters and biases without;
generator weights and biases in their own groups at `generator_lr_ratio` x the base LR (0.5 per
the paper).  The released code loses this ratio (wrong group name, and a schedule that overwrites
every group's LR); `torch.optim.lr_scheduler.MultiStepLR` multiplies each group's own LR, so the
ratio survives every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .backbones import split_decay_params


def param_groups(trainable: Iterable[nn.Module], lr: float, weight_decay: float,
                 generator: nn.Module | None = None,
                 generator_lr_ratio: float = 0.5) -> list[dict]:
    decay, no_decay = [], []
    for module in trainable:
        d, nd = split_decay_params(module)
        decay += [p for p in d if p.requires_grad]
        no_decay += [p for p in nd if p.requires_grad]
    groups = [{"name": "recognizer", "params": decay, "lr": lr, "weight_decay": weight_decay},
              {"name": "recognizer-no-decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}]
    if generator is not None:
        gd, gnd = split_decay_params(generator)
        glr = lr * generator_lr_ratio
        groups += [{"name": "generator", "params": gd, "lr": glr, "weight_decay": weight_decay},
                   {"name": "generator-no-decay", "params": gnd, "lr": glr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(trainable: Iterable[nn.Module], lr: float, weight_decay: float,
                    momentum: float = 0.9, generator: nn.Module | None = None,
                    generator_lr_ratio: float = 0.5) -> torch.optim.SGD:
    groups = param_groups(trainable, lr, weight_decay, generator, generator_lr_ratio)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _first_reaching(fraction: float, total: int) -> int | None:
    """The smallest count k in 0..total with k / total >= fraction (None: never reached)."""
    k = max(0, math.ceil(fraction * total))
    while k > 0 and (k - 1) / total >= fraction:       # ceil of a rounded product may overshoot
        k -= 1
    while k <= total and k / total < fraction:
        k += 1
    return k if k <= total else None


def lr_drops(milestones: Iterable[float], total: int) -> list[int]:
    """The step plan: after how many of `total` steps (batches, epochs or rounds) the LR falls
    10x, one entry per milestone fraction f: the first count k with k / total >= f.  A fraction
    never reached gives no entry; two that fall on one step give two entries."""
    return sorted(k for k in (_first_reaching(f, total) for f in milestones) if k is not None)


def lr_factor(milestones: Iterable[float], done: int, total: int) -> float:
    """LR multiplier once `done` of `total` steps are done: 0.1 per drop of `lr_drops` reached."""
    return 0.1 ** sum(1 for k in lr_drops(milestones, total) if done >= k)


def build_scheduler(optimizer: torch.optim.Optimizer, milestones: Iterable[float],
                    total_steps: int) -> torch.optim.lr_scheduler.MultiStepLR:
    """The `lr_drops` plan over `total_steps` optimizer steps (step the scheduler once per
    batch); MultiStepLR multiplies each group's own LR, so g's ratio survives every drop."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=lr_drops(milestones, total_steps),
                                                gamma=0.1)
