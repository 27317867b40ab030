"""SGD with the paper's parameter groups and a step schedule that keeps their ratios.

Groups: recognizer (+ head) weights with weight decay; BatchNorm parameters and biases without;
generator weights and biases in their own groups at `generator_lr_ratio` x the base LR (0.5 per
the paper).  The released code loses this ratio (wrong group name, and a schedule that overwrites
every group's LR); `torch.optim.lr_scheduler.MultiStepLR` multiplies each group's own LR, so the
ratio survives every step.
"""

from __future__ import annotations

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


def build_scheduler(optimizer: torch.optim.Optimizer,
                    milestones: Iterable[int]) -> torch.optim.lr_scheduler.MultiStepLR:
    """LR / 10 at each milestone epoch (paper: 10, 18, 22 of 24); step once per epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=0.1)
