"""The run report: one Markdown file with the server-side benchmark per round and per-site
lines, written next to metrics.jsonl at the end of a run (and by `minusfed report RUN_DIR`),
with pictures next to it (federation/curves.py): accuracy/AUC and site loss per round, and the
ROC curve of the last server-side evaluation, whose scores the ServerApp keeps in
server_scores.json (JSON: a run directory never needs a pickle load to be read).

The report is derived from metrics.jsonl and must never be what stops a run: a line that is not
a round or client record is skipped with a warning naming it, a missing metric shows as "-",
and a round trained again after a resume (from checkpoint.prev.pt) shows its last try."""

from __future__ import annotations

import json
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.common.logger import log

from federation import curves
from federation.init_bundle import read_start
from minusface.atomic import write_atomic
from minusface.presets import Preset
from strategy.checkpoint import numbered_jsonl

UPLOAD_STAGE = "stage2-upload"         # federation/pooled.py: what one site shipped


def _kind(rec: dict) -> str | None:
    """Which record `rec` is: "round", "client", "upload", or None (one the report cannot
    show)."""
    if rec.get("stage") == UPLOAD_STAGE:
        return "upload"
    if not isinstance(rec.get("round"), int) or not isinstance(rec.get("stage"), str):
        return None
    if "client" in rec:
        return "client" if isinstance(rec["client"], dict) else None
    return "round" if isinstance(rec.get("metrics"), dict) else None


