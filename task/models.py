"""The models of a round: fresh initial weights, the generator of a record, each site's seed and
the learning rate of each round."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from minusface.backbones import build_backbone
from minusface.generator import UNetGenerator
from minusface.optim import lr_factor
from minusface.presets import Preset
from minusface.weights import build_generator
from task.records import STAGE1
from task.wire import flatten, unflatten

GENERATOR = "generator"


def lr_for_round(preset: Preset, stage_round: int, stage_rounds: int) -> float:
    """The preset's step plan (`minusface.optim.lr_drops`, as the centralized trainer's) over a
    stage's rounds: LR / 10 for each milestone fraction of the stage completed before this
    round."""
    return preset.lr * lr_factor(preset.milestones, stage_round - 1, stage_rounds)


def site_seed(run_seed: int, partition_id: int, round_index: int = 0) -> int:
    """A site's seed: its head's initialisation and privacy split (round 0) and, per round of
    the run, its batch order; distinct for every site and round while fewer than 100 sites
    take part."""
    return run_seed * 7919 + partition_id + 100 * round_index


def generator_from_arrays(arrays: Mapping[str, torch.Tensor]) -> UNetGenerator:
    """g from arrays with keys "generator.*" (stage-1 shared weights, the frozen-generator
    record, a checkpoint); other modules' keys are ignored.  The server screened these weights,
    so NaN is not refused here (it shows in the evaluation, as any diverged model)."""
    return build_generator(unflatten(arrays, GENERATOR), where="generator arrays",
                           check_finite=False)


def initial_arrays(stage: str, preset: Preset, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    if stage == STAGE1:
        return flatten({GENERATOR: UNetGenerator(width=preset.generator_width),
                        "recognizer": build_backbone(preset.backbone, 192, width=preset.backbone_width)})
    return flatten({"recognizer": build_backbone(preset.backbone, 3, width=preset.backbone_width)})
