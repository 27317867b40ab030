"""What a site does in a round, without Flower: load the shared weights, train locally with its
private head, and return the shared weights and metrics.  The ClientApp only translates records.

Stage 1 trains g and f (192-channel stem) on the residue; stage 2 trains f_p on X_p made with
the frozen global g.  The margin head is private: it is created for the site's own identities,
kept between rounds by the caller (Flower `context.state`, and an owner-only file on the site so a
SuperNode restart keeps it: `clients.site_state`), and never returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from minusface.images import to_signed
from minusface.presets import Preset
from minusface.runtime import tune_allocator
from minusface.trainer import (
    Models,
    build_models,
    default_device,
    epoch_seed,
    evaluate_verification,
    make_optimizer,
    train_epoch,
)
from task.models import generator_from_arrays
from task.records import SHARED_MODULES, STAGE1, STAGE2
from task.wire import flatten, load_shared

from .site import SiteData


def stage_models(stage: str, preset: Preset, num_classes: int,
                 shared: Mapping[str, torch.Tensor],
                 frozen_generator: Mapping[str, torch.Tensor] | None,
                 head_state: Mapping[str, torch.Tensor] | None, seed: int = 0,
                 on_bad_head: Callable[[str], None] | None = None) -> Models:
    """Models for a stage with the global shared weights (and private head, if any) loaded.

    A head that does not fit the site (its identities changed) raises ValueError, or, with
    `on_bad_head`, is reported to it and replaced by a fresh head."""
    if stage not in SHARED_MODULES:
        raise ValueError(f"unknown stage {stage!r}; expected {STAGE1} or {STAGE2}")
    torch.manual_seed(seed)                           # head init when the site has none yet
    generator = None
    if stage == STAGE2:
        if frozen_generator is None:
            raise ValueError("stage 2 message carries no frozen generator")
        generator = generator_from_arrays(frozen_generator)
    recipe = "stage1" if stage == STAGE1 else "stage2"
    models = build_models(recipe, preset, num_classes, generator=generator)
    load_shared(shared_modules(models, stage), shared)
    if head_state is not None:
        problem = head_mismatch(models.head, head_state, num_classes)
        if problem is None:
            models.head.load_state_dict(head_state)
        elif on_bad_head is None:
            raise ValueError(problem)
        else:
            on_bad_head(problem)
    return models


def head_mismatch(head: torch.nn.Module, state: Mapping[str, torch.Tensor],
                  num_classes: int) -> str | None:
    """Why `state` cannot be loaded into `head` (keys, shapes), or None if it can."""
    want = head.state_dict()
    if set(state) != set(want):
        return f"stored head has keys {sorted(state)}, expected {sorted(want)}"
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape) or not state[k].is_floating_point():
            return (f"stored head {k!r} is {tuple(state[k].shape)} {state[k].dtype}, site has "
                    f"{num_classes} identities ({tuple(v.shape)}): the site's data changed")
    return None


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
                            None, device, seed=epoch_seed(seed, epoch), progress=progress,
                            desc=f"{stage} local epoch {epoch + 1}/{epochs}")
    # contiguous: a CPU precision plan may have trained in channels_last (minusface.precision)
    shared = {k: v.contiguous() for k, v in flatten(shared_modules(models, stage)).items()}
    head = {k: v.detach().cpu().contiguous() for k, v in models.head.state_dict().items()}
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
