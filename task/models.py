"""The models of a round: fresh initial weights and the learning rate of each round."""

from __future__ import annotations

import torch

from minusface.backbones import build_backbone
from minusface.generator import UNetGenerator
from minusface.presets import Preset
from task.records import STAGE1
from task.wire import flatten


def lr_for_round(preset: Preset, stage_round: int, stage_rounds: int) -> float:
    """The preset's step schedule over a stage's rounds: LR / 10 for each milestone fraction of
    the stage already completed before this round (round 1 always trains at the full LR)."""
    done = (stage_round - 1) / stage_rounds
    return preset.lr * (0.1 ** sum(1 for f in preset.milestones if done >= f))


def initial_arrays(stage: str, preset: Preset, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    if stage == STAGE1:
        return flatten({"generator": UNetGenerator(width=preset.generator_width),
                        "recognizer": build_backbone(preset.backbone, 192, width=preset.backbone_width)})
    return flatten({"recognizer": build_backbone(preset.backbone, 3, width=preset.backbone_width)})
