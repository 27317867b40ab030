"""An int8 f_p for a bundle's server half, measured before it may be served.

`minusfed bundle int8 BUNDLE --data LFW` needs both halves (g to make X_p, f_p to quantize) and
the run's held-out LFW fold, so the party that holds a run's final/ (the server operator, who
already scored those pairs to calibrate the thresholds) runs it once:

1. calibration: X_p of faces from the *other* folds' pairs (never the evaluation images), both
   views, fresh CSPRNG permutations -> activation ranges (minusface.int8.calibrate);
2. the int8 model is rebuilt from the stored ranges, exactly as the service will build it;
3. the held-out pairs are protected once, and float32 and int8 f_p embed the *same* X_p, so the
   accuracy difference is the quantization's alone (no permutation noise between them);
4. int8 thresholds at FAR 1e-2 / 1e-3 are calibrated on the int8 scores; both models are timed
   on this machine, alternating.

server/int8.json records all of it and `accepted` (the int8 accuracy is at most
MAX_DROP_POINTS below float32's); `minusfed serve --int8` refuses a bundle without it or not
accepted.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minusface import int8
from minusface.atomic import write_atomic
from minusface.eval import pair_scores, verification_metrics
from minusface.frontend import MinusFaceFrontend
from minusface.precision import time_alternating
from task.bundle import (
    SERVER,
    BundleError,
    ServerBundle,
    check_thresholds,
    json_bytes,
    read_json,
    read_server,
    read_site,
    read_tensors,
)

INT8_FILE, INT8_JSON = "recognizer-int8.safetensors", "int8.json"
MAX_DROP_POINTS = 0.2            # issue: int8 is offered when it keeps LFW accuracy within this
CALIBRATION_FACES = 256          # faces (x 2 views) whose X_p set the activation ranges
BATCH = 32


@dataclass
class Int8Server:
    """A server half's int8 f_p, ready to embed, with its own thresholds."""
    model: torch.nn.Module
    info: dict

    def threshold(self, far: str) -> float:
        value = self.info["thresholds"][far]["threshold"]
        return math.inf if value is None else float(value)


def _server_dir(bundle: str | Path) -> Path:
    path = Path(bundle)
    return path / SERVER if (path / SERVER / "server.json").exists() else path