def read_run_log(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """(round records, client records) of `out_dir`/metrics.jsonl; a round trained again after
    a resume keeps its last try (benchmarks read runs through this too)."""
    rounds: list[dict] = []
    clients: list[dict] = []
    path = out_dir / "metrics.jsonl"
    for number, rec in numbered_jsonl(path):
        kind = _kind(rec)
        if kind is None:
            log(WARNING, "%s line %d: expected a round record (round, stage, metrics) or a "
                "client record (round, stage, client); skipped", path, number)
        elif kind == "client":
            clients.append(rec)
        elif kind == "upload":
            continue                                   # read_uploads
        else:
            if rounds and rounds[-1]["round"] >= rec["round"]:
                # trained again after resuming from an earlier checkpoint: the last try counts
                log(WARNING, "%s line %d: round %d again (a resume from an earlier "
                    "checkpoint); the report shows this try", path, number, rec["round"])
                rounds = [r for r in rounds if r["round"] < rec["round"]]
                clients = [c for c in clients if c["round"] < rec["round"]]
            rounds.append(rec)
    return rounds, clients


def read_uploads(out_dir: Path) -> list[dict]:
    """The pooled-stage-2 upload records of `out_dir`/metrics.jsonl (the last per node: a
    restarted ServerApp writes them again)."""
    last: dict[object, dict] = {}
    for _, rec in numbered_jsonl(out_dir / "metrics.jsonl"):
        if _kind(rec) == "upload":
            last[rec.get("node")] = rec
    return list(last.values())


def upload_table(uploads: list[dict]) -> str:
    """What left each site in pooled stage 2 (and what it received)."""
    lines = ["| site | site token | complete | faces | copies | X_p shipped | label tokens | "
             "MB sent (spooled) | MB received (upload) | messages | refused |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for u in uploads:
        lines.append(
            f"| {u.get('site_name') or u.get('node')} | {u.get('site') or '-'} | "
            f"{'yes' if u.get('complete') else 'no: ' + str(u.get('dropped') or 'incomplete')} | "
            f"{u.get('faces', '-')} | {u.get('copies', '-')} | {u.get('xp_images', '-')} | "
            f"{u.get('label_tokens', '-')} | {_fmt(u.get('spooled_bytes'), '.2f', 1e-6)} | "
            f"{_fmt(u.get('bytes_received'), '.2f', 1e-6)} | {u.get('messages', '-')} | "
            f"{u.get('refused', '-')} |")
    return "\n".join(lines)


def _fmt(value: object, spec: str, scale: float = 1.0) -> str:
    """`value` formatted, or "-" where a metric is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return format(scale * value, spec)


def round_table(rounds: list[dict]) -> str:
    lines = ["| round | stage | LR | server acc % | AUC | TAR@1e-2 | clients' acc % | round time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        m = r["metrics"]
        lines.append(
            f"| {r['round']} | {r['stage']} | {_fmt(m.get('lr'), '.4g')} | "
            f"{_fmt(m.get('server_accuracy'), '.2f', 100)} ± "
            f"{_fmt(m.get('server_accuracy_std'), '.2f', 100)} | "
            f"{_fmt(m.get('server_auc'), '.4f')} | {_fmt(m.get('server_tar_at_far_1e-2'), '.3f')} | "
            f"{_fmt(m.get('clients_evaluate_accuracy'), '.2f', 100)} | "
            f"{_fmt(m.get('round_seconds'), '.1f')} s |")
    return "\n".join(lines)


def client_table(clients: list[dict]) -> str:
    lines = ["| round | stage | site | phase | accepted | examples | metrics |",
             "|---|---|---|---|---|---|---|"]
    for rec in clients:
        c = rec["client"]
        m = c.get("metrics") if isinstance(c.get("metrics"), dict) else {}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(m.items())
                          if isinstance(v, float) and k != "num-examples")
        problems = c.get("problems") if isinstance(c.get("problems"), list) else []
        site = c.get("site") or c.get("node_id")
        lines.append(f"| {rec['round']} | {rec['stage']} | {site} | {c.get('phase', '')} | "
                     f"{'yes' if c.get('accepted', True) else 'no: ' + '; '.join(map(str, problems))} | "
                     f"{m.get('num-examples', '')} | {shown} |")
    return "\n".join(lines)


SCORES = "server_scores.json"
PICTURES = {"accuracy": "report-accuracy.png", "loss": "report-site-loss.png",
            "roc": "report-roc.png"}


def save_server_scores(out_dir: Path, round_index: int, stage: str, scores: np.ndarray,
                       same: np.ndarray) -> Path:
    """Keep the last server-side evaluation's cosine score per pair for the ROC curve."""
    record = {"round": int(round_index), "stage": stage,
              "scores": [float(s) for s in np.asarray(scores).ravel()],
              "same": [bool(s) for s in np.asarray(same).ravel()]}
    path = out_dir / SCORES
    write_atomic(path, lambda f: f.write(json.dumps(record).encode("utf-8")))
    return path


def load_server_scores(out_dir: Path) -> dict | None:
    """server_scores.json as {"round", "stage", "scores", "same"} (arrays), or None when the run
    kept none or the file is not what save_server_scores writes (named in a warning)."""
    path = out_dir / SCORES
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        scores = np.asarray(rec["scores"], dtype=np.float64)
        same = np.asarray(rec["same"], dtype=bool)
        if scores.shape != same.shape or scores.ndim != 1 or not np.isfinite(scores).all():
            raise ValueError("scores and same must be equal-length lists of finite numbers")
        return {"round": int(rec["round"]), "stage": str(rec["stage"]), "scores": scores,
                "same": same}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log(WARNING, "%s: expected {round, stage, scores, same} as written by the ServerApp "
            "(%s); the report has no ROC curve", path, exc)
        return None


def draw_pictures(out_dir: Path, rounds: list[dict], clients: list[dict]) -> dict[str, Path]:
    """The report's PNGs, by kind; a picture that fails is named in a warning, never fatal."""
    made: dict[str, Path] = {}
    scores = load_server_scores(out_dir)
    jobs = {"accuracy": lambda p: curves.accuracy_curve(rounds, p),
            "loss": lambda p: curves.loss_curve(rounds, clients, p),
            "roc": lambda p: scores and curves.roc_curve(
                scores["scores"], scores["same"], p,
                f"ROC, server-side benchmark after round {scores['round']} ({scores['stage']})")}
    for kind, draw in jobs.items():
        try:
            path = draw(out_dir / PICTURES[kind])
        except Exception as exc:       # a picture must never stop the report
            log(WARNING, "report: could not draw %s (%s: %s)", PICTURES[kind],
                type(exc).__name__, exc)
            continue
        if path:
            made[kind] = Path(path)
    return made


def operating_points(out_dir: Path) -> str:
    """TAR at FAR 1e-2 / 1e-3 of the last server-side evaluation, as a Markdown list."""
    scores = load_server_scores(out_dir)
    if scores is None or scores["same"].all() or not scores["same"].any():
        return ""
    lines = []
    for far in curves.FARS:
        op = curves.tar_at_far(scores["scores"], scores["same"], far)
        note = f" ({op['note']})" if op["note"] else ""
        lines.append(f"- FAR {far:g}: TAR {op['tar']:.3f} at threshold {op['threshold']:.4f} "
                     f"(achieved FAR {op['far']:.4f}){note}")
    return "\n".join(lines)


def write_report(out_dir: Path, preset: Preset | None = None) -> Path:
    rounds, clients = read_run_log(out_dir)
    pictures = draw_pictures(out_dir, rounds, clients)
    text = ["# minusfed run report", "",
            f"Run directory: `{out_dir}`" + (f"; preset `{preset.name}`" if preset else ""), "",
            "Server-side benchmark: LFW View 2 pairs of the evaluation fold (identities no site "
            "holds), protected with the global g exactly as a site would (stage 2). LFW, "
            "centre-cropped, not aligned, trained on LFW only.", ""]
    start = read_start(out_dir)
    if start:
        before = start.get("server-eval-as-loaded") or {}
        acc, auc = before.get("server_accuracy"), before.get("server_auc")
        text += ["## Started from a trained bundle", "",
                 f"No stage 1: g is the bundle's, frozen; stage 2 started from its f_p. Bundle "
                 f"`{start.get('path')}` (preset `{start.get('preset')}`, commit "
                 f"`{start.get('commit')}`, written {start.get('written-at')}"
                 f"{'; a SMOKE bundle' if start.get('smoke') else ''}). "
                 + (f"Server-side benchmark of the bundle as loaded, before round 1: accuracy "
                    f"{_fmt(acc, '.4f')}, AUC {_fmt(auc, '.4f')}." if before else
                    "No server-side benchmark (no LFW at the server)."), ""]
    if "accuracy" in pictures:
        text += [f"![server accuracy and AUC per round]({pictures['accuracy'].name})", ""]
    if "loss" in pictures:
        text += [f"![site training loss per round]({pictures['loss'].name})", ""]
    text += ["## Rounds", "", round_table(rounds), ""]
    if "roc" in pictures:
        text += ["## ROC of the last server-side evaluation", "",
                 f"![ROC curve]({pictures['roc'].name})", "", operating_points(out_dir), ""]
    text += ["## Sites", "", client_table(clients), ""]
    uploads = read_uploads(out_dir)
    if uploads:
        text += ["## Pooled stage 2: what left each site", "",
                 "Each site shipped its training faces protected with the global g (float16 X_p, "
                 "fresh permutations per copy) and one random label token per identity; no raw "
                 "face, residue, name or permutation left a site. The server trained f_p on "
                 "these X_p (Ray Train).", "", upload_table(uploads), ""]
    path = out_dir / "report.md"      # a crash leaves the old report, never half of one
    write_atomic(path, lambda f: f.write("\n".join(text).encode("utf-8")))
    return path


def final_summary(out_dir: Path) -> str:
    rounds, _ = read_run_log(out_dir)
    return round_table(rounds[-2:] if len(rounds) > 1 else rounds)
