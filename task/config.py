"""The run config: one typed, range-checked object read by the server, the sites and the tools.

pyproject.toml's [tool.flwr.app.config] is the one place that declares the keys `flwr run`
accepts and their defaults; `RunConfig` below gives each key a typed attribute (snake_case for
"kebab-case") and `run_config` checks every value.  The file is read from the checkout or Flower
app folder (pyproject.toml next to task/), or from the copy a wheel carries (task/pyproject.toml),
so an installed package sees the same defaults as `flwr run`.

Keys named like a field of `minusface.presets.Preset` (batch-size, lr, backbone, ...) override
that field of the chosen preset; their default, 0 or "", keeps the preset's value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from minusface.backbones import BACKBONES
from minusface.precision import MODES as CPU_PRECISIONS
from minusface.presets import PRESETS, Preset
from simulation.partition import SCHEMES
from task.records import STAGE2_MODES
from task.wire import WIRE_DTYPES

AGGREGATION_RULES = ("fedavg", "median", "trimmed-mean", "krum", "multi-krum")
AGGREGATION_BACKENDS = ("flower", "streaming", "ray")
WEIGHTINGS = ("num-examples", "equal")

Value = bool | int | float | str
_KEY = "run-config-key"        # field metadata: the key, where it is not the kebab-case name
_OVERRIDES = "preset-field"    # field metadata: the key overrides this Preset field when set


def _override() -> typing.Any:
    return field(metadata={_OVERRIDES: True})


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key as a typed attribute; build it with `run_config(raw)`."""

    preset_name: str = field(metadata={_KEY: "preset"})     # a name in minusface.presets.PRESETS
    stage1_rounds: int
    stage2_rounds: int                 # 0 = stage 1 only
    local_epochs: int
    fraction_train: float
    fraction_evaluate: float           # 0 = no client evaluation
    data_path: str                     # "" = $MINUSFED_DATA or the default data folder
    out_dir: str                       # "" = <cwd>/runs/flwr-run-<id>; else an absolute path
    min_nodes: int
    eval_fold: int                     # LFW View 2 fold of the server-side benchmark
    partition_scheme: str
    partition_seed: int
    max_identities: int                # 0 = all
    server_eval_pairs: int             # 0 = all pairs of the fold
    aggregation: str
    aggregation_backend: str
    max_update_norm: float             # 0 = off
    # seconds the server waits for replies in each phase of a round; sampled nodes that have
    # not replied by then are dropped (a killed node sooner, once it misses its heartbeats)
    round_timeout: float
    seed: int
    # floating-point weights on the wire, both ways (float16: half the bytes; the server keeps
    # a float32 master copy).  NumPy, and so Flower's ArrayRecord, has no bfloat16
    wire_dtype: str
    # CPU precision of protect(), training and evaluation (minusface/precision.py): "auto"
    # measures float32 vs bf16 per model and batch; $MINUSFED_CPU_PRECISION on a machine wins
    cpu_precision: str
    privacy_eval: bool                 # after training every site attacks its own faces
    # central DP (strategy/dp.py): noise multiplier z (0 = off), client clipping norm C,
    # accountant delta, stop before epsilon would exceed the cap (0 = no cap)
    dp_noise_multiplier: float
    dp_clipping_norm: float
    dp_target_delta: float
    dp_max_epsilon: float
    # FedAvg weights (strategy/aggregation.py): each site's claim or 1 each; a claim above
    # max-num-examples is rejected; weights clipped to max-weight-ratio x the median (0 = off)
    weighting: str
    max_num_examples: int
    max_weight_ratio: float
    # stage 2: "federated" (sites train f_p, FedAvg) or "pooled" (sites ship X_p with
    # pseudonymous labels, the server trains f_p on Ray Train: strategy/pooled_train.py)
    stage2_mode: str
    protect_copies: int                # X_p per training face a site ships (pooled)
    upload_chunk_images: int           # faces per upload message (x protect-copies X_p)
    pooled_workers: int                # Ray Train workers (DDP)
    pooled_gpus_per_worker: float      # 0 = CPU workers (gloo); else NCCL
    pooled_epochs: int                 # 0 = stage2-rounds x local-epochs
    # "" = train from scratch; else a bundle (absolute path): no stage 1, its g frozen, stage 2
    # fine-tunes its f_p (federation/init_bundle.py)
    init_bundle: str
    # preset overrides: 0 / "" = the preset's value
    backbone: str = _override()
    backbone_width: int = _override()
    generator_width: int = _override()
    batch_size: int = _override()
    lr: float = _override()
    max_images_per_identity: int = _override()

    def preset(self) -> Preset:
        """The named preset with this run's overrides applied."""
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.metadata.get(_OVERRIDES) and getattr(self, f.name)}
        preset = dataclasses.replace(PRESETS[self.preset_name], **changes)
        if preset.backbone == "mobilefacenet":          # a fixed width (minusface.backbones)
            preset = dataclasses.replace(preset, backbone_width=None)
        return preset

    def preset_overrides(self) -> dict[str, Value]:
        """The preset-override keys and their values (0 / "" = not overridden)."""
        return {_key(f): getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get(_OVERRIDES)}

    def to_flower(self) -> dict[str, Value]:
        """The kebab-case mapping `flwr run --run-config` and a Flower Context carry."""
        return {_key(f): getattr(self, f.name) for f in dataclasses.fields(self)}


