"""A site's privacy evaluation on its OWN faces (the "evaluate.privacy" Flower action).

The server sends the frozen global generator g (and, when it has one, the global stage-2
recognizer f_p); the site runs every attack of `privacy.report.evaluate_client` (pixel
inverters, linkage, fixed theta, update leakage / gradient inversion) locally and returns only
aggregate numbers: no images, no arrays, no identity names.

Where the attacker's auxiliary data comes from (honest and local): the site splits its OWN
identities, with a seeded permutation, into two disjoint halves:

  attacker-aux  floor(K / 2) identities: the attacker's (view, face) training pairs and the
                unprotected judge recognizer trained here (preset `judge_preset`), whose
                identities are therefore disjoint from the evaluated ones
  evaluated     the other ceil(K / 2) identities: the faces every attack is scored on

so no face of an evaluated identity is ever seen by an attacker model, and no face leaves the
site.  The attacker is thus weaker than one with a large public face set (it sees only K / 2
identities); the metric "aux-own-identities" = 1 records this choice in every reply.  A site with
fewer than 3 identities replies {"privacy-skipped": 1, "n-identities": K}.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Mapping

import numpy as np
import torch

from minusface.presets import Preset
from privacy.gates import CONSTANT_ROWS
from privacy.report import (
    FP_ROW,
    JUDGE_ROW,
    MAX_LOCAL_STEPS,
    PIXEL_ROWS,
    PRETRAINED_STUDENT_ROW,
    REGEN_ROW,
    STUDENT_ROW,
    XP_ROW,
    PrivacyConfig,
    get_privacy_config,
)
from task.models import generator_from_arrays

PIXEL_KEYS = ("ssim", "ms_ssim", "psnr", "n")
IDENTITY_KEYS = ("rank1", "auc", "accuracy", "tar@0.01", "tar@0.001", "genuine_cos", "n")
CI_ROWS, CI_KEYS = ("none", "minusface", FP_ROW), ("ssim", "psnr", "rank1", "auc")
METRIC_KEYS = (*dict.fromkeys((*PIXEL_KEYS, *IDENTITY_KEYS, "grad_cos")),
               *(f"{k}_{end}" for k in CI_KEYS for end in ("lo", "hi")))
# Rows evaluate_client / gradient_inversion.evaluate_gradient_inversion can produce, and the
# scalars flatten_metrics / site_privacy_metrics add: the outbound guard's allow-list for the
# privacy reply (`privacy_metric_names`; tests/test_guard.py checks a real reply against it).
REPORT_ROWS = (XP_ROW, REGEN_ROW, *PIXEL_ROWS, *CONSTANT_ROWS, JUDGE_ROW, FP_ROW, STUDENT_ROW,
               PRETRAINED_STUDENT_ROW)
GI_STEPS_PREFIXES = tuple(f"gi-steps{k}" for k in range(2, MAX_LOCAL_STEPS + 1))  # K steps
GI_ROWS = (*(f"{prefix}/{view}" for prefix in ("gi", "gi-probe")
             for view in ("none", "minusface", "minusface vs X_p", "minusface + inverter")),
           *(f"{prefix}/{view}" for prefix in GI_STEPS_PREFIXES
             for view in ("none", "minusface", "minusface vs X_p")),
           "reference: grey guess", "reference: grey guess vs X_p", "reference: random image")
SCALAR_KEYS = ("gi-batch-size", "n-eval-images", "n-eval-identities", "n-aux-images", "seconds",
               "aux-own-identities", "n-aux-identities", "privacy-skipped", "n-identities",
               "pixel-gate-passed", "judge-gate-passed", "gate-psnr", "gate-ssim",
               "judge-min-auc")


def privacy_config(base: str, overrides: Mapping[str, object] | None = None) -> PrivacyConfig:
    """Preset `base`, with any PrivacyConfig field given as "<field-with-dashes>": value."""
    config = get_privacy_config(base)
    changes = {}
    for f in dataclasses.fields(PrivacyConfig):
        key = f.name.replace("_", "-")
        if overrides and key in overrides and f.name != "name":
            value = overrides[key]
            default = getattr(config, f.name)
            if isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, int) and not isinstance(default, bool):
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
            elif default is None or isinstance(default, str):
                value = value if default is None else str(value)
            changes[f.name] = value
    return config.with_(**changes)


def split_identities(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(attacker-aux label ids, evaluated label ids): disjoint halves of the site's identities."""
    ids = np.unique(np.asarray(labels))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_aux = len(ids) // 2
    return np.sort(ids[order[:n_aux]]), np.sort(ids[order[n_aux:]])


def privacy_metric_names() -> frozenset[str]:
    """Every key a privacy reply may carry: "<row>/<metric>" for the known rows, plus scalars."""
    rows = (*REPORT_ROWS, *GI_ROWS)
    return frozenset({f"{row}/{k}" for row in rows for k in METRIC_KEYS} | set(SCALAR_KEYS))


def _number(v: object) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) \
        and bool(np.isfinite(v))


