"""The client-side front end: faces -> e -> (g, subtract) -> residue r -> shuffle -> d -> X_p.

F(X) = d(s(e(X) - g(e(X)); theta)) with a fresh CSPRNG permutation theta per image.  Stage 1
trains g and f on the unshuffled residue r; stage 2 and deployment only ever call `protect`.
On a CPU, `protect` runs g as `minusface.precision` measured fastest for this g and batch
(float32, or bf16 autocast with or without channels_last); e, d and the shuffle stay float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from .dct import decode, decoded_to_signed, encode
from .generator import UNetGenerator
from .precision import NATIVE, Plan, inference_plan
from .provenance import register_protected
from .shuffle import shuffle_channels


@dataclass
class Stage1Output:
    """What stage 1 needs from one forward pass (all of it stays on the client)."""
    residue: torch.Tensor        # r = x - g(x), (N, 192, 112, 112): input of f
    regenerated: torch.Tensor    # X' = 2 d(g(x)) - 1, (N, 3, 112, 112) in [-1, 1]: for L_gen
    latent: torch.Tensor         # bottleneck of g (optional sparsity loss)


class MinusFaceFrontend(nn.Module):
    """Holds the generator g; the DCT encoder/decoder are fixed and parameter-free."""

    def __init__(self, width: int = 64, generator: UNetGenerator | None = None) -> None:
        super().__init__()
        self.generator = generator if generator is not None else UNetGenerator(width=width)

    def stage1(self, faces: torch.Tensor) -> Stage1Output:
        """Residue path used while co-training g and f (gradients flow into g)."""
        x = encode(faces)
        regen, latent = self.generator.forward_with_latent(x)
        regen = regen.float()            # d stays float32 when g ran under bf16 autocast
        return Stage1Output(residue=x - regen, regenerated=decoded_to_signed(decode(regen)),
                            latent=latent)

    def residue(self, faces: torch.Tensor, plan: Plan = NATIVE) -> torch.Tensor:
        """r = e(X) - g(e(X)) in float32: a bf16 g(x) (under `plan`) is promoted by the subtraction."""
        x = encode(faces)
        r = x - plan.forward(self.generator, x)
        return r.contiguous() if plan.channels_last else r

    def forward(self, faces: torch.Tensor, rng: torch.Generator | None = None,
                plan: Plan = NATIVE) -> torch.Tensor:
        """X_p = d(s(r; theta)), differentiable w.r.t. nothing the server sees; see `protect`."""
        return decode(shuffle_channels(self.residue(faces, plan), generator=rng))

    @torch.no_grad()
    def protect(self, faces: torch.Tensor, rng: torch.Generator | None = None,
                micro_batch: int | None = None, register: bool = True,
                precision_mode: str | None = None, expected_faces: int = 0) -> torch.Tensor:
        """Protected images X_p (N, 3, 112, 112) in [0, 1] from faces in [-1, 1].

        Each call draws new permutations, so protecting the same face twice gives different X_p.
        `rng` is for tests and benchmarks only.  On CPU the batch is processed in micro-batches
        of 2 (`micro_batch`): the 192-channel intermediates then stay small enough to be reused
        by the allocator instead of being page-faulted in again (about 1.5x faster, measured).
        `register=False` skips recording the outputs for the outbound guard: for X_p that is
        consumed on the site (stage-2 training, evaluation) and never shipped.  On a CPU, g
        runs under `precision.inference_plan("protect", g, batch)` (`precision_mode` overrides
        the process's mode for this call); its own autocast setting, also inside a caller's.
        `expected_faces`: how many faces this process will protect in all (a folder, an
        upload); large enough, the policy may compile g (`minusface.compiled`), which pays only
        over many calls.
        """
        _check_faces(faces)
        cpu = faces.device.type == "cpu"
        if micro_batch is None:
            micro_batch = 2 if cpu else faces.shape[0]
        step = max(1, min(micro_batch, faces.shape[0]))
        # a compiled g has one graph per input shape, so only full micro-batches may use it: a
        # call smaller than one (a job's last faces) and a short last micro-batch run eager
        # rather than paying a compilation for themselves
        calls = math.ceil(expected_faces / step) if faces.shape[0] >= micro_batch else 0
        plan = (inference_plan("protect", self.generator, step, precision_mode, calls) if cpu
                else NATIVE)
        tail = replace(plan, choice="bf16+channels_last") if plan.compiled else plan
        with plan.autocast():
            if faces.shape[0] <= micro_batch:
                protected = self.forward(faces, rng=rng, plan=plan)
            else:
                protected = torch.cat([
                    self.forward(faces[s:s + micro_batch], rng=rng,
                                 plan=plan if s + micro_batch <= faces.shape[0] else tail)
                    for s in range(0, faces.shape[0], micro_batch)])
        if register:
            register_protected(protected)  # lets clients.guard.outbound_guard release exactly these
        return protected


def _check_faces(faces: torch.Tensor) -> None:
    if faces.dim() != 4 or faces.shape[1:] != (3, 112, 112):
        raise ValueError(f"protect: expected faces of shape (N, 3, 112, 112), got {tuple(faces.shape)}")
    lo, hi = (float(v) for v in torch.aminmax(faces.detach()))   # one device sync; NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("protect: faces contain NaN or infinite values")
    if lo < -1.0001 or hi > 1.0001:
        raise ValueError(f"protect: faces must be in [-1, 1] (normalised with mean 0.5, std 0.5), "
                         f"got values in [{lo:.3f}, {hi:.3f}]")


def protect(faces: torch.Tensor, frontend: MinusFaceFrontend,
            rng: torch.Generator | None = None) -> torch.Tensor:
    """Functional form of `MinusFaceFrontend.protect`."""
    return frontend.protect(faces, rng=rng)
