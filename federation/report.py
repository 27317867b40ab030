"""The run report: one Markdown file with the server-side benchmark per round and per-site
lines, written next to metrics.jsonl at the end of a run (and by `minusfed report RUN_DIR`).

The report is derived from metrics.jsonl and must never be what stops a run: a line that is not
a round or client record is skipped with a warning naming it, a missing metric shows as "-",
and a round trained again after a resume (from checkpoint.prev.pt) shows its last try."""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

from flwr.common.logger import log

from minusface.atomic import write_atomic
from minusface.presets import Preset
from strategy.checkpoint import numbered_jsonl


def _kind(rec: dict) -> str | None:
    """Which record `rec` is: "round", "client", or None (one the report cannot show)."""
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
        else:
            if rounds and rounds[-1]["round"] >= rec["round"]:
                # trained again after resuming from an earlier checkpoint: the last try counts
                log(WARNING, "%s line %d: round %d again (a resume from an earlier "
                    "checkpoint); the report shows this try", path, number, rec["round"])
                rounds = [r for r in rounds if r["round"] < rec["round"]]
                clients = [c for c in clients if c["round"] < rec["round"]]
            rounds.append(rec)
    return rounds, clients


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
    lines = ["| round | stage | node | phase | accepted | examples | metrics |",
             "|---|---|---|---|---|---|---|"]
    for rec in clients:
        c = rec["client"]
        m = c.get("metrics") if isinstance(c.get("metrics"), dict) else {}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(m.items())
                          if isinstance(v, float) and k != "num-examples")
        problems = c.get("problems") if isinstance(c.get("problems"), list) else []
        lines.append(f"| {rec['round']} | {rec['stage']} | {c.get('node_id')} | {c.get('phase', '')} | "
                     f"{'yes' if c.get('accepted', True) else 'no: ' + '; '.join(map(str, problems))} | "
                     f"{m.get('num-examples', '')} | {shown} |")
    return "\n".join(lines)


def write_report(out_dir: Path, preset: Preset | None = None) -> Path:
    rounds, clients = read_run_log(out_dir)
    text = ["# minusfed run report", "",
            f"Run directory: `{out_dir}`" + (f"; preset `{preset.name}`" if preset else ""), "",
            "Server-side benchmark: LFW View 2 pairs of the evaluation fold (identities no site "
            "holds), protected with the global g exactly as a site would (stage 2). LFW, "
            "centre-cropped, not aligned, trained on LFW only.", "",
            "## Rounds", "", round_table(rounds), "", "## Sites", "", client_table(clients), ""]
    path = out_dir / "report.md"      # a crash leaves the old report, never half of one
    write_atomic(path, lambda f: f.write("\n".join(text).encode("utf-8")))
    return path


def final_summary(out_dir: Path) -> str:
    rounds, _ = read_run_log(out_dir)
    return round_table(rounds[-2:] if len(rounds) > 1 else rounds)
