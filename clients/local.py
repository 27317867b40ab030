"""What a site does in a round, without Flower: load the shared weights, train locally with its
private head, and return the shared weights and metrics.  The ClientApp only translates records.

Stage 1 trains g and f (192-channel stem) on the residue; stage 2 trains f_p on X_p made with
the frozen global g.  The margin head is private: it is created for the site's own identities,
kept between rounds by the caller (Flower `context.state`), and never returned.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from federation.protocol import SHARED_MODULES, STAGE1, STAGE2, flatten, load_shared, unflatten
from minusface.generator import UNetGenerator
from minusface.images import to_signed
from minusface.presets import Preset
from minusface.runtime import tune_allocator
from minusface.trainer import (Models, build_models, default_device, evaluate_verification,
                               make_optimizer, train_epoch)

from .site import SiteData


def stage_models(stage: str, preset: Preset, num_classes: int,
                 shared: Mapping[str, torch.Tensor],
                 frozen_generator: Mapping[str, torch.Tensor] | None,
                 head_state: Mapping[str, torch.Tensor] | None, seed: int = 0) -> Models:
    """Models for a stage with the global shared weights (and private head, if any) loaded."""
    if stage not in SHARED_MODULES:
        raise ValueError(f"unknown stage {stage!r}; expected {STAGE1} or {STAGE2}")
    torch.manual_seed(seed)                           # head init when the site has none yet
    generator = None
    if stage == STAGE2:
        if frozen_generator is None:
            raise ValueError("stage 2 message carries no frozen generator")
        gstate = unflatten(frozen_generator, "generator")
        generator = UNetGenerator(width=int(gstate["enc1.0.weight"].shape[0]))
        generator.load_state_dict(gstate)
    recipe = "stage1" if stage == STAGE1 else "stage2"
    models = build_models(recipe, preset, num_classes, generator=generator)
    load_shared(shared_modules(models, stage), shared)
    if head_state is not None:
        if tuple(head_state["weight"].shape) != tuple(models.head.weight.shape):
            raise ValueError(f"stored head has shape {tuple(head_state['weight'].shape)}, site "
                             f"has {num_classes} identities: the site's data changed")
        models.head.load_state_dict(head_state)
    return models


def shared_modules(models: Models, stage: str) -> dict[str, torch.nn.Module]:
    out = {"recognizer": models.recognizer}
    if stage == STAGE1:
        out = {"generator": models.frontend.generator, **out}
    return out


def local_train(models: Models, stage: str, site: SiteData, preset: Preset, lr: float,
                epochs: int, seed: int, device: torch.device | None = None,
                progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Returns (shared state, private head state, metrics incl. num-examples)."""
    tune_allocator()
    device = device or default_device()
    models.to(device)
    optimizer = make_optimizer(models, preset.with_(lr=lr))
    stats: dict = {}
    for epoch in range(epochs):
        stats = train_epoch(models, site.train.images, site.train.labels, preset, optimizer,
                            None, device, seed=seed * 1000 + epoch, progress=progress,
                            desc=f"{stage} local epoch {epoch + 1}/{epochs}")
    shared = flatten(shared_modules(models, stage))
    head = {k: v.detach().cpu() for k, v in models.head.state_dict().items()}
    metrics = {"num-examples": int(site.train.num_images),
               "train_loss": float(stats.get("loss", float("nan"))),
               "train_acc": float(stats.get("train_acc", float("nan"))),
               "train_seconds": float(stats.get("seconds", 0.0)),
               "train_img_per_s": float(stats.get("img_per_s", 0.0))}
    return shared, head, metrics


def local_evaluate(models: Models, site: SiteData, device: torch.device | None = None) -> dict:
    """Verification on the site's held-out pairs; only aggregate numbers come back."""
    n = len(site.eval_same)
    if n < 2 or site.eval_same.all() or not site.eval_same.any():
        return {"num-examples": 0, "eval_pairs": n}
    device = device or default_device()
    models.to(device)
    faces = to_signed(site.eval_faces)
    m = evaluate_verification(models, faces, site.eval_a, site.eval_b, site.eval_same,
                              folds=np.arange(n) % min(10, n), device=device)
    return {"num-examples": n, "eval_pairs": n, "accuracy": m["accuracy"], "auc": m["auc"],
            "tar_at_far_1e-2": m["tar_at_far"][0.01]["tar"]}
