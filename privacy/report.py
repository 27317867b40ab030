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

Update leakage (attack 5, `privacy.gradient_inversion`, own section "gradient_inversion"): one
client update (one SGD step on B = gi_images faces) of the recognizer, without protection and
in MinusFace stage 2 (input X_p), inverted with Geiping et al.'s cosine + TV attack by an
OPTIMISTIC attacker given the private head and the labels; reconstructions are compared with
the faces and with X_p, and chained through the minusface inverter above.

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

from . import gradient_inversion as gi
from .attacks import (
    as_faces,
    random_permutation,
    recover,
    student_embed_fn,
    to_unit,
    train_inverter,
    train_linkage_student,
    views_fn,
    views_from_residue,
)
from .metrics import identity_match_embeddings, pixel_metrics

PIXEL_ROWS = ("none", "no-shuffle", "no-subtraction", "minusface", "fixed-theta/same",
              "fixed-theta/fresh")
COLUMNS = (("ssim", "SSIM"), ("ms_ssim", "MS-SSIM"), ("psnr", "PSNR (dB)"),
           ("tar@0.01", "TAR@1e-2"), ("tar@0.001", "TAR@1e-3"), ("rank1", "rank-1"))
GI_COLUMNS = COLUMNS + (("grad_cos", "grad cos"),)
GI_DISABLED = {"gradient-inversion": "not run: disabled (gi_images = 0)"}
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
    # update leakage (gradient inversion, privacy.gradient_inversion); gi_images = 0 disables it
    gi_images: int = 2            # B: faces in the one attacked client step (1..4 typical)
    gi_steps: int = 32            # attack steps on the deployed recognizer architecture
    gi_probe_steps: int = 200     # attack steps on the leaky linear probe (0 = no probe)
    gi_lr: float = 0.05           # Adam on the dummy images
    gi_tv: float = 0.01           # total-variation weight
    gi_signed: bool = True        # Adam on the sign of the input gradient (Geiping et al.)
    gi_preset: str = "tiny"       # recognizer architecture when no weights are given

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> PrivacyConfig:
        return replace(self, **changes)


PRIVACY_PRESETS: dict[str, PrivacyConfig] = {
    # seconds on a CPU: checks that the pipeline runs, numbers mean nothing
    "tiny": PrivacyConfig("tiny", inverter_width=4, inverter_epochs=2, batch_size=8,
                          linkage_width=8, linkage_epochs=1, aux_images=48, eval_images=24,
                          judge_preset="tiny", judge_epochs=1, gi_images=2, gi_steps=32,
                          gi_probe_steps=200, gi_preset="tiny"),
    # about 15 minutes on 2 idle CPU cores: cpu-small's attackers with fewer images and epochs
    "cpu-quick": PrivacyConfig("cpu-quick", inverter_width=16, inverter_epochs=4, batch_size=32,
                               linkage_width=16, linkage_epochs=4, aux_images=800,
                               eval_images=200, judge_preset="cpu-small", judge_epochs=2,
                               gi_images=2, gi_steps=100, gi_probe_steps=300,
                               gi_preset="cpu-small"),
    # about an hour on 2 CPU cores
    "cpu-small": PrivacyConfig("cpu-small", inverter_width=16, inverter_epochs=10, batch_size=32,
                               linkage_width=16, linkage_epochs=10, aux_images=2000,
                               eval_images=400, judge_preset="cpu-small", judge_epochs=2,
                               gi_images=4, gi_steps=300, gi_probe_steps=1000,
                               gi_preset="cpu-small"),
    # GPU: full-width U-Net (paper's attacker), batch 64, all data
    "paper": PrivacyConfig("paper", inverter_width=64, inverter_epochs=50, batch_size=64,
                           linkage_backbone="ir50", linkage_width=64, linkage_epochs=20,
                           aux_images=0, eval_images=0, judge_preset="paper", judge_epochs=24,
                           gi_images=4, gi_steps=8000, gi_probe_steps=4000, gi_preset="paper"),
}


# Attacker settings are a registry of their own (an attack budget is not a training budget), but
# each privacy preset names the training presets it uses (judge_preset, gi_preset), and a
# federated run with privacy-eval attacks with the privacy preset its training preset names here.
# tests/test_config.py checks that every training preset has one and every name exists.
PRIVACY_PRESET_FOR: dict[str, str] = {"tiny": "tiny", "cpu-small": "cpu-small",
                                      "gpu-small": "cpu-small", "paper": "paper"}


