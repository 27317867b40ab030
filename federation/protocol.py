"""Message schema shared by the ServerApp and the ClientApp: stages, record names, config keys.

faces -> [client: front end -> X_p -> recognizer] -> shared weights -> [server: aggregate]

Train messages hold "arrays" (the shared weights: every key is "<module>.<state-dict key>"),
"config" (stage, lr, local-epochs, ...), and in stage 2 the read-only "frozen-generator".
Replies hold "arrays" with exactly the keys received and "metrics" with `num-examples`.
Margin heads (class centres of a site's identities) never appear in any record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

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
    # FedAvg weights (strategy/aggregation.py, "Weights"): "num-examples" (each site's claim,
    # bounded below) or "equal" (weight 1 each); a claim above max-num-examples is rejected;
    # each weight is clipped to max-weight-ratio x the median weight of the round (0 = off)
    "weighting": "num-examples",
    "max-num-examples": 1_000_000,
    "max-weight-ratio": 4.0,
}


def run_config(raw: Mapping[str, object]) -> dict[str, object]:
    """Defaults overlaid with the run config; a clear error (ValueError or TypeError starting
    "run config 'KEY':") for a mistyped or out-of-range value.  Unknown keys pass through
    (`flwr run` already refuses keys pyproject.toml does not declare)."""
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
    for key, check in _CHECKS.items():
        problem = check(cfg[key])
        if problem:
            raise ValueError(f"run config {key!r}: expected {problem}, got {cfg[key]!r}")
    for key, normalize in _named_choices().items():
        try:
            cfg[key] = normalize(str(cfg[key]))
        except ValueError as exc:
            raise ValueError(f"run config {key!r}: {exc}") from None
    return cfg


def _at_least(low: float, note: str = "") -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        ok = math.isfinite(value) and value >= low  # type: ignore[arg-type,operator]
        kind = "an integer" if isinstance(value, int) else "a finite number"
        return None if ok else f"{kind} >= {low:g}{note}"
    return check


def _fraction(zero_ok: bool) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        v = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(v) and (0 <= v if zero_ok else 0 < v) and v <= 1
        return None if ok else f"a fraction in {'[0' if zero_ok else '(0'}, 1]"
    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        return None if value in choices else f"one of {', '.join(choices)}"
    return check


def _out_dir(value: object) -> str | None:
    text = str(value)     # relative would depend on where the SuperLink/ServerApp happens to run
    ok = text == "" or Path(text).is_absolute()
    return None if ok else '"" (runs/flwr-run-<id>) or an absolute path'


def _positive_finite(value: object) -> str | None:
    v = float(value)  # type: ignore[arg-type]
    return None if math.isfinite(v) and v > 0 else "a finite number > 0"


def _weight_ratio(value: object) -> str | None:
    v = float(value)  # type: ignore[arg-type]
    return None if v == 0 or (math.isfinite(v) and v >= 1) else "0 (off) or a finite number >= 1"


def _delta(value: object) -> str | None:
    v = float(value)  # type: ignore[arg-type]
    return None if 0 < v < 1 else "a number in (0, 1)"


def _partition_schemes() -> tuple[str, ...]:
    from simulation.partition import SCHEMES  # pylint: disable=import-outside-toplevel
    return tuple(SCHEMES)


def _named_choices() -> dict[str, Callable[[str], str]]:
    """Keys checked (and normalised, "Trimmed_Mean" -> "trimmed-mean") by the strategy's own
    functions; imported here so a client, which also parses the run config, loads them only
    when it does."""
    from strategy.aggregation import (  # pylint: disable=import-outside-toplevel
        normalize_backend, normalize_rule, normalize_weighting)
    return {"aggregation": normalize_rule, "aggregation-backend": normalize_backend,
            "weighting": normalize_weighting}


_CHECKS: dict[str, Callable[[object], str | None]] = {
    "preset": lambda v: None if v in PRESETS else f"one of {', '.join(PRESETS)}",
    "wire-dtype": lambda v: None if v in WIRE_DTYPES else f"one of {', '.join(WIRE_DTYPES)}",
    "stage1-rounds": _at_least(1),
    "stage2-rounds": _at_least(0, " (0 = stage 1 only)"),
    "local-epochs": _at_least(1),
    "fraction-train": _fraction(zero_ok=False),
    "fraction-evaluate": _fraction(zero_ok=True),        # 0 = no client evaluation
    "out-dir": _out_dir,
    "min-nodes": _at_least(1),
    "eval-fold": lambda v: None if 0 <= v <= 9 else "an LFW View 2 fold, 0..9",  # type: ignore
    "partition-scheme": lambda v: _one_of(_partition_schemes())(v),     # imported when used
    "partition-seed": _at_least(0),
    "max-identities": _at_least(0, " (0 = all identities)"),
    "server-eval-pairs": _at_least(0, " (0 = all pairs of the fold)"),
    "max-update-norm": _at_least(0, " (0 = off)"),
    "round-timeout": _positive_finite,
    "seed": _at_least(0),
    "dp-noise-multiplier": _at_least(0, " (0 = DP off)"),
    "dp-clipping-norm": _positive_finite,
    "dp-target-delta": _delta,
    "dp-max-epsilon": _at_least(0, " (0 = no cap)"),
    "max-num-examples": _at_least(1),
    "max-weight-ratio": _weight_ratio,
}


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
