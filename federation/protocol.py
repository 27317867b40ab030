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
    "max-update-norm": 0.0,
    "seed": 0,
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
    if cfg["preset"] not in ("tiny", "cpu-small", "paper"):
        raise ValueError(f"run config 'preset': expected tiny, cpu-small or paper, got {cfg['preset']!r}")
    return cfg


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