def _key(f: dataclasses.Field) -> str:
    return str(f.metadata.get(_KEY, f.name.replace("_", "-")))


@cache
def key_types() -> dict[str, type]:
    """Run-config key -> the Python type its value must have."""
    hints = typing.get_type_hints(RunConfig)
    return {_key(f): hints[f.name] for f in dataclasses.fields(RunConfig)}


def pyproject_path() -> Path:
    """pyproject.toml that declares the run config: the wheel's copy first, then the one of the
    checkout or Flower app folder this package runs from."""
    here = Path(__file__).resolve()
    candidates = (here.with_name("pyproject.toml"), here.parents[1] / "pyproject.toml")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "no pyproject.toml declaring the run config: looked for "
        f"{' and '.join(str(p) for p in candidates)} (reinstall the package or the Flower app)")


@cache
def declared_defaults() -> dict[str, Value]:
    """[tool.flwr.app.config] of pyproject.toml: every key and its default."""
    path = pyproject_path()
    try:
        declared = tomllib.loads(path.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    except KeyError:
        raise ValueError(f"{path} has no [tool.flwr.app.config] table") from None
    missing = sorted(set(key_types()) - set(declared))
    extra = sorted(set(declared) - set(key_types()))
    if missing or extra:
        raise ValueError(f"{path} [tool.flwr.app.config] does not match task.config.RunConfig: "
                         f"missing {missing or 'none'}, not in RunConfig {extra or 'none'}")
    return dict(declared)


def run_config(raw: Mapping[str, object]) -> RunConfig:
    """pyproject.toml's defaults overlaid with `raw` (Flower's Context.run_config), checked.

    A clear error starting "run config 'KEY':" for an unknown key (ValueError, naming the valid
    keys), a mistyped value (TypeError) or an out-of-range one (ValueError)."""
    types = key_types()
    values: dict[str, object] = dict(declared_defaults())
    for key, value in raw.items():
        if key not in types:
            raise ValueError(f"run config {key!r}: unknown key; valid keys: {', '.join(types)}")
        values[key] = value
    for key, value in values.items():
        want = types[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = values[key] = float(value)
        if type(value) is not want:
            raise TypeError(f"run config {key!r}: expected {want.__name__}, got "
                            f"{value!r} ({type(value).__name__})")
    for key, check in _CHECKS.items():
        problem = check(values[key])
        if problem:
            raise ValueError(f"run config {key!r}: expected {problem}, got {values[key]!r}")
    if values["backbone-width"] and (values["backbone"] or PRESETS[str(values["preset"])].backbone
                                     ) == "mobilefacenet":
        raise ValueError(f"run config 'backbone-width': expected 0 with backbone mobilefacenet "
                         f"(its width is fixed), got {values['backbone-width']!r}")
    if values["init-bundle"] and values["stage2-rounds"] == 0:
        raise ValueError("run config 'stage2-rounds': expected >= 1 with init-bundle (a run "
                         "started from a bundle has no stage 1; stage 2 fine-tunes its f_p), "
                         "got 0")
    for key, normalize in _named_choices().items():
        try:
            values[key] = normalize(str(values[key]))
        except ValueError as exc:
            raise ValueError(f"run config {key!r}: {exc}") from None
    by_key = {_key(f): f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{by_key[k]: v for k, v in values.items()})


def _at_least(low: float, note: str = "") -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        ok = math.isfinite(value) and value >= low  # type: ignore[arg-type,operator]
        kind = "an integer" if isinstance(value, int) else "a finite number"
        return None if ok else f"{kind} >= {low:g}{note}"
    return check


def _fraction(zero_ok: bool) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        v = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(v) and (v >= 0 if zero_ok else v > 0) and v <= 1
        return None if ok else f"a fraction in {'[0' if zero_ok else '(0'}, 1]"
    return check


def _one_of(choices: tuple[str, ...], unset_ok: bool = False) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        ok = value in choices or (unset_ok and value == "")
        return None if ok else ('"" (the preset\'s) or ' if unset_ok else "") + \
            f"one of {', '.join(choices)}"
    return check


def _unset_or_at_least(low: int) -> Callable[[object], str | None]:
    """Preset overrides: 0 keeps the preset's value."""
    def check(value: object) -> str | None:
        v = float(value)  # type: ignore[arg-type]
        kind = "an integer" if isinstance(value, int) else "a finite number"
        ok = v == 0 or (math.isfinite(v) and v >= low)
        return None if ok else f"0 (the preset's) or {kind} {'>= ' + format(low, 'g') if low else '> 0'}"
    return check


def _out_dir(value: object) -> str | None:
    text = str(value)     # relative would depend on where the SuperLink/ServerApp happens to run
    ok = text == "" or Path(text).is_absolute()
    return None if ok else '"" (runs/flwr-run-<id>) or an absolute path'


def _init_bundle(value: object) -> str | None:
    text = str(value)     # read by the ServerApp, wherever the SuperLink happens to run it
    ok = text == "" or Path(text).is_absolute()
    return None if ok else '"" (train from scratch) or the absolute path of a bundle folder'


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
    "preset": _one_of(tuple(PRESETS)),
    "wire-dtype": _one_of(tuple(WIRE_DTYPES)),
    "cpu-precision": _one_of(CPU_PRECISIONS),
    "stage1-rounds": _at_least(1),
    "stage2-mode": _one_of(STAGE2_MODES),
    "protect-copies": lambda v: None if 1 <= v <= 16 else "an integer in 1..16",  # type: ignore
    "upload-chunk-images": lambda v: None if 1 <= v <= 1024 else "an integer in 1..1024",  # type: ignore
    "pooled-workers": _at_least(1),
    "pooled-gpus-per-worker": _at_least(0.0, " (0 = CPU workers)"),
    "pooled-epochs": _at_least(0, " (0 = stage2-rounds x local-epochs)"),
    "stage2-rounds": _at_least(0, " (0 = stage 1 only)"),
    "local-epochs": _at_least(1),
    "fraction-train": _fraction(zero_ok=False),
    "fraction-evaluate": _fraction(zero_ok=True),        # 0 = no client evaluation
    "out-dir": _out_dir,
    "init-bundle": _init_bundle,
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
    "backbone": _one_of(BACKBONES, unset_ok=True),
    "backbone-width": _unset_or_at_least(1),
    "generator-width": _unset_or_at_least(1),
    "batch-size": _unset_or_at_least(2),               # BatchNorm needs two faces per batch
    "lr": _unset_or_at_least(0),
    "max-images-per-identity": _unset_or_at_least(2),  # an identity needs two faces to train
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
