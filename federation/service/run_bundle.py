"""The bundle a federated run leaves: its final/ weights, metrics and scores -> task.bundle.

The ServerApp calls `write_run_bundle(out_dir)` after writing final/generator.pt and
final/models.pt; `minusfed bundle from-run RUN_DIR` calls the same function for runs made before
bundles existed.  The cosine thresholds come from the last server-side evaluation's pair scores
(server_scores.json) when that evaluation scored the final f_p; otherwise (older runs) the
held-out pairs are scored again here, exactly as the ServerApp scores them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from federation.report import load_server_scores
from minusface.backbones import build_backbone
from minusface.eval import FAR_TARGETS, tar_at_far
from minusface.presets import Preset
from minusface.weights import WeightsError, load_generator
from task.bundle import FAR_KEYS, BundleError, write_bundle
from task.records import STAGE2
from task.wire import unflatten

FINAL = "final"


def _load_models(path: Path) -> dict:
    if not path.is_file():
        raise BundleError(f"{path}: not found (expected the final/models.pt a run writes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise BundleError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("preset-fields"), dict):
        raise BundleError(f"{path}: expected the dict minusfed's ServerApp writes (keys stage1, "
                          f"stage2, preset-fields, meta), found "
                          f"{list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__}")
    return obj


def _last_server_eval(run_dir: Path) -> dict:
    """The last metrics.jsonl line with a server-side evaluation, as {metric: value}."""
    path = run_dir / "metrics.jsonl"
    last: dict = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            m = rec.get("metrics") if isinstance(rec, dict) else None
            if isinstance(m, dict) and "server_accuracy" in m:
                last = {"round": rec.get("round"), "stage": rec.get("stage"),
                        **{k: m[k] for k in m if k.startswith("server_")}}
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in last.items()}


def calibrate(scores: np.ndarray, same: np.ndarray) -> dict[str, dict]:
    """Cosine thresholds at FAR 1e-2 and 1e-3 on held-out pair scores (`tar_at_far`): +inf
    when the pairs hold too few negatives to accept any (stated in its note)."""
    out = {}
    for key, far in zip(FAR_KEYS, FAR_TARGETS):
        r = tar_at_far(scores, same, far)
        thr = float(r["threshold"])
        out[key] = {**r, "threshold": thr if math.isfinite(thr) else None,
                    "pairs": int(len(scores))}
    return out


def _rescore(run_dir: Path, run_cfg: dict, preset: Preset, generator_state: dict,
             stage2: dict) -> tuple[np.ndarray, np.ndarray]:
    """The run's held-out pairs scored again as the ServerApp scores them: every face (and
    its mirror) protected with a fresh permutation by g, embedded by f_p, cosine per pair."""
    from federation.server_eval import ServerEvaluator
    from minusface.eval import embed, pair_scores
    from minusface.frontend import MinusFaceFrontend
    from minusface.weights import build_generator
    from task.config import resolve_data_path

    try:
        data = resolve_data_path(str(run_cfg.get("data-path", "")))
    except FileNotFoundError as e:
        raise BundleError(f"{run_dir}: no held-out pairs to calibrate the verification "
                          f"thresholds ({e}); the bundle needs an LFW folder at the server "
                          "(run config data-path)") from None
    pairs = ServerEvaluator(data, int(run_cfg.get("eval-fold", 0)),
                            int(run_cfg.get("server-eval-pairs", 0)))
    frontend = MinusFaceFrontend(generator=build_generator(generator_state)).eval()
    recognizer = build_backbone(preset.backbone, 3, width=preset.backbone_width)
    recognizer.load_state_dict(unflatten(stage2, "recognizer"), strict=True)
    emb = embed(recognizer, pairs.faces, batch_size=32, flip=True, device=torch.device("cpu"),
                transform=lambda x: frontend.protect(x, register=False))
    scores = pair_scores(emb[pairs.idx_a], emb[pairs.idx_b])
    if not np.isfinite(scores).all():
        raise BundleError(f"{run_dir}: the final f_p gives non-finite embeddings on the "
                          "held-out pairs; no threshold can be calibrated")
    return scores, pairs.same.astype(bool)


def _privacy(run_dir: Path) -> dict | None:
    path = run_dir / "privacy" / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return {"error": f"{path}: unreadable ({e})"}


def write_run_bundle(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                     overwrite: bool = False) -> Path:
    """Bundle the run in `run_dir` into `out` (default RUN_DIR/final).  Nothing existing is
    replaced unless `overwrite` (the ServerApp's own final/, rewritten on resume)."""
    run_dir = Path(run_dir)
    final = run_dir / FINAL
    models = _load_models(final / "models.pt")
    try:
        generator = load_generator(final / "generator.pt")
    except WeightsError as e:
        raise BundleError(str(e)) from e
    meta = models.get("meta") if isinstance(models.get("meta"), dict) else {}
    fields = dict(models["preset-fields"])
    fields["milestones"] = tuple(fields.get("milestones", ()))
    preset = Preset(**fields)
    cfg_path = run_dir / "run_config.json"
    run_cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    completed = sum(int(meta.get(f"{s}-rounds-completed", 0) or 0) for s in ("stage1", "stage2"))
    card = {"preset": preset.name, "commit": meta.get("commit"), "written-at": meta.get("written-at"),
            "source": str(run_dir),
            "rounds": {k.removesuffix("-rounds").replace("-rounds-", "-"): v
                       for k, v in meta.items() if "rounds" in k},
            "data": {"data-path": run_cfg.get("data-path"), "eval-fold": run_cfg.get("eval-fold"),
                     "num-clients": run_cfg.get("num-clients"),
                     "partition-scheme": run_cfg.get("partition-scheme"),
                     "max-identities": run_cfg.get("max-identities")},
            "server-eval": _last_server_eval(run_dir), "privacy": _privacy(run_dir),
            "run-config": run_cfg, "preset-fields": {k: v for k, v in models["preset-fields"].items()}}
    stage2 = models.get("stage2")
    server_info = recognizer = None
    if isinstance(stage2, dict) and stage2:
        saved = load_server_scores(run_dir)
        if (saved is not None and saved["stage"] == STAGE2 and completed
                and saved["round"] == completed):
            scores, same, source = saved["scores"], saved["same"], "server_scores.json"
        else:
            scores, same = _rescore(run_dir, run_cfg, preset, generator.state_dict(), stage2)
            source = "re-scored by bundle from-run"
        thresholds = calibrate(scores, same)
        card["thresholds"] = thresholds
        card["calibration"] = {"pairs": int(len(scores)), "source": source,
                               "eval-fold": run_cfg.get("eval-fold")}
        recognizer = unflatten(stage2, "recognizer")
        server_info = {"backbone": preset.backbone, "backbone-width": preset.backbone_width,
                       "thresholds": thresholds, "calibration": card["calibration"]}
    return write_bundle(final if out is None else Path(out), generator, recognizer, server_info,
                        card, overwrite=overwrite)
