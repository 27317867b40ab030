"""Test helpers for the recognition service: a small bundle written by the real writer; the
service process itself is `federation.service.process.Service`."""

from __future__ import annotations

from pathlib import Path

import torch

from federation.service.process import ROOT, Service  # noqa: F401 - re-exported
from minusface.backbones import build_backbone
from minusface.generator import UNetGenerator
from task.bundle import write_bundle

THRESHOLDS = {"1e-2": {"threshold": 0.5, "tar": 0.9, "far": 0.01, "n_negatives": 300},
              "1e-3": {"threshold": 0.8, "tar": 0.7, "far": 0.001, "n_negatives": 300}}


def make_bundle(out: Path, preset: str = "tiny", seed: int = 0, generator: UNetGenerator | None
                = None, recognizer: torch.nn.Module | None = None, backbone_width: int = 8,
                thresholds: dict | None = None) -> Path:
    """A bundle of freshly initialised (or given) models, written by the real writer."""
    torch.manual_seed(seed)
    g = generator if generator is not None else UNetGenerator(width=4)
    f = recognizer if recognizer is not None else build_backbone("ir18", 3, width=backbone_width)
    card = {"preset": preset, "commit": None, "rounds": {"stage1-aggregated": 1},
            "run-config": {"preset": preset}, "server-eval": {"server_accuracy": 0.5}}
    info = {"backbone": "ir18", "backbone-width": backbone_width,
            "thresholds": thresholds or THRESHOLDS}
    return write_bundle(out, g.eval(), f.state_dict(), info, card)