def get_privacy_config(name: str) -> PrivacyConfig:
    try:
        return PRIVACY_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown privacy preset {name!r}; valid: {', '.join(PRIVACY_PRESETS)}") from None


def privacy_preset_for(training_preset: str) -> str:
    """The privacy preset a federated run of `training_preset` attacks with."""
    try:
        return PRIVACY_PRESET_FOR[training_preset]
    except KeyError:
        raise ValueError(f"no privacy preset for training preset {training_preset!r}; "
                         f"known: {', '.join(PRIVACY_PRESET_FOR)}") from None


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
        "not_run": _not_run(config),
    }


def _not_run(config: PrivacyConfig) -> dict:
    return dict(GI_DISABLED) if config.gi_images <= 0 else {}


def evaluate_client(frontend: MinusFaceFrontend, client_faces: torch.Tensor | np.ndarray,
                    client_labels: Sequence[int] | np.ndarray,
                    aux_faces: torch.Tensor | np.ndarray,
                    judge_embed: Callable[[torch.Tensor], torch.Tensor],
                    config: PrivacyConfig, *, seed: int = 0, progress: bool = True,
                    client_identities: Sequence[str] | None = None,
                    aux_identities: Sequence[str] | None = None,
                    judge_info: str = "", client_name: str = "client",
                    gi_recognizer: torch.nn.Module | None = None,
                    gi_recognizer_info: str = "") -> dict:
    """Every attack against one client's faces; returns {metrics per row, attacker, config, ...}.

    ``judge_embed`` maps images in [0, 1] to embeddings (see `attacks.judge_embed_fn`).  When the
    identity names are given, the auxiliary and client identities must be disjoint.  The returned
    dict holds the grid images under the private key "_images" (not written to JSON).

    Update leakage (``config.gi_images > 0``): `gi_recognizer` is the 3-channel recognizer whose
    update is attacked (e.g. the run's f_p); None = a fresh one of ``config.gi_preset``.
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
    inverters = {}
    for kind in ("none", "no-shuffle", "no-subtraction", "minusface"):
        fn = views_fn(frontend, kind)
        inv = train_inverter(fn, aux, config.inverter_epochs, config.batch_size, config.lr,
                             config.inverter_width, seed=seed, fresh_views=config.fresh_views,
                             progress=progress, desc=f"inverter [{kind}]")
        inverters[kind] = inv
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

    # Attack 5: update leakage (gradient inversion of one client step).
    gi_result = None
    if config.gi_images > 0:
        gi_result = run_gradient_inversion(frontend, faces, labels, config, judge_embed,
                                           inverters["minusface"], seed=seed, progress=progress,
                                           recognizer=gi_recognizer,
                                           recognizer_info=gi_recognizer_info)
        images["gi"] = gi_result.pop("_images")

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
        "gradient_inversion": gi_result,
        "not_run": _not_run(config),
        "seconds": time.perf_counter() - t0,
        "_images": images,
    }


def run_gradient_inversion(frontend: MinusFaceFrontend, faces: torch.Tensor, labels: np.ndarray,
                           config: PrivacyConfig,
                           judge_embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           inverter: torch.nn.Module | None = None, *, seed: int = 0,
                           progress: bool = False, recognizer: torch.nn.Module | None = None,
                           recognizer_info: str = "") -> dict:
    """The update-leakage section: `gradient_inversion.evaluate_gradient_inversion` with the
    config's budget, plus the attacker description and one verdict line per recognizer."""
    from minusface.backbones import build_backbone
    from minusface.heads import build_head
    from minusface.presets import get_preset

    preset = get_preset(config.gi_preset)
    n_classes = max(2, int(len(np.unique(labels))))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 11)
        if recognizer is None:
            recognizer = build_backbone(preset.backbone, 3, width=preset.backbone_width)
            recognizer_info = (f"freshly initialised {preset.backbone} (w = "
                               f"{preset.backbone_width}) of preset {preset.name!r}")
        head = build_head(preset.head, 512, n_classes, s=preset.head_s, m=preset.head_m)
    frontend.eval()
    res = gi.evaluate_gradient_inversion(
        faces, labels, frontend.protect, recognizer, head, images=config.gi_images,
        steps=config.gi_steps, lr=config.gi_lr, tv=config.gi_tv, signed=config.gi_signed,
        probe_steps=config.gi_probe_steps, client_lr=preset.lr,
        weight_decay=preset.weight_decay, judge_embed=judge_embed, inverter=inverter, seed=seed,
        progress=progress)
    res["attacker"] = gi.describe_attacker(config.gi_images, config.gi_steps, config.gi_lr,
                                           config.gi_tv, config.gi_signed, config.gi_probe_steps,
                                           recognizer_info or "recognizer supplied by the caller")
    res["attacker"]["client_step"] = (f"SGD lr {preset.lr:g}, momentum 0.9, weight decay "
                                      f"{preset.weight_decay:g} (preset {preset.name!r})")
    res["verdict"] = [gi.verdict(res["metrics"], "gi")]
    if config.gi_probe_steps > 0:
        res["verdict"].append(gi.verdict(res["metrics"], "gi-probe"))
    return res


