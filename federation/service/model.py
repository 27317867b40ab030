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
    plan measured once per batch bucket; the int8 model runs as built.  With `compile` (a
    long-lived service, `minusfed serve --cpu-compile`) the policy may also pick f_p compiled
    by inductor; the images then go through f_p in bucket-sized pieces (13 = 8 + 4 + 1), so at
    most one graph per bucket is ever compiled, and `warm_up()` compiles them all up front."""

    def __init__(self, served: ServedModel, compile: bool = False) -> None:
        self.served = served
        self.model = served.model.eval()
        self.calls = math.inf if compile and served.precision == "float" else 0

    def _context(self, batch: int) -> tuple[contextlib.AbstractContextManager, nn.Module]:
        """A fresh context per call (requests run on several threads); the plan is memoised."""
        if self.served.precision == "int8":
            return contextlib.nullcontext(), self.model
        bucket = next((b for b in PLAN_BUCKETS if b >= batch), PLAN_BUCKETS[-1])
        return embed_context(self.model, bucket, calls=self.calls)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        context, model_fn = self._context(len(images))
        with context:
            return model_fn(images).float()

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """(N, V, 3, 112, 112) -> (N, D)."""
        n, v = views.shape[:2]
        images = views.reshape(n * v, *views.shape[2:])
        if self.calls:
            out = torch.cat([self._forward(images[s:s + k]) for s, k in bucket_pieces(n * v)])
        else:
            out = self._forward(images)
        return F.normalize(out.view(n, v, -1).sum(dim=1), dim=1)

    def warm_up(self) -> None:
        """Probe the plan of every bucket and compile where it was chosen, before serving."""
        for b in PLAN_BUCKETS:
            self(torch.zeros(b, 1, 3, 112, 112))


def bucket_pieces(n: int) -> list[tuple[int, int]]:
    """(start, size) pieces of `n` images, each size a PLAN_BUCKETS entry, largest first."""
    pieces, start = [], 0
    while start < n:
        size = max(b for b in PLAN_BUCKETS if b <= n - start)
        pieces.append((start, size))
        start += size
    return pieces
