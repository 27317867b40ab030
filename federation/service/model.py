"""What embeds X_p in the recognition service: a bundle's f_p in float (float32, or bf16 where
the CPU precision policy measured a win) or its measured int8 build, with the thresholds
calibrated for that model.

A gallery belongs to one model: its templates are only comparable with embeddings of the same
weights at the same precision, so the served model's `tag` (weights digest + precision) is kept
in the gallery and a mismatch is refused (federation/service/gallery.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from federation.service.int8_bundle import read_int8
from minusface.precision import embed_context
from task.bundle import RECOGNIZER_FILE, ServerBundle, read_server

PRECISIONS = ("float", "int8")
PLAN_BUCKETS = (1, 2, 4, 8, 16, 32)       # the CPU policy is measured once per bucket


def weights_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class ServedModel:
    bundle: ServerBundle
    precision: str                 # "float" | "int8"
    model: nn.Module
    thresholds: dict               # FAR key -> calibrated entry (task.bundle.check_thresholds)
    tag: str

    def threshold(self, far: str) -> float:
        value = self.thresholds[far]["threshold"]
        return math.inf if value is None else float(value)


def served_model(server: str | Path | ServerBundle, precision: str = "float") -> ServedModel:
    """The server half at `server` ready to serve; int8 only when `minusfed bundle int8`
    measured it and it kept accuracy (task.bundle.BundleError otherwise)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    bundle = server if isinstance(server, ServerBundle) else read_server(server)
    digest = weights_digest(bundle.path / RECOGNIZER_FILE)
    if precision == "int8":
        q = read_int8(bundle)
        return ServedModel(bundle, "int8", q.model, q.info["thresholds"], f"{digest}:int8")
    return ServedModel(bundle, "float", bundle.recognizer.eval(), bundle.info["thresholds"],
                       f"{digest}:float")


class Embedder:
    """f_p on X_p views: embedding = normalise(sum over views of f_p(view)), float32 out.

    Float models run under the CPU precision policy (minusface.precision.embed_context), its
    plan measured once per batch bucket; the int8 model runs as built."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self.model = served.model.eval()

    def _context(self, batch: int) -> tuple[contextlib.AbstractContextManager, nn.Module]:
        """A fresh context per call (requests run on several threads); the plan is memoised."""
        if self.served.precision == "int8":
            return contextlib.nullcontext(), self.model
        bucket = next((b for b in PLAN_BUCKETS if b >= batch), PLAN_BUCKETS[-1])
        return embed_context(self.model, bucket)

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """(N, V, 3, 112, 112) -> (N, D)."""
        n, v = views.shape[:2]
        context, model_fn = self._context(n * v)
        with context:
            out = model_fn(views.reshape(n * v, *views.shape[2:])).float()
        return F.normalize(out.view(n, v, -1).sum(dim=1), dim=1)
