"""The attacker's judge: an unprotected recognizer that scores how recognisable X_p and
reconstructions are.  Trained on the attacker's auxiliary identities, or loaded from a
minusface.trainer checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minusface.backbones import build_backbone
from minusface.presets import get_preset
from minusface.trainer import Trainer


def load_judge(path: str) -> nn.Module:
    """Recognizer of a minusface.trainer checkpoint (baseline recipe) -> module in eval mode."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or "models" not in ck or "recognizer" not in ck["models"]:
        raise SystemExit(f"error: {path}: not a minusface trainer checkpoint")
    if ck.get("recipe") not in (None, "baseline"):
        print(f"WARNING: judge {path} was trained with recipe {ck.get('recipe')!r}, not the "
              f"unprotected baseline", file=sys.stderr)
    preset = get_preset(str(ck.get("preset", "tiny")))
    net = build_backbone(preset.backbone, 3, width=preset.backbone_width)
    net.load_state_dict(ck["models"]["recognizer"])
    return net.eval()


def train_judge(images: np.ndarray, labels: np.ndarray, config, out_dir: str | Path, seed: int,
                progress: bool) -> nn.Module:
    preset = get_preset(config.judge_preset)
    trainer = Trainer("baseline", preset, images, labels, out_dir, seed=seed,
                      epochs=config.judge_epochs, progress=progress)
    return trainer.run().recognizer.eval()