def flatten_metrics(result: dict) -> dict[str, float | int]:
    """evaluate_client's result -> {"<row>/<metric>": number} (numbers only, no strings).

    Pixel metrics, the cross-image identity metrics of each row (absent where refused or
    suppressed; "<row>/n" always says how many probes there were), 95 % interval ends
    ("<key>_lo" / "_hi") for the main rows, and the gate outcomes and thresholds."""
    out: dict[str, float | int] = {}
    for row, m in result.get("metrics", {}).items():
        for k in PIXEL_KEYS:
            if _number(m.get(k)):
                out[f"{row}/{k}"] = float(m[k])
        ident = m.get("identity")
        if isinstance(ident, dict):
            out[f"{row}/n"] = float(ident.get("n", 0))
            for k in IDENTITY_KEYS:
                if _number(ident.get(k)):
                    out[f"{row}/{k}"] = float(ident[k])
        if row in CI_ROWS:
            for k in CI_KEYS:
                ci = m.get(f"{k}_ci") or (ident or {}).get(f"{k}_ci")
                if ci:
                    out[f"{row}/{k}_lo"], out[f"{row}/{k}_hi"] = float(ci[0]), float(ci[1])
    gi = result.get("gradient_inversion")
    if gi:                                    # its rows are named "gi/...", "gi-probe/...", ...
        out["gi-batch-size"] = int(gi.get("batch_size", 0))
        for row, m in gi.get("metrics", {}).items():
            for k in ("ssim", "ms_ssim", "psnr", "grad_cos"):
                if _number(m.get(k)):
                    out[f"{row}/{k}"] = float(m[k])
    cfg = result.get("config", {})
    out.update({"n-eval-images": int(result["n_eval_images"]),
                "n-eval-identities": int(result["n_eval_identities"]),
                "n-aux-images": int(result["n_aux_images"]),
                "seconds": float(result["seconds"]),
                "pixel-gate-passed": int(bool(result.get("pixel_gate", {}).get("passed"))),
                "judge-gate-passed": int(bool(result.get("judge_gate", {}).get("passed"))),
                "gate-psnr": float(cfg.get("gate_psnr", math.nan)),
                "gate-ssim": float(cfg.get("gate_ssim", math.nan)),
                "judge-min-auc": float(cfg.get("judge_min_auc", math.nan))})
    return out


def site_privacy_metrics(images: np.ndarray, labels: np.ndarray,
                         generator: Mapping[str, torch.Tensor],
                         config: PrivacyConfig, *, seed: int = 0,
                         recognizer_state: Mapping | None = None,
                         recognizer_preset: Preset | None = None,
                         progress: bool = False) -> dict[str, float | int]:
    """All attacks on this site's faces; returns only numbers (see module docstring).

    ``images``: uint8 (N, 112, 112, 3); ``labels``: identity ids; ``generator``: the global g
    as sent, keys "generator.*" (the frozen-generator record); ``recognizer_state``: f_p's
    state dict (keys without "recognizer.") of architecture ``recognizer_preset`` (the run's
    preset with its overrides; default ``config.gi_preset``), or None for a fresh one of
    ``config.gi_preset``.
    """
    from minusface.backbones import build_backbone
    from minusface.frontend import MinusFaceFrontend
    from minusface.presets import get_preset
    from privacy.attacks import judge_embed_fn
    from privacy.judge import train_judge
    from privacy.report import evaluate_client

    labels = np.asarray(labels).ravel()
    aux_ids, eval_ids = split_identities(labels, seed)
    if len(aux_ids) < 1 or len(eval_ids) < 2:
        return {"privacy-skipped": 1, "n-identities": int(len(np.unique(labels)))}
    aux_mask, eval_mask = np.isin(labels, aux_ids), np.isin(labels, eval_ids)
    aux_images = images[aux_mask]
    _, aux_labels = np.unique(labels[aux_mask], return_inverse=True)

    frontend = MinusFaceFrontend(generator=generator_from_arrays(generator)).eval()
    gi_net, gi_info = None, ""
    if recognizer_state is not None:
        preset = recognizer_preset or get_preset(config.gi_preset)
        gi_net = build_backbone(preset.backbone, 3, width=preset.backbone_width)
        gi_net.load_state_dict(dict(recognizer_state))
        gi_info = "the global stage-2 recognizer f_p sent by the server"
    with tempfile.TemporaryDirectory(prefix="minusfed-privacy-") as tmp:
        judge = train_judge(aux_images, aux_labels.astype(np.int64), config, tmp, seed, progress)
    result = evaluate_client(frontend, images[eval_mask], labels[eval_mask], aux_images,
                             judge_embed_fn(judge), config, seed=seed, progress=progress,
                             judge_info="unprotected judge trained on the site's attacker-aux "
                                        "half", gi_recognizer=gi_net, gi_recognizer_info=gi_info,
                             judge_model=judge)
    out = flatten_metrics(result)
    out.update({"aux-own-identities": 1, "n-aux-identities": int(len(aux_ids))})
    return out


