"""The model bundle: what a finished run hands to the two kinds of machine that use it.

A run's `final/` folder is a bundle with two halves that go to different places:

    BUNDLE/card.json, BUNDLE/CARD.md     the model card (run config, commit, rounds, data,
                                         server-side accuracy/AUC/TAR, privacy summary, preset)
    BUNDLE/site/site.json                 front-end settings a site needs to protect faces
    BUNDLE/site/generator.safetensors     g (the U-Net); never needed by the server
    BUNDLE/server/server.json             f_p's architecture, embedding size, calibrated
                                          cosine thresholds at FAR 1e-2 and 1e-3
    BUNDLE/server/recognizer.safetensors  f_p; never needed by a site
    BUNDLE/{site,server}/card.json        a copy of the card, so each half travels alone

Weights are safetensors (no pickle on load).  Reading validates everything and raises
`BundleError` naming the file and what was expected.  Flower-free: the recognition service,
the site client and the CLI all read bundles through this module.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minusface.atomic import write_atomic
from minusface.backbones import BACKBONES, build_backbone
from minusface.generator import UNetGenerator
from minusface.weights import WeightsError, build_generator

SITE_FORMAT = "minusfed-site-bundle"
SERVER_FORMAT = "minusfed-server-bundle"
VERSION = 1
SITE, SERVER = "site", "server"
CARD_JSON, CARD_MD = "card.json", "CARD.md"
SITE_JSON, SERVER_JSON = "site.json", "server.json"
GENERATOR_FILE, RECOGNIZER_FILE = "generator.safetensors", "recognizer.safetensors"
FAR_KEYS = ("1e-2", "1e-3")
SMOKE_PRESETS = frozenset({"tiny"})
XP_SHAPE = (3, 112, 112)
MAX_BACKBONE_WIDTH = 512           # paper: 64; more would allocate gigabytes before a check
MAX_JSON_BYTES = 4 * 1024 * 1024


class BundleError(ValueError):
    """A bundle file that is missing, unreadable or not what minusfed writes."""


@dataclass
class SiteBundle:
    """What a site loads: g and its settings."""
    path: Path
    generator: UNetGenerator
    info: dict
    card: dict

    @property
    def smoke(self) -> bool:
        return bool(self.info.get("smoke"))


@dataclass
class ServerBundle:
    """What the recognition server loads: f_p, its embedding size and thresholds."""
    path: Path
    recognizer: nn.Module
    info: dict
    card: dict

    @property
    def smoke(self) -> bool:
        return bool(self.info.get("smoke"))

    @property
    def embedding_size(self) -> int:
        return int(self.info["embedding-size"])

    def threshold(self, far: str) -> float:
        """The cosine threshold calibrated at FAR `far` ("1e-2" or "1e-3")."""
        if far not in FAR_KEYS:
            raise BundleError(f"{self.path / SERVER_JSON}: no threshold for FAR {far!r}; "
                              f"expected one of {', '.join(FAR_KEYS)}")
        value = self.info["thresholds"][far]["threshold"]
        return math.inf if value is None else float(value)


def is_smoke(preset: str) -> bool:
    return preset in SMOKE_PRESETS


def smoke_warning(info: Mapping, what: str) -> str | None:
    """A loud line for a bundle half made by a smoke preset, or None."""
    if not info.get("smoke"):
        return None
    return (f"this {what} comes from the smoke preset {info.get('preset')!r} "
            f"({info.get('rounds', '?')} round(s)): it is for tests only. Its g leaves faces "
            "visible in X_p and its f_p barely recognises anyone. Use a bundle trained with a "
            "real preset.")


# --------------------------------------------------------------------------- writing

def json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _tensor_bytes(state: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=dict(meta))


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"bundle files already exist: {', '.join(existing)}; nothing was "
                              "written (choose another folder)")


def check_thresholds(thresholds: Mapping, where: str) -> dict:
    """{"1e-2": {"threshold": float, ...}, "1e-3": {...}}: a finite cosine, or null when the
    calibration pairs could not resolve the FAR (no score passes it: nothing is accepted)."""
    if not isinstance(thresholds, Mapping):
        raise BundleError(f"{where}: 'thresholds' should be an object with keys "
                          f"{', '.join(FAR_KEYS)}")
    out = {}
    for key in FAR_KEYS:
        entry = thresholds.get(key)
        if not isinstance(entry, Mapping) or "threshold" not in entry:
            raise BundleError(f"{where}: 'thresholds'[{key!r}] should be an object with a "
                              "'threshold'")
        value = entry["threshold"]
        if value is None:                   # JSON has no +inf: the FAR could not be resolved
            out[key] = dict(entry)
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) \
                or not math.isfinite(value):
            raise BundleError(f"{where}: 'thresholds'[{key!r}]['threshold'] should be a number "
                              f"(a cosine threshold), found {value!r}")
        out[key] = dict(entry)
    return out


def write_bundle(out: str | os.PathLike, generator: UNetGenerator, recognizer_state:
                 Mapping[str, torch.Tensor] | None, server_info: Mapping | None, card: Mapping,
                 overwrite: bool = False) -> Path:
    """Write a bundle at `out` (created).  `recognizer_state` (f_p's state dict, no prefix) and
    `server_info` (backbone, backbone-width, thresholds, calibration) may be None for a run
    without stage 2: then only the site half is written.  Everything is checked and serialised
    before the first file is written (each file atomically), so a refusal leaves no half
    bundle.  Existing bundle files are refused unless `overwrite` (a run's own ServerApp
    rewrites its final/ when it resumes)."""
    out = Path(out)
    preset = str(card.get("preset", ""))
    common = {"version": VERSION, "preset": preset, "smoke": is_smoke(preset),
              "rounds": card.get("rounds", {}).get("stage1-aggregated")}
    card = {**card, "smoke": is_smoke(preset),
            "halves": [SITE] + ([SERVER] if recognizer_state is not None else [])}
    site_info = {**common, "format": SITE_FORMAT, "generator-width": generator.width,
                 "face-shape": list(XP_SHAPE), "face-range": [-1.0, 1.0],
                 "views": ["face", "mirror"]}
    files = {out / SITE / GENERATOR_FILE: _tensor_bytes(generator.state_dict(),
                                                        {"format": SITE_FORMAT}),
             out / SITE / SITE_JSON: json_bytes(site_info)}
    if recognizer_state is not None:
        if server_info is None:
            raise ValueError("write_bundle: recognizer_state needs server_info")
        info = {**common, **server_info, "format": SERVER_FORMAT, "in-channels": 3,
                "input-shape": list(XP_SHAPE), "input-range": [0.0, 1.0],
                "thresholds": check_thresholds(server_info.get("thresholds"), "server_info")}
        recognizer = _build_recognizer(info, "server_info")
        try:
            recognizer.load_state_dict(dict(recognizer_state), strict=True)
        except RuntimeError as e:
            raise BundleError(f"f_p weights do not fit {info['backbone']} of width "
                              f"{info.get('backbone-width')}: {str(e)[:300]}") from e
        info["embedding-size"] = _embedding_size(recognizer)
        files[out / SERVER / RECOGNIZER_FILE] = _tensor_bytes(recognizer_state,
                                                              {"format": SERVER_FORMAT})
        files[out / SERVER / SERVER_JSON] = json_bytes(info)
        files[out / SERVER / CARD_JSON] = json_bytes(card)
    files[out / SITE / CARD_JSON] = files[out / CARD_JSON] = json_bytes(card)
    files[out / CARD_MD] = card_markdown(card).encode("utf-8")
    _refuse_existing(list(files), overwrite)
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f, data=data: f.write(data))
    return out


def _embedding_size(recognizer: nn.Module) -> int:
    was = recognizer.training
    recognizer.eval()
    with torch.no_grad():
        size = int(recognizer(torch.zeros(1, *XP_SHAPE)).shape[1])
    recognizer.train(was)
    return size


# --------------------------------------------------------------------------- reading

def read_json(path: Path) -> dict:
    if not path.is_file():
        raise BundleError(f"{path}: not found (expected a file written by minusfed's bundle "
                          "writer; is this a bundle's site/ or server/ folder?)")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes, larger than any bundle file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(obj, dict):
        raise BundleError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _check_format(info: dict, path: Path, expected: str) -> None:
    if info.get("format") != expected:
        raise BundleError(f"{path}: 'format' is {info.get('format')!r}, expected {expected!r}")
    if info.get("version") != VERSION:
        raise BundleError(f"{path}: bundle version {info.get('version')!r}; this minusfed "
                          f"reads version {VERSION}")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise BundleError(f"{path}: not found (expected the weights of this bundle half)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: not a readable safetensors file ({e})") from e


def _check_finite(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise BundleError(f"{path}: tensor {key!r} holds NaN or infinite values (corrupt "
                              "file or diverged training)")


def read_card(bundle: str | os.PathLike) -> dict:
    """The card of a bundle folder or of one of its halves."""
    return read_json(Path(bundle) / CARD_JSON)


def read_site(path: str | os.PathLike) -> SiteBundle:
    """A bundle's site/ half (or the bundle folder holding it)."""
    path = Path(path)
    if not (path / SITE_JSON).exists() and (path / SITE / SITE_JSON).exists():
        path = path / SITE
    info = read_json(path / SITE_JSON)
    _check_format(info, path / SITE_JSON, SITE_FORMAT)
    weights = path / GENERATOR_FILE
    state = read_tensors(weights)
    try:
        generator = build_generator(state, where=str(weights))
    except WeightsError as e:
        raise BundleError(str(e)) from e
    if generator.width != info.get("generator-width"):
        raise BundleError(f"{path / SITE_JSON}: 'generator-width' is {info.get('generator-width')!r}"
                          f" but {weights} holds a generator of width {generator.width}")
    return SiteBundle(path, generator.eval(), info, read_json(path / CARD_JSON))


def _build_recognizer(info: Mapping, where: str) -> nn.Module:
    backbone, width = info.get("backbone"), info.get("backbone-width")
    if backbone not in BACKBONES:
        raise BundleError(f"{where}: 'backbone' is {backbone!r}, expected one of "
                          f"{', '.join(BACKBONES)}")
    if width is not None and (not isinstance(width, int) or not 1 <= width <= MAX_BACKBONE_WIDTH):
        raise BundleError(f"{where}: 'backbone-width' is {width!r}, expected an integer in "
                          f"1..{MAX_BACKBONE_WIDTH} (or null for mobilefacenet)")
    try:
        return build_backbone(backbone, 3, width=width)
    except ValueError as e:
        raise BundleError(f"{where}: {e}") from e


def read_server(path: str | os.PathLike) -> ServerBundle:
    """A bundle's server/ half (or the bundle folder holding it): f_p in eval mode."""
    path = Path(path)
    if not (path / SERVER_JSON).exists() and (path / SERVER / SERVER_JSON).exists():
        path = path / SERVER
    where = path / SERVER_JSON
    info = read_json(where)
    _check_format(info, where, SERVER_FORMAT)
    info["thresholds"] = check_thresholds(info.get("thresholds"), str(where))
    size = info.get("embedding-size")
    if not isinstance(size, int) or size < 1:
        raise BundleError(f"{where}: 'embedding-size' is {size!r}, expected a positive integer")
    weights = path / RECOGNIZER_FILE
    state = read_tensors(weights)
    _check_finite(weights, state)
    recognizer = _build_recognizer(info, str(where))
    try:
        recognizer.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:3]
        raise BundleError(f"{weights}: weights do not fit a {info['backbone']} of width "
                          f"{info.get('backbone-width')} ({' '.join(first)})") from e
    recognizer.eval()
    if _embedding_size(recognizer) != size:
        raise BundleError(f"{where}: 'embedding-size' is {size} but {weights} embeds to "
                          f"{_embedding_size(recognizer)}")
    return ServerBundle(path, recognizer, info, read_json(path / CARD_JSON))


