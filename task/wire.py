"""Weights on the wire: dtypes, and state dicts of several modules as one flat record.

Keys are "<module>.<state-dict key>" ("generator.enc1.0.weight", "recognizer.fc.weight"): the
same scheme in the arrays of a train message, the frozen-generator record, checkpoints and
final models.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# BatchNorm running statistics stay float32 on any wire: the BN after the recognizer's first
# conv sees the 192-channel residue (DCT coefficients up to ~800), and its running variance
# passes float16's largest value (65,504) within a few epochs.  Cast, it becomes inf: the
# server rejects every reply as non-finite (a real run) or evaluates a constant model (LFW
# accuracy 50.0 %, AUC 0.500, in bench/federated_lfw.py before this rule).  They are a few
# hundred numbers per model, so the bytes barely change.
FULL_PRECISION_SUFFIXES = (".running_mean", ".running_var")


def stays_float32(key: str) -> bool:
    return key.endswith(FULL_PRECISION_SUFFIXES)


def to_wire(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to the wire dtype, except BatchNorm running statistics
    (`stays_float32`); integer buffers (BatchNorm step counts) unchanged."""
    target = WIRE_DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() and not stays_float32(k) else v
            for k, v in state.items()}


def from_wire(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Back to the float32 master copy."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def like_received(state: Mapping[str, torch.Tensor],
                  received_dtypes: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """A client replies in the dtypes it received (Array.dtype names such as "float16"), so the
    reply passes the server's dtype check and costs the same bytes as the download."""
    out = {}
    for k, v in state.items():
        want = getattr(torch, received_dtypes.get(k, ""), None)
        out[k] = v.to(want) if isinstance(want, torch.dtype) and v.is_floating_point() else v
    return out


def prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One module's state dict -> its keys on the wire: "enc1.0.weight" -> "generator.enc1.0.weight"."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unflatten(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of `prefixed`: the state dict of module `prefix` (other modules' keys dropped)."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def select(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The keys of module `prefix`, prefix kept (the frozen-generator record of stage-1 arrays)."""
    return prefixed(unflatten(state, prefix), prefix)


def flatten(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """{"generator": g, "recognizer": f} -> {"generator.enc1.0.weight": ..., ...} on CPU."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        out.update(prefixed({k: v.detach().cpu() for k, v in module.state_dict().items()}, prefix))
    return out


def load_shared(modules: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor]) -> None:
    """Load every shared module strictly: a missing or unexpected key is an error."""
    for prefix, module in modules.items():
        module.load_state_dict(unflatten(state, prefix), strict=True)
