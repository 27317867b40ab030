"""Centralized trainers for the three recipes, reused by federated clients for local epochs.

Recipes (same data, same optimizer and schedule shape):
  baseline  unprotected ArcFace twin: f(X)
  stage1    MinusFace stage 1: g and f co-trained on the residue r (5 L1 + ArcFace)
  stage2    MinusFace stage 2: f_p on X_p with g frozen, each image `repeat` (3) times per epoch
The baseline also visits each image `repeat` times, so it and stage 2 take the same number of
SGD steps; stage 1 visits each image once (paper).

A run checkpoints after every epoch (atomic rename), appends one JSON line per epoch to
`metrics.jsonl`, and resumes from `checkpoint.pt` with the same per-step LR schedule and the
same epoch-seeded batch order.  On CUDA it uses bf16 autocast and channels_last; on a CPU each
recipe's step runs as `minusface.precision` measured fastest (float32, or bf16 autocast with or
without channels_last; `step_plan`).  The DCT maps always run in float32 (see `minusface.dct`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .atomic import write_atomic
from .backbones import build_backbone
from .batches import iterate_batches
from .frontend import MinusFaceFrontend
from .generator import UNetGenerator
from .heads import build_head
from .losses import baseline_loss, freeze, recognition_loss, stage1_loss, stage2_loss
from .optim import build_optimizer, build_scheduler
from .precision import NATIVE, Plan, embed_context, training_plan
from .presets import Preset
from .runtime import tune_allocator

RECIPES = ("baseline", "stage1", "stage2")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    return recipe


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU (there `step_plan` decides, by measurement)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def repeat_for(recipe: str, preset: Preset) -> int:
    return 1 if recipe == "stage1" else preset.repeat


@dataclass
class Models:
    """Everything one recipe trains or uses; `frontend` is None for the baseline."""
    recipe: str
    recognizer: nn.Module
    head: nn.Module
    frontend: MinusFaceFrontend | None = None

    def modules(self) -> dict[str, nn.Module]:
        out = {"recognizer": self.recognizer, "head": self.head}
        if self.frontend is not None:
            out["generator"] = self.frontend.generator
        return out

    def to(self, device: torch.device) -> Models:
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        for m in self.modules().values():
            m.to(device=device, memory_format=fmt)
        return self

    def train(self) -> None:
        self.recognizer.train()
        self.head.train()
        if self.frontend is not None:
            # g trains in stage 1 only; in stage 2 it stays frozen in eval mode
            self.frontend.generator.train(self.recipe == "stage1")

    def transform(self):
        """The client transform applied before the recognizer at evaluation time."""
        if self.recipe == "baseline":
            return None
        if self.recipe == "stage1":
            return self.frontend.residue
        return self.frontend.protect


def build_models(recipe: str, preset: Preset, num_classes: int,
                 generator: UNetGenerator | None = None) -> Models:
    """Fresh models for a recipe; stage 2 needs the (stage-1 trained) generator."""
    check_recipe(recipe)
    in_channels = 192 if recipe == "stage1" else 3
    recognizer = build_backbone(preset.backbone, in_channels, width=preset.backbone_width)
    head = build_head(preset.head, 512, num_classes, s=preset.head_s, m=preset.head_m)
    frontend = None
    if recipe == "stage1":
        frontend = MinusFaceFrontend(generator=generator or UNetGenerator(width=preset.generator_width))
    elif recipe == "stage2":
        if generator is None:
            raise ValueError("stage2 needs the generator g trained in stage 1")
        frontend = MinusFaceFrontend(generator=freeze(generator))
    return Models(recipe, recognizer, head, frontend)


def make_optimizer(models: Models, preset: Preset) -> torch.optim.SGD:
    generator = models.frontend.generator if models.recipe == "stage1" else None
    return build_optimizer([models.recognizer, models.head], lr=preset.lr,
                           weight_decay=preset.weight_decay, momentum=preset.momentum,
                           generator=generator, generator_lr_ratio=preset.generator_lr_ratio)


def steps_per_epoch(num_images: int, repeat: int, batch_size: int) -> int:
    return max(1, (num_images * repeat) // min(batch_size, max(1, num_images * repeat)))


def epoch_seed(seed: int, epoch: int) -> int:
    """The batch order of one epoch: new every epoch, the same again on a resume."""
    return seed * 1000 + epoch


def step_plan(models: Models, batch: int, device: torch.device,
              mode: str | None = None) -> Plan:
    """How this recipe's training step runs on `device` (NATIVE off the CPU): stage 1 probes
    g + f, stage 2 and the baseline probe the recognizer on 3-channel images (stage 2's
    protect() has its own plan)."""
    if device.type != "cpu":
        return NATIVE
    num_classes = int(models.head.weight.shape[-1])
    if models.recipe == "stage1":
        modules = {"generator": models.frontend.generator, "recognizer": models.recognizer,
                   "head": models.head}

        def step(m, x, y):
            return stage1_loss(MinusFaceFrontend(generator=m["generator"]), m["recognizer"],
                               m["head"], x, y)[0]
    else:
        modules = {"recognizer": models.recognizer, "head": models.head}

        def step(m, x, y):
            return recognition_loss(m["recognizer"], m["head"], x, y)[0]
    return training_plan(models.recipe, step, modules, 3, num_classes, batch, mode)


def train_step(models: Models, faces: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer, device: torch.device,
               rng: torch.Generator | None = None) -> dict[str, float]:
    faces = faces.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if device.type == "cuda":
        faces = faces.contiguous(memory_format=torch.channels_last)
    plan = step_plan(models, faces.shape[0], device)
    plan.prepare(*models.modules().values())
    with autocast(device), plan.autocast():
        if models.recipe == "baseline":
            loss, parts = baseline_loss(models.recognizer, models.head, faces, labels)
        elif models.recipe == "stage1":
            loss, parts = stage1_loss(models.frontend, models.recognizer, models.head, faces, labels)
        else:
            loss, parts = stage2_loss(models.frontend, models.recognizer, models.head, faces,
                                      labels, rng=rng)
    optimizer_step(loss, optimizer, str(parts))
    return parts


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, where: str) -> None:
    """Backward and one optimizer step; a non-finite loss stops training, saying `where`."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {float(loss)} ({where}); "
                                 f"lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_epoch(models: Models, images: np.ndarray, labels: np.ndarray, preset: Preset,
                optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                device: torch.device, seed: int, progress: bool = True,
                desc: str = "train", staged: bool | None = None) -> dict[str, float]:
    """One pass (x repeat) over a site's faces; returns mean losses, accuracy and timing.
    `staged`: how batches are built (`minusface.batches`; default: staged on CUDA)."""
    models.train()
    repeat = repeat_for(models.recipe, preset)
    total = steps_per_epoch(len(labels), repeat, preset.batch_size)
    sums: dict[str, float] = {}
    steps, seen, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    for x, y in iterate_batches(images, labels, preset.batch_size, repeat, seed, device=device,
                                staged=staged):
        parts = train_step(models, x, y, optimizer, device)
        if scheduler is not None:
            scheduler.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
        seen += len(y)
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.3f}", refresh=False)
    bar.close()
    elapsed = time.perf_counter() - t0
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out.update(steps=steps, images=seen, seconds=elapsed, img_per_s=seen / max(elapsed, 1e-9),
               lr=optimizer.param_groups[0]["lr"])
    return out


