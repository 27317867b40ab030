"""Server side of the privacy evaluation: ask every site to attack its own faces.

After training (run config "privacy-eval" = true) the ServerApp sends one "evaluate.privacy"
message to every node: "frozen-generator" (the global g, keys "generator.*"), "arrays" (the
global stage-2 recognizer f_p, keys "recognizer.*", when there is one) and "config"
{"privacy-preset": privacy.report.privacy_preset_for(the run's preset), "seed": ...} plus
optional PrivacyConfig overrides written "<field-with-dashes>" (e.g. "gi-steps").  Each site
runs `clients.privacy_eval` locally and replies with one MetricRecord "privacy" of numbers only
(the outbound guard refuses anything else).  This module writes, under `<out-dir>/privacy/`:

  node-<id>.json   the numbers of one site (or its error)
  summary.json     all sites
  summary.md       one table: site x attack row, n / SSIM / PSNR / rank-1 / AUC / TAR@1e-3 /
                   grad cos, and each pixel row's gated verdict (privacy.gates)

The attacker data of each site is half of its own identities (see clients.privacy_eval).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from federation.report import upload_table
from privacy.gates import best_constant, pixel_gate, pixel_verdict
from privacy.report import PIXEL_ROWS, THREAT_SENTENCE
from task.records import ARRAYS, CONFIG, FROZEN_GENERATOR, PRIVACY_MESSAGE_TYPE, PRIVACY_RECORD

SUMMARY_COLUMNS = (("n", "n"), ("ssim", "SSIM"), ("psnr", "PSNR (dB)"), ("rank1", "rank-1"),
                   ("auc", "AUC"), ("tar@0.001", "TAR@1e-3"), ("grad_cos", "grad cos"))


def privacy_messages(node_ids, generator: Mapping[str, torch.Tensor],
                     recognizer: Mapping[str, torch.Tensor] | None, preset: str, seed: int,
                     overrides: Mapping[str, object] | None = None) -> list[Message]:
    """One "evaluate.privacy" message per node (same content for all)."""
    content = RecordDict({FROZEN_GENERATOR: ArrayRecord(dict(generator)),
                          CONFIG: ConfigRecord({"privacy-preset": preset, "seed": int(seed),
                                                **dict(overrides or {})})})
    if recognizer:
        content[ARRAYS] = ArrayRecord(dict(recognizer))
    return [Message(content=content, dst_node_id=int(n), message_type=PRIVACY_MESSAGE_TYPE,
                    group_id="privacy") for n in node_ids]


def _safe(v: object) -> object:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _rows(metrics: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """{"<row>/<metric>": v} -> {row: {metric: v}} (rows keep their order)."""
    rows: dict[str, dict[str, object]] = {}
    for key, v in metrics.items():
        if "/" in key:
            row, metric = key.rsplit("/", 1)
            rows.setdefault(row, {})[metric] = v
    return rows


def _cell(m: Mapping[str, object], k: str) -> str:
    v = m.get(k)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    if k == "n":
        return f"{int(v)}"
    text = f"{v:.2f}" if k == "psnr" else f"{v:.3f}"
    lo, hi = m.get(f"{k}_lo"), m.get(f"{k}_hi")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        text += f" [{lo:.2f}, {hi:.2f}]" if k == "psnr" else f" [{lo:.3f}, {hi:.3f}]"
    return text


def site_verdicts(res: Mapping[str, object]) -> tuple[str, dict[str, str]]:
    """(gate reason, {pixel row: verdict}) rebuilt from a site's numbers with privacy.gates."""
    rows = _rows(res)
    gate = pixel_gate(rows, float(res.get("gate-psnr", 30.0)), float(res.get("gate-ssim", 0.95)))
    const = best_constant(rows)
    return gate["reason"], {r: pixel_verdict(r, rows[r], gate, const) for r in PIXEL_ROWS
                            if r in rows}