# --------------------------------------------------------------------------- the card

def _fmt(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return "n/a" if value is None else str(value)


def card_markdown(card: Mapping) -> str:
    """CARD.md: the card for people; every number also in card.json."""
    lines = [f"# minusfed model card{' (SMOKE TEST BUNDLE)' if card.get('smoke') else ''}", ""]
    if card.get("smoke"):
        lines += [f"**Smoke preset {card.get('preset')!r}: for tests only.** Its g leaves faces "
                  "visible in X_p; do not deploy it.", ""]
    lines += ["| field | value |", "|---|---|"]
    for key in ("preset", "commit", "written-at", "source", "halves"):
        lines.append(f"| {key} | {_fmt(card.get(key))} |")
    rounds = card.get("rounds", {})
    for key in sorted(rounds):
        lines.append(f"| rounds {key} | {_fmt(rounds[key])} |")
    data = card.get("data", {})
    for key in sorted(data):
        lines.append(f"| data {key} | {_fmt(data[key])} |")
    ev = card.get("server-eval") or {}
    if ev:
        lines += ["", "## Server-side evaluation (held-out LFW View 2 fold, X_p with fresh "
                  "permutations, flip TTA)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(ev.items())]
    thr = card.get("thresholds") or {}
    if thr:
        lines += ["", "## Cosine thresholds (calibrated on the held-out pairs)", "",
                  "| FAR | threshold | TAR | achieved FAR | negatives | note |",
                  "|---|---|---|---|---|---|"]
        for far, t in sorted(thr.items()):
            shown = ("none (accepts nothing)" if t.get("threshold") is None
                     else _fmt(t.get("threshold")))
            lines.append(f"| {far} | {shown} | {_fmt(t.get('tar'))} | "
                         f"{_fmt(t.get('far'))} | {_fmt(t.get('n_negatives'))} | "
                         f"{t.get('note') or ''} |")
    privacy = card.get("privacy")
    lines += ["", "## Privacy evaluation", ""]
    lines.append("none recorded for this run" if not privacy else
                 "```json\n" + json.dumps(privacy, indent=2, sort_keys=True) + "\n```")
    lines += ["", "## Run config", "", "```json",
              json.dumps(card.get("run-config", {}), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)
