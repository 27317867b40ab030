"""Start a run from a trained bundle (run config `init-bundle`): g frozen, f_p fine-tuned.

A bundle (a run's final/, or one a team keeps under models/) holds g and f_p, not stage 1's
192-channel f, so a run started from one has no stage 1: the bundle's g is frozen exactly as a
run freezes its own g after stage 1, and stage 2 (federated or pooled) starts from the bundle's
f_p instead of a fresh one.  That is how a federation adds sites or data to a trained model, and
how `make demo` shows a trained model instead of a smoke-sized one.

The run's preset must build the bundle's architectures (g's width, f_p's backbone and width);
`run_config_for` gives the run-config keys that do.  What the run started from (path, the
bundle's card summary, and the server-side benchmark of the bundle as loaded) goes into
OUT/init_bundle.json, which the report shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minusface.atomic import write_atomic
from minusface.presets import PRESETS, Preset
from task.bundle import BundleError, read_card, read_server, read_site
from task.models import GENERATOR
from task.wire import flatten

RECORD = "init_bundle.json"
ARCHITECTURE_KEYS = ("backbone", "backbone-width", "generator-width")


@dataclass
class InitBundle:
    """The arrays a run starts stage 2 from, and where they came from."""
    path: Path
    generator: dict[str, torch.Tensor]        # "generator.*": frozen for the whole run
    recognizer: dict[str, torch.Tensor]       # "recognizer.*": stage 2's starting f_p
    card: dict
    stage1_aggregated: int                    # g's training, inherited from the bundle
    summary: dict = field(default_factory=dict)


def _architecture_problem(path: Path, site_width: int, server_info: dict, preset: Preset,
                          suggestion: dict) -> str | None:
    have = {"generator-width": site_width, "backbone": server_info.get("backbone"),
            "backbone-width": server_info.get("backbone-width")}
    want = {"generator-width": preset.generator_width, "backbone": preset.backbone,
            "backbone-width": preset.backbone_width}
    wrong = [f"{k} {have[k]!r} (the run's preset {preset.name!r} gives {want[k]!r})"
             for k in ARCHITECTURE_KEYS if have[k] != want[k]]
    if not wrong:
        return None
    keys = " ".join(f"{k}={json.dumps(v)}" for k, v in suggestion.items())
    return (f"run config 'init-bundle': the bundle {path} holds {', '.join(wrong)}; run it with "
            f"the run config that builds its models ({keys})")


def run_config_for(bundle: str | Path) -> dict[str, object]:
    """Run-config keys that build the bundle's architectures: its preset, and the overrides
    its preset fields differ by (0 / "" where the preset's own value fits)."""
    card = read_card(Path(bundle))
    name = card.get("preset")
    if name not in PRESETS:
        raise BundleError(f"{Path(bundle) / 'card.json'}: 'preset' is {name!r}, expected one of "
                          f"{', '.join(PRESETS)}")
    fields = card.get("preset-fields") if isinstance(card.get("preset-fields"), dict) else {}
    base = PRESETS[name]
    out: dict[str, object] = {"preset": name}
    for key, attr in (("backbone", "backbone"), ("backbone-width", "backbone_width"),
                      ("generator-width", "generator_width")):
        value = fields.get(attr, getattr(base, attr))
        if value != getattr(base, attr) and value is not None:
            out[key] = value
    return out


def load_init_bundle(path: str | Path, preset: Preset) -> InitBundle:
    """Read and check the bundle at `path` (both halves); BundleError names what does not fit."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"run config 'init-bundle': {path} is not a folder (expected a bundle: "
                          "a run's final/ with site/ and server/ halves)")
    site, server = read_site(path), read_server(path)
    problem = _architecture_problem(path, site.generator.width, server.info, preset,
                                    run_config_for(path))
    if problem:
        raise BundleError(problem)
    card = read_card(path)
    rounds = card.get("rounds") if isinstance(card.get("rounds"), dict) else {}
    stage1 = rounds.get("stage1-aggregated")
    summary = {"path": str(path.resolve()), "preset": card.get("preset"),
               "smoke": bool(card.get("smoke")), "commit": card.get("commit"),
               "written-at": card.get("written-at"), "rounds": rounds,
               "server-eval": card.get("server-eval")}
    return InitBundle(path, flatten({GENERATOR: site.generator}),
                      flatten({"recognizer": server.recognizer}), card,
                      int(stage1) if isinstance(stage1, int) and stage1 >= 0 else 0, summary)


def record_start(out_dir: Path, init: InitBundle, as_loaded: dict) -> Path:
    """OUT/init_bundle.json: what the run started from and how it scored before round 1."""
    record = {**init.summary, "server-eval-as-loaded": as_loaded}
    path = out_dir / RECORD
    write_atomic(path, lambda f: f.write(json.dumps(record, indent=2, sort_keys=True,
                                                    default=str).encode("utf-8")))
    return path


def read_start(out_dir: Path) -> dict | None:
    """OUT/init_bundle.json, or None for a run that trained from scratch."""
    path = out_dir / RECORD
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None