def write_privacy_summary(results: Mapping[str, dict], out_dir: Path,
                          shipped: list[dict] | None = None,
                          labels: Mapping[str, str] | None = None) -> Path:
    """`shipped`: pooled stage 2's upload records (federation.report.read_uploads), one per
    node: what left each site besides weights, shown first and kept in its node file.
    `labels`: "node-<id>" -> the site's name, shown in the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_node = {f"node-{u.get('node')}": u for u in shipped or []}
    for node, res in results.items():
        if node in by_node:
            res = {**res, **{f"shipped/{k}": v for k, v in by_node[node].items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        (out / f"{node}.json").write_text(json.dumps({k: _safe(v) for k, v in res.items()},
                                                     indent=2, sort_keys=True), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(
        {n: {k: _safe(v) for k, v in r.items()} for n, r in results.items()}, indent=2,
        sort_keys=True), encoding="utf-8")
    lines = ["# Privacy evaluation on the sites (evaluate.privacy)", "",
             f"**{THREAT_SENTENCE}**", "",
             "Each site attacked its own faces with the global g; the attacker and the judge "
             "trained on half of the site's identities, the other half was evaluated "
             "(clients/privacy_eval.py). Only these numbers left the sites. Pixel rows count "
             "only where the site's gate passed (docs/privacy.md); identity columns use "
             "different photos of each person (rank-1 chance = 1 / gallery size, AUC chance "
             "0.5) and judge-scored ones are absent where the judge was below its quality bar. "
             "Rows `gi/...`: update leakage (gradient inversion, optimistic attacker given the "
             "private head and labels). [a, b]: 95 % interval over identities.", "",
             *(["## What left each site (pooled stage 2)", "",
                "Besides weights, each site shipped these protected images and label tokens "
                "(float16 X_p of its training faces; the attacks below run on X_p of the same "
                "faces made the same way, with fresh permutations, not on the shipped bytes).",
                "", upload_table(shipped), "", "## Attacks", ""] if shipped else []),
             "| site | attack / baseline | " + " | ".join(h for _, h in SUMMARY_COLUMNS)
             + " | verdict |", "|---" * (len(SUMMARY_COLUMNS) + 3) + "|"]
    empty = " |" * (len(SUMMARY_COLUMNS) + 1)
    labels = dict(labels or {})
    for key, res in results.items():
        node = labels.get(key, key)
        if "error" in res:
            lines.append(f"| {node} | error: {res['error']} |" + empty)
            continue
        if res.get("privacy-skipped"):
            lines.append(f"| {node} | skipped: {res.get('n-identities')} identities |" + empty)
            continue
        gate, verdicts = site_verdicts(res)
        lines.append(f"| {node} | pixel gate |" + " |" * len(SUMMARY_COLUMNS) + f" {gate} |")
        for row, m in _rows(res).items():
            cells = [_cell(m, k) for k, _ in SUMMARY_COLUMNS]
            lines.append(f"| {node} | {row} | " + " | ".join(cells)
                         + f" | {verdicts.get(row, '')} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "summary.md"


def run_privacy_round(grid, out_dir: str | Path, generator: Mapping[str, torch.Tensor],
                      recognizer: Mapping[str, torch.Tensor] | None, preset: str, seed: int = 0,
                      overrides: Mapping[str, object] | None = None,
                      timeout: float | None = None, shipped: list[dict] | None = None,
                      site_names=None) -> Path:
    """Send "evaluate.privacy" to every node, collect the MetricRecords, write the files above.

    ``generator``: keys "generator.*" (as in the frozen-generator record); ``recognizer``: keys
    "recognizer.*" (stage-2 shared weights) or None.  Returns the path of summary.md."""
    node_ids = sorted(grid.get_node_ids())
    messages = privacy_messages(node_ids, generator, recognizer, preset, seed, overrides)
    replies = grid.send_and_receive(messages, timeout=timeout)
    results: dict[str, dict] = {}
    for reply in replies:
        node = f"node-{reply.metadata.src_node_id}"
        if reply.has_error():
            results[node] = {"error": str(reply.error.reason)[:500]}
        elif PRIVACY_RECORD in reply.content:
            results[node] = dict(reply.content[PRIVACY_RECORD])
        else:
            results[node] = {"error": f"reply without a {PRIVACY_RECORD!r} MetricRecord"}
    for n in node_ids:
        results.setdefault(f"node-{n}", {"error": "no reply"})
    labels = ({f"node-{n}": f"{site_names(n)} (node {n})" for n in node_ids}
              if site_names is not None else None)
    return write_privacy_summary(results, Path(out_dir) / "privacy", shipped, labels)
