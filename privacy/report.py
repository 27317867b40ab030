"""Run the privacy attacks for one client and write the report (JSON, Markdown, PNG grids).

`evaluate_client` trains every attacker on the auxiliary faces only (identities disjoint from the
client's), then scores the client's faces:

  row                         attacker view                         attack
  none                        the face itself                       U-Net inverter (sanity ceiling)
  no-shuffle                  d(r)                                  U-Net inverter
  no-subtraction              d(s(e(X); theta))                     U-Net inverter
  minusface                   X_p, fresh CSPRNG theta               U-Net inverter (attacks 1/2)
  fixed-theta/same            X_p with one known theta              inverter trained on that theta (4a)
  fixed-theta/fresh           X_p, fresh CSPRNG theta               same inverter (4b)
  linkage                     X_p                                   FaceLinkGen-style student (attack 3)
  mean-face guess             -                                     the mean auxiliary face (reference)
  gradient inversion          -                                     not run (attack 5 not implemented)

Pixel metrics compare recovered faces with the originals; identity metrics use the judge
recognizer (recovered_i vs original_i genuine, other identities impostor; rank-1 in the gallery
of originals).  The linkage row scores student(X_p) against judge(original) instead.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from minusface.frontend import MinusFaceFrontend

from .attacks import (as_faces, random_permutation, recover, student_embed_fn, to_unit,
                      train_inverter, train_linkage_student, views_fn, views_from_residue)
from .metrics import identity_match, identity_match_embeddings, pixel_metrics

PIXEL_ROWS = ("none", "no-shuffle", "no-subtraction", "minusface", "fixed-theta/same",
              "fixed-theta/fresh")
COLUMNS = (("ssim", "SSIM"), ("ms_ssim", "MS-SSIM"), ("psnr", "PSNR (dB)"),
           ("tar@0.01", "TAR@1e-2"), ("tar@0.001", "TAR@1e-3"), ("rank1", "rank-1"))
NOT_RUN = {"gradient-inversion": "not run: attack 5 (gradient inversion of federated updates) "
                                 "is not implemented"}
FIXED_THETA_SEED = 1234


@dataclass(frozen=True)
class PrivacyConfig:
    name: str
    inverter_width: int           # U-Net w of the pixel inverter
    inverter_epochs: int
    batch_size: int
    lr: float = 1e-3              # Adam, the paper's attacker
    linkage_backbone: str = "ir18"
    linkage_width: int | None = 16
    linkage_epochs: int = 1
    aux_images: int = 0           # cap on auxiliary (attacker) images, 0 = all
    eval_images: int = 0          # cap on the client's evaluated images, 0 = all
    judge_preset: str = "tiny"    # minusface preset of the judge trained when none is given
    judge_epochs: int = 1
    fresh_views: bool = True      # new permutations every epoch (attacker queries the pipeline)
    grid_rows: int = 6

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "PrivacyConfig":
        return replace(self, **changes)


PRIVACY_PRESETS: dict[str, PrivacyConfig] = {
    # seconds on a CPU: checks that the pipeline runs, numbers mean nothing
    "tiny": PrivacyConfig("tiny", inverter_width=4, inverter_epochs=2, batch_size=8,
                          linkage_width=8, linkage_epochs=1, aux_images=48, eval_images=24,
                          judge_preset="tiny", judge_epochs=1),
    # about an hour on 2 CPU cores
    "cpu-small": PrivacyConfig("cpu-small", inverter_width=16, inverter_epochs=10, batch_size=32,
                               linkage_width=16, linkage_epochs=10, aux_images=2000,
                               eval_images=400, judge_preset="cpu-small", judge_epochs=2),
    # GPU: full-width U-Net (paper's attacker), batch 64, all data
    "paper": PrivacyConfig("paper", inverter_width=64, inverter_epochs=50, batch_size=64,
                           linkage_backbone="ir50", linkage_width=64, linkage_epochs=20,
                           aux_images=0, eval_images=0, judge_preset="paper", judge_epochs=24),
}


def get_privacy_config(name: str) -> PrivacyConfig:
    try:
        return PRIVACY_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown privacy preset {name!r}; valid: {', '.join(PRIVACY_PRESETS)}") from None


def _subsample(faces: torch.Tensor, labels: np.ndarray, cap: int, seed: int
               ) -> tuple[torch.Tensor, np.ndarray]:
    if cap and len(faces) > cap:
        idx = np.sort(np.random.default_rng(seed).choice(len(faces), cap, replace=False))
        return faces[torch.from_numpy(idx)], labels[idx]
    return faces, labels


def attacker_description(config: PrivacyConfig, n_aux: int, n_aux_ids: int | None) -> dict:
    return {
        "threat_model": "white-box eavesdropper: knows the method and the client's generator g, "
                        "not the per-image permutations; trains only on auxiliary faces whose "
                        "identities are disjoint from the evaluated client's",
        "data": f"{n_aux} auxiliary images"
                + (f" of {n_aux_ids} identities" if n_aux_ids is not None else "")
                + ", (view, face) pairs made by the attacker with the shipped g",
        "inverter": f"U-Net 3->3 (generator architecture, w = {config.inverter_width}), sigmoid "
                    f"output, L1 loss, Adam lr {config.lr:g}, batch {config.batch_size}, "
                    f"{config.inverter_epochs} epoch(s), "
                    + ("fresh permutations every epoch" if config.fresh_views else "views fixed"),
        "linkage": f"{config.linkage_backbone} (w = {config.linkage_width}) student on X_p, "
                   f"cosine loss to the judge's embedding of the original face, Adam lr "
                   f"{config.lr:g}, batch {config.batch_size}, {config.linkage_epochs} epoch(s)",
        "fixed_theta": f"inverter as above trained on X_p made with one known permutation "
                       f"(seed {FIXED_THETA_SEED}); tested on that theta and on fresh CSPRNG ones",
        "not_run": dict(NOT_RUN),
    }


def evaluate_client(frontend: MinusFaceFrontend, client_faces: torch.Tensor | np.ndarray,
                    client_labels: Sequence[int] | np.ndarray,
                    aux_faces: torch.Tensor | np.ndarray,
                    judge_embed: Callable[[torch.Tensor], torch.Tensor],
                    config: PrivacyConfig, *, seed: int = 0, progress: bool = True,
                    client_identities: Sequence[str] | None = None,
                    aux_identities: Sequence[str] | None = None,
                    judge_info: str = "", client_name: str = "client") -> dict:
    """Every attack against one client's faces; returns {metrics per row, attacker, config, ...}.

    ``judge_embed`` maps images in [0, 1] to embeddings (see `attacks.judge_embed_fn`).  When the
    identity names are given, the auxiliary and client identities must be disjoint.  The returned
    dict holds the grid images under the private key "_images" (not written to JSON).
    """
    if client_identities is not None and aux_identities is not None:
        common = set(client_identities) & set(aux_identities)
        if common:
            raise ValueError(f"auxiliary identities overlap the client's: {sorted(common)[:5]}")
    t0 = time.perf_counter()
    labels = np.asarray(client_labels).ravel()
    faces, labels = _subsample(as_faces(client_faces), labels, config.eval_images, seed)
    aux = as_faces(aux_faces)
    aux, _ = _subsample(aux, np.zeros(len(aux), np.int64), config.aux_images, seed + 1)
    originals = to_unit(faces)
    frontend.eval()

    rows: dict[str, dict] = {}
    images: dict[str, torch.Tensor] = {"original": originals}
    judge_orig = judge_embed(originals)

    def score(name: str, recovered: torch.Tensor) -> None:
        m = pixel_metrics(recovered, originals)
        m.update(identity_match_embeddings(judge_embed(recovered), judge_orig, labels))
        rows[name] = m
        images[name] = recovered

    # Views of the client's faces the eavesdropper intercepts (fresh CSPRNG theta for X_p); the
    # residue r of each face is computed once (micro-batches) and reused for every r-based view.
    theta = random_permutation(seed=FIXED_THETA_SEED)
    eval_views: dict[str, list[torch.Tensor]] = {"minusface": [], "no-shuffle": [],
                                                 "fixed-permutation": []}
    with torch.no_grad():
        for s in range(0, len(faces), 8):
            r = frontend.residue(faces[s:s + 8])
            for kind, acc in eval_views.items():
                acc.append(views_from_residue(r, kind, theta))
            del r
    eval_view = {k: torch.cat(v).float() for k, v in eval_views.items()}
    x_p = eval_view["minusface"]
    images["X_p"] = x_p
    rows["view: X_p itself"] = {**pixel_metrics(x_p, originals),
                                **identity_match_embeddings(judge_embed(x_p), judge_orig, labels)}

    # Attacks 1/2 and the ablation baselines: one inverter per view kind.
    for kind in ("none", "no-shuffle", "no-subtraction", "minusface"):
        fn = views_fn(frontend, kind)
        inv = train_inverter(fn, aux, config.inverter_epochs, config.batch_size, config.lr,
                             config.inverter_width, seed=seed, fresh_views=config.fresh_views,
                             progress=progress, desc=f"inverter [{kind}]")
        score(kind, recover(inv, eval_view[kind] if kind in eval_view else fn(faces)))

    # Attack 4: one known theta.
    fn = views_fn(frontend, "fixed-permutation", permutation=theta)
    inv = train_inverter(fn, aux, config.inverter_epochs, config.batch_size, config.lr,
                         config.inverter_width, seed=seed, fresh_views=False, progress=progress,
                         desc="inverter [fixed theta]")
    score("fixed-theta/same", recover(inv, eval_view["fixed-permutation"]))
    score("fixed-theta/fresh", recover(inv, x_p))

    # Attack 3: linkage student on X_p.
    student = train_linkage_student(views_fn(frontend, "minusface"), aux, judge_embed,
                                    config.linkage_epochs, config.batch_size, config.lr,
                                    config.linkage_backbone, config.linkage_width, seed=seed,
                                    fresh_views=config.fresh_views, progress=progress)
    rows["linkage"] = identity_match_embeddings(student_embed_fn(student)(x_p), judge_orig, labels)

    # Reference: the attacker's best blind guess, the mean auxiliary face.
    mean_face = to_unit(aux).mean(0, keepdim=True).expand_as(originals).contiguous()
    score("mean-face guess", mean_face)

    return {
        "client": client_name,
        "config": config.to_dict(),
        "attacker": attacker_description(config, len(aux),
                                         len(set(aux_identities)) if aux_identities else None),
        "judge": judge_info or "judge recognizer supplied by the caller",
        "n_eval_images": int(len(faces)),
        "n_eval_identities": int(len(np.unique(labels))),
        "n_aux_images": int(len(aux)),
        "metrics": rows,
        "not_run": dict(NOT_RUN),
        "seconds": time.perf_counter() - t0,
        "_images": images,
    }


# --------------------------------------------------------------------------- writing

def _fmt(v: object, key: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if key == "psnr":
        return f"{v:.2f}"
    return f"{v:.3f}"


def _table(metrics: dict[str, dict], first: str = "attack / baseline") -> list[str]:
    lines = [f"| {first} | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k), k) for k, _ in COLUMNS) + " |")
    return lines


def _json_safe(obj: object) -> object:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def write_grid(images: dict[str, torch.Tensor], path: Path, rows: int = 6) -> Path:
    """PNG grid: columns original | X_p | recovered by each pixel attack; `rows` faces."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cols = [c for c in ("original", "X_p", *PIXEL_ROWS) if c in images]
    n = min(rows, images["original"].shape[0])
    fig, axes = plt.subplots(n, len(cols), figsize=(1.3 * len(cols), 1.4 * n), squeeze=False)
    for j, c in enumerate(cols):
        for i in range(n):
            ax = axes[i][j]
            ax.imshow(images[c][i].detach().clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(c, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(result: dict, out_dir: str | Path) -> Path:
    """Write privacy.json (every metric), report.md (summary table + attacker) and grid.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy.json").write_text(json.dumps(_json_safe(result), indent=2, sort_keys=True),
                                      encoding="utf-8")
    cfg, att = result["config"], result["attacker"]
    lines = [f"# Privacy evaluation: {result.get('client', 'client')} (preset `{cfg['name']}`)", "",
             f"Evaluated: {result['n_eval_images']} images of {result['n_eval_identities']} "
             f"client identities; attacker data: {result['n_aux_images']} auxiliary images "
             f"(identities disjoint from the client's).", "",
             "Lower is better for the defender in every column (SSIM, MS-SSIM, PSNR: recovered "
             "vs original; TAR / rank-1: judge recognizer on recovered vs original faces; the "
             "linkage row scores the student's embedding of X_p against the judge's embedding "
             "of the original).", "", *_table(result["metrics"]), ""]
    for name, why in result.get("not_run", {}).items():
        lines.append(f"- **{name}**: {why}")
    lines += ["", "## Attacker", ""] + [f"- **{k}**: {v}" for k, v in att.items() if k != "not_run"]
    lines += [f"- **judge**: {result.get('judge', '')}", "",
              "MS-SSIM uses a 7x7 window (5 scales) so it works at 112 px; PSNR is the mean of "
              "per-image PSNRs.", ""]
    notes = {(r, k): v for r, m in result["metrics"].items() for k, v in m.get("notes", {}).items()}
    if notes:
        lines += ["## Notes", ""] + sorted({f"- {k}: {v}" for (_, k), v in notes.items()}) + [""]
    if "_images" in result:
        write_grid(result["_images"], out / "grid.png", cfg.get("grid_rows", 6))
        lines += ["## Samples", "", "![original | X_p | recovered by each attack](grid.png)", ""]
    if cfg["name"] == "tiny":
        lines.insert(2, "> **Preset `tiny`: a smoke test. These numbers say nothing about "
                        "privacy.**\n")
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out / "report.md"


def write_summary(results_by_client: dict[str, dict], out_dir: str | Path) -> Path:
    """All clients in one table (summary.md) and one JSON (summary.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(
        json.dumps(_json_safe({c: {"metrics": r["metrics"], "n_eval_images": r["n_eval_images"],
                                   "n_aux_images": r["n_aux_images"]}
                               for c, r in results_by_client.items()}), indent=2, sort_keys=True),
        encoding="utf-8")
    lines = ["# Privacy evaluation: all clients", ""]
    header = ["| client | attack / baseline | " + " | ".join(h for _, h in COLUMNS) + " |",
              "|---" * (len(COLUMNS) + 2) + "|"]
    lines += header
    for client, r in results_by_client.items():
        for name, m in r["metrics"].items():
            lines.append(f"| {client} | {name} | "
                         + " | ".join(_fmt(m.get(k), k) for k, _ in COLUMNS) + " |")
    lines += ["", "Per-client reports (attacker, judge, samples): `<client>/report.md`.", ""]
    for name, why in NOT_RUN.items():
        lines.append(f"- **{name}**: {why}")
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "summary.md"