# --------------------------------------------------------------------------- writing

def _fmt(v: object, key: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if key == "psnr":
        return f"{v:.2f}"
    return f"{v:.3f}"


def _table(metrics: dict[str, dict], first: str = "attack / baseline",
           columns: tuple = COLUMNS) -> list[str]:
    lines = [f"| {first} | " + " | ".join(h for _, h in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k), k) for k, _ in columns) + " |")
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
    return _grid(images, [c for c in ("original", "X_p", *PIXEL_ROWS) if c in images], path, rows)


def _grid(images: dict[str, torch.Tensor], cols: list[str], path: Path, rows: int) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = min(rows, images[cols[0]].shape[0])
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


def write_gi_grid(images: dict[str, torch.Tensor], path: Path) -> Path:
    """PNG grid of the attacked batch: original | X_p | each gradient-inversion reconstruction."""
    cols = ["original", "X_p"] + [k for k in images if k not in ("original", "X_p")]
    return _grid(images, cols, path, images["original"].shape[0])


def _gi_section(gi_res: dict) -> list[str]:
    lines = ["## Update leakage (gradient inversion)", "",
             f"One client step on B = {gi_res.get('batch_size')} faces "
             f"({gi_res.get('batch_identities')} identities), attacked without protection "
             "(`none`) and in MinusFace stage 2 (`minusface`: the recognizer input is X_p). "
             "`vs X_p` compares the reconstruction with the protected image the recognizer saw; "
             "`+ inverter` pushes it through the X_p pixel inverter above. `grad cos`: cosine "
             "between the reconstruction's gradient and the observed one (1 = matched).", "",
             *_table(gi_res["metrics"], "gradient inversion", GI_COLUMNS), ""]
    lines += [f"- **verdict**: {v}" for v in gi_res.get("verdict", [])]
    lines += [f"- **{k}**: {v}" for k, v in gi_res.get("attacker", {}).items()]
    return lines + [""]


def write_report(result: dict, out_dir: str | Path) -> Path:
    """Write privacy.json (every metric), report.md (summary table + attacker) and grid.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy.json").write_text(json.dumps(_json_safe(result), indent=2, sort_keys=True),
                                      encoding="utf-8")
    cfg, att = result["config"], result["attacker"]
    gi_res = result.get("gradient_inversion")
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
    if gi_res:
        lines += _gi_section(gi_res)
    if "_images" in result:
        write_grid(result["_images"], out / "grid.png", cfg.get("grid_rows", 6))
        lines += ["## Samples", "", "![original | X_p | recovered by each attack](grid.png)", ""]
        if "gi" in result["_images"]:
            write_gi_grid(result["_images"]["gi"], out / "grid_gi.png")
            lines += ["![update leakage: original | X_p | gradient-inversion reconstructions]"
                      "(grid_gi.png)", ""]
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
                                   "n_aux_images": r["n_aux_images"],
                                   "gradient_inversion": (r.get("gradient_inversion") or {}
                                                          ).get("metrics")}
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
    gi_rows = [(c, n, m) for c, r in results_by_client.items()
               for n, m in ((r.get("gradient_inversion") or {}).get("metrics") or {}).items()]
    if gi_rows:
        lines += ["", "## Update leakage (gradient inversion)", "",
                  "| client | gradient inversion | " + " | ".join(h for _, h in GI_COLUMNS) + " |",
                  "|---" * (len(GI_COLUMNS) + 2) + "|"]
        lines += [f"| {c} | {n} | " + " | ".join(_fmt(m.get(k), k) for k, _ in GI_COLUMNS) + " |"
                  for c, n, m in gi_rows]
    lines += ["", "Per-client reports (attacker, judge, samples): `<client>/report.md`.", ""]
    not_run = {k: v for r in results_by_client.values() for k, v in r.get("not_run", {}).items()}
    for name, why in not_run.items():
        lines.append(f"- **{name}**: {why}")
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "summary.md"
