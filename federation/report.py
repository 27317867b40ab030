"""The run report: one Markdown file with the server-side benchmark per round and per-site
lines, written next to metrics.jsonl at the end of a run (and by `minusfed report RUN_DIR`)."""

from __future__ import annotations

import json
from pathlib import Path

from minusface.presets import Preset


def _rows(out_dir: Path) -> tuple[list[dict], list[dict]]:
    rounds, clients = [], []
    path = out_dir / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        if not line.strip():
            continue
        rec = json.loads(line)
        (clients if "client" in rec else rounds).append(rec)
    return rounds, clients


def round_table(rounds: list[dict]) -> str:
    lines = ["| round | stage | LR | server acc % | AUC | TAR@1e-2 | clients' acc % | round time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        m = r["metrics"]
        client_acc = m.get("clients_evaluate_accuracy")
        lines.append(
            f"| {r['round']} | {r['stage']} | {m.get('lr', float('nan')):.4g} | "
            f"{100 * m['server_accuracy']:.2f} ± {100 * m['server_accuracy_std']:.2f} | "
            f"{m['server_auc']:.4f} | {m['server_tar_at_far_1e-2']:.3f} | "
            f"{'-' if client_acc is None else f'{100 * client_acc:.2f}'} | "
            f"{m.get('round_seconds', 0):.1f} s |")
    return "\n".join(lines)


def client_table(clients: list[dict]) -> str:
    lines = ["| round | stage | node | phase | accepted | examples | metrics |",
             "|---|---|---|---|---|---|---|"]
    for rec in clients:
        c = rec["client"]
        m = c.get("metrics", {})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(m.items())
                          if isinstance(v, float) and k != "num-examples")
        lines.append(f"| {rec['round']} | {rec['stage']} | {c.get('node_id')} | {c.get('phase', '')} | "
                     f"{'yes' if c.get('accepted', True) else 'no: ' + '; '.join(c.get('problems', []))} | "
                     f"{m.get('num-examples', '')} | {shown} |")
    return "\n".join(lines)


def write_report(out_dir: Path, preset: Preset | None = None) -> Path:
    rounds, clients = _rows(out_dir)
    text = ["# minusfed run report", "",
            f"Run directory: `{out_dir}`" + (f"; preset `{preset.name}`" if preset else ""), "",
            "Server-side benchmark: LFW View 2 pairs of the evaluation fold (identities no site "
            "holds), protected with the global g exactly as a site would (stage 2). LFW, "
            "centre-cropped, not aligned, trained on LFW only.", "",
            "## Rounds", "", round_table(rounds), "", "## Sites", "", client_table(clients), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(text), encoding="utf-8")
    return path


def final_summary(out_dir: Path) -> str:
    rounds, _ = _rows(out_dir)
    return round_table(rounds[-2:] if len(rounds) > 1 else rounds)
