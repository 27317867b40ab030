"""ONNX export of a bundle: the site's front end and the server's f_p, checked with onnxruntime.

    OUT/site/residue.onnx       faces (N, 3, 112, 112) in [-1, 1] -> r = e(X) - g(e(X)), (N, 192, 112, 112)
    OUT/site/decode.onnx        shuffled r (N, 192, 112, 112) -> X_p (N, 3, 112, 112) in [0, 1]
    OUT/server/recognizer.onnx  X_p (N, 3, 112, 112) in [0, 1] -> embedding (N, 512)
    OUT/export.json             files, sha256, inputs/outputs, and the check against PyTorch

The site graph stops before the shuffle on purpose: the secret permutation s(.; theta) is drawn
in the site's own runtime from the operating system's CSPRNG for every image, so no exported
file holds or fixes one (`OnnxSiteRuntime` shows the three steps).  The export uses PyTorch's
TorchScript-based exporter (`dynamo=False`: the dynamo exporter needs `onnxscript`, which
minusfed does not install) at opset 17, in float32, with a dynamic batch axis.  Needs the
`export` extra (onnx, onnxruntime); Flower-free.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minusface.atomic import write_atomic
from minusface.dct import decode
from minusface.frontend import MinusFaceFrontend
from minusface.shuffle import csprng_permutations
from task.bundle import SERVER, SITE, ServerBundle, SiteBundle

OPSET = 17
RESIDUE, DECODE, RECOGNIZER = "residue.onnx", "decode.onnx", "recognizer.onnx"
EXPORT_JSON = "export.json"
FORMAT = "minusfed-onnx-export"


class ExportError(RuntimeError):
    """The export could not be written or does not reproduce PyTorch."""


class _Residue(nn.Module):
    def __init__(self, frontend: MinusFaceFrontend) -> None:
        super().__init__()
        self.frontend = frontend

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return self.frontend.residue(faces)


class _Decode(nn.Module):
    def forward(self, residue: torch.Tensor) -> torch.Tensor:
        return decode(residue)


def _onnx_bytes(model: nn.Module, example: torch.Tensor, input_name: str, output_name: str) -> bytes:
    import onnx

    model.eval()
    with torch.no_grad():
        model(example)                # fills the DCT's cached constants outside the trace
        buf = io.BytesIO()
        with warnings.catch_warnings():     # the tracer's notes on constants are expected here
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=[input_name], output_names=[output_name],
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    return data


def _session(data: bytes | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    source = str(data) if isinstance(data, Path) else data
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def _run(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})[0]


@dataclass
class OnnxSiteRuntime:
    """protect() with onnxruntime: residue graph, CSPRNG channel shuffle, decode graph."""
    residue: object
    decode: object

    @classmethod
    def load(cls, site_dir: str | os.PathLike) -> OnnxSiteRuntime:
        site_dir = Path(site_dir)
        return cls(_session(site_dir / RESIDUE), _session(site_dir / DECODE))

    def protect(self, faces: np.ndarray, permutations: np.ndarray | None = None) -> np.ndarray:
        """X_p for faces (N, 3, 112, 112) in [-1, 1]; fresh CSPRNG permutations unless the
        caller passes them (for checks only: a deployment never fixes theta)."""
        r = _run(self.residue, faces)
        perm = csprng_permutations(len(r), r.shape[1]).numpy() if permutations is None else permutations
        shuffled = np.take_along_axis(r, perm[:, :, None, None], axis=1)
        return _run(self.decode, shuffled)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def check_export(graphs: dict[str, bytes], site: SiteBundle | None, server: ServerBundle | None,
                 faces: torch.Tensor) -> dict:
    """Each graph against PyTorch on `faces` (N, 3, 112, 112) in [-1, 1], and the whole path:
    ONNX protect with the same permutations as PyTorch, then f_p's embeddings."""
    out: dict = {"faces": int(faces.shape[0])}
    x = faces.float().numpy()
    xp_torch = None
    if site is not None:
        frontend = MinusFaceFrontend(generator=site.generator).eval()
        runtime = OnnxSiteRuntime(_session(graphs[RESIDUE]), _session(graphs[DECODE]))
        perm = csprng_permutations(len(x), 192).numpy()
        with torch.no_grad():
            r_torch = frontend.residue(faces.float())
            shuffled = torch.from_numpy(np.take_along_axis(r_torch.numpy(), perm[:, :, None, None], 1))
            xp_torch = decode(shuffled)
        r_onnx = _run(runtime.residue, x)
        scale = float(np.max(np.abs(r_torch.numpy())))
        out["residue_max_abs_diff"] = _max_abs(r_onnx, r_torch.numpy())
        out["residue_max_abs"] = scale
        out["decode_max_abs_diff"] = _max_abs(_run(runtime.decode, shuffled.numpy()), xp_torch.numpy())
        out["protect_max_abs_diff"] = _max_abs(runtime.protect(x, perm), xp_torch.numpy())
    if server is not None:
        xp = xp_torch if xp_torch is not None else (faces.float() * 0.5 + 0.5)
        with torch.no_grad():
            emb_torch = server.recognizer.eval()(xp).numpy()
        emb_onnx = _run(_session(graphs[RECOGNIZER]), xp.numpy())
        out["embedding_max_abs_diff"] = _max_abs(emb_onnx, emb_torch)
        cos = np.sum(emb_onnx * emb_torch, 1) / (np.linalg.norm(emb_onnx, axis=1)
                                                 * np.linalg.norm(emb_torch, axis=1))
        out["embedding_min_cosine"] = float(np.min(cos))
    return out