def _protected_views(frontend: MinusFaceFrontend, faces: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3, 112, 112): each face and its mirror, each with its own fresh permutation."""
    out = []
    with torch.no_grad():
        for i in range(0, len(faces), BATCH):
            x = faces[i:i + BATCH]
            views = [frontend.protect(v, register=False) for v in (x, torch.flip(x, dims=(3,)))]
            out.append(torch.stack(views, dim=1))
    return torch.cat(out)


def _embed(model: torch.nn.Module, views: torch.Tensor) -> torch.Tensor:
    """normalise(f(face) + f(mirror)) per face, as the service and the server evaluation do."""
    out = []
    with torch.no_grad():
        for i in range(0, len(views), BATCH):
            v = views[i:i + BATCH]
            e = model(v.flatten(0, 1)).float().view(len(v), 2, -1).sum(1)
            out.append(F.normalize(e, dim=1))
    return torch.cat(out)


def _calibration_faces(lfw_root: Path, fold: int, held_out: set[str], n: int) -> torch.Tensor:
    from clients.data import FaceDataset, pair_index, read_pairs

    pairs = [p for p in read_pairs(lfw_root / "pairs.txt") if p.fold != fold]
    paths, _, _ = pair_index(pairs)
    paths = [p for p in paths if str(p) not in held_out][:n]
    if not paths:
        raise BundleError(f"{lfw_root}: no faces outside fold {fold} to calibrate int8 on")
    return torch.cat(list(FaceDataset([(p, 0) for p in paths], progress=False).batches(64)))


def _summary(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict:
    m = verification_metrics(scores, same, folds=folds)
    return {"accuracy": m["accuracy"], "accuracy_std": m["accuracy_std"], "auc": m["auc"],
            "tar_at_far_1e-2": m["tar_at_far"][0.01]["tar"],
            "tar_at_far_1e-3": m["tar_at_far"][0.001]["tar"]}


def _timing(f32: torch.nn.Module, q: torch.nn.Module, sample: torch.Tensor) -> dict:
    out = {}
    with torch.no_grad():
        for batch in (1, BATCH):
            x = sample[:batch]
            ms = time_alternating({"float32": lambda x=x: f32(x), "int8": lambda x=x: q(x)},
                                  iters=5, warmup=1)
            out[f"batch-{batch}"] = {"float32-ms-per-image": ms["float32"] / len(x),
                                     "int8-ms-per-image": ms["int8"] / len(x),
                                     "speed-up": ms["float32"] / ms["int8"]}
    return out


def quantize_bundle(bundle: str | Path, lfw_root: str | Path, fold: int | None = None,
                    max_pairs: int = 0, calibration_faces: int = CALIBRATION_FACES,
                    overwrite: bool = False) -> dict:
    """Write server/recognizer-int8.safetensors and server/int8.json; returns the json."""
    server_dir, lfw_root = _server_dir(bundle), Path(lfw_root)
    out_file, out_json = server_dir / INT8_FILE, server_dir / INT8_JSON
    if not overwrite and (out_file.exists() or out_json.exists()):
        raise BundleError(f"{out_json}: exists; pass --overwrite to measure and replace it")
    server, site = read_server(server_dir), read_site(Path(bundle))
    if fold is None:
        fold = (server.info.get("calibration") or {}).get("eval-fold")
        if not isinstance(fold, int):
            raise BundleError(f"{server_dir / 'server.json'}: no calibration eval-fold recorded; "
                              "pass --fold (the LFW fold no site trained on)")
    # Flower's logger and the LFW reader: only here, not in the service's import path
    from clients.data import pair_index, read_pairs
    from federation.server_eval import ServerEvaluator
    from federation.service.run_bundle import calibrate as calibrate_thresholds

    held = ServerEvaluator(lfw_root, fold, max_pairs)
    frontend = MinusFaceFrontend(generator=site.generator).eval()
    f32 = server.recognizer.eval()
    held_paths = {str(p) for p in pair_index([p for p in read_pairs(lfw_root / "pairs.txt")
                                              if p.fold == fold])[0]}
    cal_views = _protected_views(frontend, _calibration_faces(lfw_root, fold, held_paths,
                                                              calibration_faces))
    observers = int8.calibrate(f32, (cal_views[i:i + BATCH].flatten(0, 1)
                                     for i in range(0, len(cal_views), BATCH)))
    q = int8.build(f32, observers)                   # as the service will build it
    views = _protected_views(frontend, held.faces)
    e32, e8 = _embed(f32, views), _embed(q, views)
    cos = (e32 * e8).sum(1)
    s32 = pair_scores(e32[held.idx_a], e32[held.idx_b])
    s8 = pair_scores(e8[held.idx_a], e8[held.idx_b])
    same = held.same.astype(bool)
    m32, m8 = _summary(s32, same, held.folds), _summary(s8, same, held.folds)
    drop = 100 * (m32["accuracy"] - m8["accuracy"])
    info = {
        "format": "minusfed-int8", "engine": int8.ENGINE, "torch": torch.__version__,
        "calibration": {"faces": len(cal_views), "views": 2, "source": str(lfw_root),
                        "folds": f"all but {fold}"},
        "evaluation": {"eval-fold": fold, "pairs": int(len(same)), "float32": m32, "int8": m8,
                       "accuracy-drop-points": drop,
                       "embedding-cosine": {"min": float(cos.min()), "median": float(cos.median())}},
        "max-drop-points": MAX_DROP_POINTS, "accepted": bool(drop <= MAX_DROP_POINTS),
        "thresholds": calibrate_thresholds(s8, same),
        "timing": {"machine": platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads(), **_timing(f32, q, views.flatten(0, 1))},
    }
    from safetensors.torch import save

    data = save(observers, metadata={"format": "minusfed-int8"})
    write_atomic(out_file, lambda f: f.write(data))
    text = json_bytes(info)
    write_atomic(out_json, lambda f: f.write(text))
    return info


def read_int8(server: ServerBundle) -> Int8Server:
    """The int8 f_p of a server half, refused when it was not measured or lost too much."""
    path = server.path / INT8_JSON
    if not path.is_file():
        raise BundleError(f"{path}: not found; make it with `minusfed bundle int8 BUNDLE --data "
                          "LFW` (it measures the int8 f_p's accuracy before it may be served)")
    info = read_json(path)
    if info.get("format") != "minusfed-int8":
        raise BundleError(f"{path}: 'format' should be 'minusfed-int8'")
    if info.get("accepted") is not True:
        ev = info.get("evaluation", {})
        raise BundleError(f"{path}: not accepted: int8 lost {ev.get('accuracy-drop-points')} "
                          f"accuracy points on {ev.get('pairs')} held-out pairs (limit "
                          f"{info.get('max-drop-points', MAX_DROP_POINTS)}); serve float32")
    info["thresholds"] = check_thresholds(info.get("thresholds"), str(path))
    observers = read_tensors(server.path / INT8_FILE)
    try:
        model = int8.build(server.recognizer, observers)
    except int8.Int8Error as e:
        raise BundleError(f"{server.path / INT8_FILE}: {e}") from e
    return Int8Server(model, info)
