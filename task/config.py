"""The run config: every key's default and the check of every value.

pyproject.toml's [tool.flwr.app.config] declares the keys `flwr run` accepts; this module holds
their defaults and ranges.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from minusface.presets import PRESETS
from simulation.partition import SCHEMES
from task.wire import WIRE_DTYPES

AGGREGATION_RULES = ("fedavg", "median", "trimmed-mean", "krum", "multi-krum")
AGGREGATION_BACKENDS = ("flower", "streaming", "ray")
WEIGHTINGS = ("num-examples", "equal")

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


def _choice(kind: str, plural: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    """A normaliser that accepts "Trimmed_Mean" for "trimmed-mean" and rejects unknown names."""
    def normalize(value: str) -> str:
        name = value.strip().lower().replace("_", "-")
        if name not in choices:
            raise ValueError(f"Unknown {kind} {value!r}; {('valid ' + plural).strip()}: {', '.join(choices)}")
        return name
    return normalize


normalize_rule = _choice("aggregation rule", "rules", AGGREGATION_RULES)
normalize_backend = _choice("aggregation backend", "backends", AGGREGATION_BACKENDS)
normalize_weighting = _choice("weighting", "", WEIGHTINGS)


def _named_choices() -> dict[str, Callable[[str], str]]:
    """Keys normalised ("Trimmed_Mean" -> "trimmed-mean") after the range checks."""
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
    "partition-scheme": _one_of(tuple(SCHEMES)),
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


DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw_112_centercrop"


def resolve_data_path(configured: str) -> Path:
    """data-path from config, else $MINUSFED_DATA, else ../shared/data/lfw_112_centercrop next to
    the working directory (a managed SuperLink runs where `flwr run .` was started) or next to
    this checkout (the ServerApp itself runs from an installed copy under FLWR_HOME)."""
    raw = configured or os.environ.get("MINUSFED_DATA", "")
    if raw:
        candidates = [Path(raw).expanduser()]
    else:
        candidates = [Path.cwd().parent / "shared" / "data" / "lfw_112_centercrop", DEFAULT_DATA]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    raise FileNotFoundError(f"data-path {', '.join(str(p) for p in candidates)} is not a folder "
                            f"(set run config 'data-path' or MINUSFED_DATA to the face folder)")