# Bounds the check must meet: r spans hundreds (Y plane 0..255 in DCT units), so its bound is
# relative; X_p is in [0, 1] (1/255 is one grey level); embeddings are compared by cosine.
RESIDUE_REL_TOL, XP_TOL, COSINE_MIN = 1e-5, 1e-3, 0.9999


def _check_bounds(check: dict) -> list[str]:
    bad = []
    if "residue_max_abs_diff" in check and \
            check["residue_max_abs_diff"] > RESIDUE_REL_TOL * max(check["residue_max_abs"], 1.0):
        bad.append(f"residue differs by {check['residue_max_abs_diff']:.3g} "
                   f"(bound {RESIDUE_REL_TOL} x {check['residue_max_abs']:.3g})")
    for key in ("decode_max_abs_diff", "protect_max_abs_diff"):
        if key in check and check[key] > XP_TOL:
            bad.append(f"{key} {check[key]:.3g} > {XP_TOL}")
    if "embedding_min_cosine" in check and check["embedding_min_cosine"] < COSINE_MIN:
        bad.append(f"embedding cosine {check['embedding_min_cosine']:.6f} < {COSINE_MIN}")
    return bad


def export_bundle(out: str | os.PathLike, site: SiteBundle | None, server: ServerBundle | None,
                  faces: torch.Tensor, faces_source: str, overwrite: bool = False,
                  progress: Callable[[str], None] = lambda _: None) -> dict:
    """Write the ONNX graphs of the given halves into `out` after checking them against PyTorch
    on `faces`; nothing is written when a check fails or a file exists (unless `overwrite`)."""
    if site is None and server is None:
        raise ExportError("nothing to export: give a bundle with a site/ or server/ half")
    out = Path(out)
    graphs: dict[str, bytes] = {}
    paths: dict[str, Path] = {}
    example = torch.zeros(1, 3, 112, 112)
    if site is not None:
        progress("exporting g's residue graph (e, g, subtraction)")
        frontend = MinusFaceFrontend(generator=site.generator).eval()
        graphs[RESIDUE] = _onnx_bytes(_Residue(frontend), example, "faces", "residue")
        graphs[DECODE] = _onnx_bytes(_Decode(), torch.zeros(1, 192, 112, 112), "residue", "protected")
        paths[RESIDUE], paths[DECODE] = out / SITE / RESIDUE, out / SITE / DECODE
    if server is not None:
        progress("exporting f_p")
        graphs[RECOGNIZER] = _onnx_bytes(server.recognizer, example, "protected", "embedding")
        paths[RECOGNIZER] = out / SERVER / RECOGNIZER
    progress(f"checking against PyTorch on {faces.shape[0]} face(s)")
    check = check_export(graphs, site, server, faces)
    problems = _check_bounds(check)
    if problems:
        raise ExportError("the ONNX graphs do not reproduce PyTorch: " + "; ".join(problems)
                          + "; nothing was written")
    manifest = {"format": FORMAT, "opset": OPSET, "torch": torch.__version__,
                "check": {**check, "faces_source": faces_source},
                "bounds": {"residue_relative": RESIDUE_REL_TOL, "xp_abs": XP_TOL,
                           "embedding_cosine": COSINE_MIN},
                "shuffle": "not exported: draw one permutation of the 192 residue channels per "
                           "image from the OS CSPRNG between residue.onnx and decode.onnx",
                "files": {str(paths[name].relative_to(out)): {"sha256": _sha256(data),
                                                             "bytes": len(data)}
                          for name, data in graphs.items()}}
    targets = [*paths.values(), out / EXPORT_JSON]
    existing = [str(p) for p in targets if os.path.lexists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"export files already exist: {', '.join(existing)}; nothing was "
                              "written (choose another folder)")
    for name, data in graphs.items():
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        write_atomic(paths[name], lambda f, data=data: f.write(data))
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_atomic(out / EXPORT_JSON, lambda f: f.write(text.encode("utf-8")))
    return manifest
