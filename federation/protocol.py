"""Message schema shared by the ServerApp and the ClientApp: stages, record names, config keys.

faces -> [client: front end -> X_p -> recognizer] -> shared weights -> [server: aggregate]

Train messages hold "arrays" (the shared weights: every key is "<module>.<state-dict key>"),
"config" (stage, lr, local-epochs, ...), and in stage 2 the read-only "frozen-generator".
Replies hold "arrays" with exactly the keys received and "metrics" with `num-examples`.
Margin heads (class centres of a site's identities) never appear in any record.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from minusface.backbones import build_backbone
from minusface.generator import UNetGenerator
from minusface.presets import PRESETS, Preset

STAGE1 = "stage1"
STAGE2 = "stage2"
STAGES = (STAGE1, STAGE2)

ARRAYS = "arrays"
CONFIG = "config"
FROZEN_GENERATOR = "frozen-generator"
NUM_EXAMPLES = "num-examples"

# Which modules are shared (aggregated) in each stage; the head is never shared.
SHARED_MODULES = {STAGE1: ("generator", "recognizer"), STAGE2: ("recognizer",)}

# Run-config keys (a contract: scripts and docs rely on these names), with defaults.
RUN_CONFIG_DEFAULTS: dict[str, object] = {
    "preset": "tiny",
    "stage1-rounds": 1,
    "stage2-rounds": 1,
    "local-epochs": 1,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "data-path": "",
    "out-dir": "",
    "min-nodes": 2,
    "eval-fold": 0,
    "partition-scheme": "uniform",
    "partition-seed": 0,
    "max-identities": 40,
    "server-eval-pairs": 100,
    "aggregation": "fedavg",
    "aggregation-backend": "flower",
    "max-update-norm": 0.0,
    # seconds the server waits for replies in each phase of a round (Flower's default 3600);
    # sampled nodes that have not replied by then are dropped from the round.  A killed node
    # is dropped sooner: the SuperLink answers for it once it misses its heartbeats (~60 s)
    "round-timeout": 3600.0,
    "seed": 0,
    # dtype of floating-point weights on the wire, both ways: float32 or float16 (half the bytes;
    # the server keeps and checkpoints a float32 master copy).  NumPy has no bfloat16, so
    # Flower's ArrayRecord cannot carry it.
    "wire-dtype": "float32",
    # after training, every site attacks its own faces (evaluate.privacy, federation/privacy_round.py)
    "privacy-eval": False,
    # central DP (strategy/dp.py): noise multiplier z (0 = off), client clipping norm C,
    # accountant delta, stop before epsilon would exceed this (0 = no cap)
    "dp-noise-multiplier": 0.0,
    "dp-clipping-norm": 1.0,
    "dp-target-delta": 1e-5,
    "dp-max-epsilon": 0.0,
}


def run_config(raw: Mapping[str, object]) -> dict[str, object]:
    """Defaults overlaid with the run config, with a clear error for a mistyped value."""
    cfg = dict(RUN_CONFIG_DEFAULTS)
    for key, value in raw.items():
        if key in RUN_CONFIG_DEFAULTS:
            default = RUN_CONFIG_DEFAULTS[key]
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not type(default):
                raise TypeError(f"run config {key!r}: expected {type(default).__name__}, got "
                                f"{value!r} ({type(value).__name__})")
        cfg[key] = value
    if cfg["wire-dtype"] not in WIRE_DTYPES:
        raise ValueError(f"run config 'wire-dtype': expected one of {', '.join(WIRE_DTYPES)}, "
                         f"got {cfg['wire-dtype']!r}")
    if cfg["preset"] not in PRESETS:
        raise ValueError(f"run config 'preset': expected one of {', '.join(PRESETS)}, "
                         f"got {cfg['preset']!r}")
    if not float(cfg["round-timeout"]) > 0:   # Flower's send_and_receive would wait 0 s
        raise ValueError(f"run config 'round-timeout' must be > 0 seconds, "
                         f"got {cfg['round-timeout']!r}")
    return cfg


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


def flatten(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """{"generator": g, "recognizer": f} -> {"generator.enc1.0.weight": ..., ...} on CPU."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            out[f"{prefix}.{key}"] = value.detach().cpu()
    return out


def unflatten(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def load_shared(modules: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor]) -> None:
    """Load every shared module strictly: a missing or unexpected key is an error."""
    for prefix, module in modules.items():
        module.load_state_dict(unflatten(state, prefix), strict=True)


def lr_for_round(preset: Preset, stage_round: int, stage_rounds: int) -> float:
    """The preset's step schedule over a stage's rounds: LR / 10 for each milestone fraction of
    the stage already completed before this round (round 1 always trains at the full LR)."""
    done = (stage_round - 1) / stage_rounds
    return preset.lr * (0.1 ** sum(1 for f in preset.milestones if done >= f))


def initial_arrays(stage: str, preset: Preset, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    if stage == STAGE1:
        return flatten({"generator": UNetGenerator(width=preset.generator_width),
                        "recognizer": build_backbone(preset.backbone, 192, width=preset.backbone_width)})
    return flatten({"recognizer": build_backbone(preset.backbone, 3, width=preset.backbone_width)})