# --------------------------------------------------------------------------- checkpoints

def state_dicts(models: Models) -> dict[str, dict[str, torch.Tensor]]:
    return {k: {n: t.detach().cpu() for n, t in m.state_dict().items()}
            for k, m in models.modules().items()}


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise RuntimeError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); "
                           f"move it away to start over") from e


class Trainer:
    """One recipe, end to end: epochs, per-epoch checkpoint, JSON-lines metrics, resume."""

    def __init__(self, recipe: str, preset: Preset, images: np.ndarray, labels: np.ndarray,
                 out_dir: str | os.PathLike, generator: UNetGenerator | None = None,
                 device: torch.device | None = None, seed: int = 0,
                 epochs: int | None = None, progress: bool = True) -> None:
        self.recipe = check_recipe(recipe)
        self.preset = preset
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = device or default_device()
        self.seed = seed
        self.epochs = epochs if epochs is not None else preset.epochs
        self.progress = progress
        tune_allocator()
        torch.manual_seed(seed)
        self.models = build_models(recipe, preset, self.num_classes, generator).to(self.device)
        self.optimizer = make_optimizer(self.models, preset)
        per_epoch = steps_per_epoch(len(self.labels), repeat_for(recipe, preset), preset.batch_size)
        self.scheduler = build_scheduler(self.optimizer, preset.milestones, per_epoch * self.epochs)
        self.start_epoch = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def save(self, epoch: int) -> None:
        checkpoint = {"recipe": self.recipe, "preset": self.preset.name, "epoch": epoch,
                      "epochs": self.epochs, "num_classes": self.num_classes,
                      "generator_width": self.preset.generator_width,
                      "models": state_dicts(self.models),
                      "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(),
                      "torch_rng": torch.get_rng_state()}
        write_atomic(self.checkpoint_path, lambda f: torch.save(checkpoint, f))

    def resume(self) -> bool:
        """Load `checkpoint.pt` if present; returns whether a run was resumed."""
        if not self.checkpoint_path.exists():
            return False
        ck = load_checkpoint(self.checkpoint_path)
        if ck.get("recipe") != self.recipe or ck.get("num_classes") != self.num_classes:
            raise ValueError(f"{self.checkpoint_path}: holds recipe {ck.get('recipe')!r} with "
                             f"{ck.get('num_classes')} classes, this run is {self.recipe!r} with "
                             f"{self.num_classes}: use another out dir")
        for name, module in self.models.modules().items():
            module.load_state_dict(ck["models"][name])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])          # dropout draws continue as if never stopped
        self.start_epoch = int(ck["epoch"]) + 1
        return True

    def log(self, record: dict) -> None:
        with open(self.out_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def run(self, stop_after_epoch: int | None = None) -> Models:
        """Train the remaining epochs (`stop_after_epoch` ends early, as an interruption would)."""
        resumed = self.resume()
        if resumed and self.progress:
            print(f"[{self.recipe}] resumed from {self.checkpoint_path} at epoch {self.start_epoch}")
        for epoch in range(self.start_epoch, self.epochs):
            stats = train_epoch(self.models, self.images, self.labels, self.preset,
                                self.optimizer, self.scheduler, self.device,
                                seed=epoch_seed(self.seed, epoch), progress=self.progress,
                                desc=f"{self.recipe} epoch {epoch + 1}/{self.epochs}")
            self.save(epoch)
            self.log({"recipe": self.recipe, "epoch": epoch, **stats})
            if self.progress:
                print(f"[{self.recipe}] epoch {epoch + 1}/{self.epochs}: loss {stats['loss']:.3f} "
                      f"acc {stats['train_acc']:.3f} {stats['img_per_s']:.1f} img/s")
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
        return self.models


def evaluate_verification(models: Models, faces: torch.Tensor, idx_a: np.ndarray,
                          idx_b: np.ndarray, same: np.ndarray, folds: np.ndarray | None = None,
                          device: torch.device | None = None, batch_size: int = 64) -> dict:
    """Verification metrics on pairs: each image (and, separately, its flip) goes through the
    recipe's client transform (a fresh permutation each for MinusFace), flip-TTA embeddings,
    cosine scores, 10-fold accuracy, AUC and TAR@FAR."""
    from .eval import embed, pair_scores, verification_metrics

    device = device or next(models.recognizer.parameters()).device
    transform = models.transform()
    context, model_fn = contextlib.nullcontext(), models.recognizer
    if device.type == "cpu":
        context, model_fn = embed_context(models.recognizer, batch_size)
    with context:
        emb = embed(model_fn, faces, transform=transform, batch_size=batch_size,
                    flip=True, device=device)
    scores = pair_scores(emb[idx_a], emb[idx_b])
    return verification_metrics(scores, np.asarray(same, dtype=bool), n_folds=10, folds=folds)
