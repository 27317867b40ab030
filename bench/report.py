"""Gather the latest benchmark results into the README's "Results" section.

    python -m bench.report            # print the section
    python -m bench.report --write    # replace it in README.md (between the results markers)

Reads `bench/results/*.json`: each file is one benchmark run saved with the command that
produced it, the machine, the date and the commit ({"kind", "command", "machine", "date",
"commit", "note", "data"}).  A benchmark's own JSON output goes in "data" unchanged; a renderer
per kind picks the headline numbers.  Every row printed carries its machine, date and command.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from bench.common import ROOT, arg_parser, markdown_table

RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"

Row = tuple[str, str, str]          # (section, measurement, value)
OLD_FEDERATED = ("; numbers from the old loop that re-implemented the server, not the ServerApp: "
                 "rerun needed")


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def gpu(d: dict) -> list[Row]:
    rows: list[Row] = []
    c = d.get("ceilings", {})
    if c:
        rows.append(("speed", "measured bf16 matmul / device copy",
                     f"{c['matmul_tflops']:.0f} TFLOP/s / {c['copy_gb_s']:.0f} GB/s"))
    p = d.get("protect", {})
    for r in p.get("rows", []):
        if r["batch"] in (1, 256):
            rows.append(("speed", (f"protect() img/s, batch {r['batch']}, "
                                   f"{'registered for shipping' if r['registered'] else 'on-GPU use'}"),
                         f"{r['img_per_s']:,.0f}"))
    if p:
        rows.append(("speed", f"(e + d) / g at batch {p['stages_batch']} (target 0.05)",
                     f"{p['e_plus_d_over_g']:.2f}"))
    for r in d.get("train", []):
        if r["batch"] == 256:
            rows.append(("speed", (f"training {r['recipe']} ({r['preset']}, batch 256) img/s, "
                                   "% of measured bf16 peak"),
                         f"{r['img_per_s']:,.0f}, {100 * r['fraction_of_measured_peak']:.1f} %"))
    return rows


def federated_lfw(d: dict) -> list[Row]:
    """A run without "federated_path" predates the benchmark's use of the real ServerApp."""
    ep = d["preset"]["epochs"]
    old = "" if "federated_path" in d else OLD_FEDERATED
    return [("accuracy", f"LFW fold 0, {d['preset']['name']}, {ep} epochs: {name}"
             + (old if "federated" in name else ""), f"{_pct(r['accuracy'])} (AUC {r['auc']:.3f})")
            for name, r in d["rows"].items() if "accuracy" in r]


def stage2_probe(d: dict) -> list[Row]:
    rows = [("accuracy", f"LFW fold 0, {d['preset']}: stage 1 ({d['stage1_epochs']} epochs), f on r",
             f"{_pct(d['stage1']['accuracy'])} (AUC {d['stage1']['auc']:.3f})")]
    if d.get("curve"):
        last = d["curve"][-1]
        rows.append(("accuracy", (f"LFW fold 0, {d['preset']}: f_p on X_p after {last['epoch']} "
                     "stage-2 epochs"), f"{_pct(last['accuracy'])} (AUC {last['auc']:.3f})"))
    return rows


def lfw(d: dict) -> list[Row]:
    return [("accuracy", f"LFW {d['split']}, {d['preset']['name']}: {r['recipe']}",
             f"{_pct(r['accuracy'])} (AUC {r['auc']:.3f})") for r in d["rows"]]


def simulation(d: list) -> list[Row]:
    rows = []
    for r in d:
        value = (f"{r['status']}, {r['wall_seconds']:.0f} s wall, peak RSS {r['peak_rss_gb']:.2f} GB")
        if "overhead_seconds_per_round" in r:
            value += f", overhead {r['overhead_seconds_per_round']:.1f} s / round"
        rows.append(("scale", (f"`flwr run` simulation, {r['clients']} virtual clients, "
                     f"{r['sampled']} sampled / round, {r['rounds']} rounds (tiny)"), value))
    return rows


def generic(d: dict) -> list[Row]:
    """Files that carry their own headline rows: {"rows": [{"section", "measurement", "value"}]}."""
    return [(r["section"], r["measurement"], r["value"]) for r in d.get("rows", [])]


def privacy_eval(d: dict) -> list[Row]:
    """A `minusfed privacy-eval` privacy.json: each row states its gate, never a bare number."""
    m, pix, judge = d["metrics"], d["pixel_gate"], d["judge_gate"]
    scale = f"{d['n_eval_images']} images of {d['n_eval_identities']} people"
    mf, none = m["minusface"], m["none"]
    rows = [("privacy", f"pixel recovery from X_p ({scale}): SSIM / PSNR, verdict",
             f"{mf['ssim']:.3f} / {mf['psnr']:.2f} dB: {d['verdicts']['minusface']}"),
            ("privacy", "same attacker on unprotected faces (the gate: >= 0.95 / 30 dB)",
             f"{none['ssim']:.3f} / {none['psnr']:.2f} dB: gate {'passed' if pix['passed'] else 'failed'}")]
    link = m.get("f_p linkage", {}).get("identity", {})
    if "rank1" in link:
        ch = link["chance"]
        rows.append(("privacy", "f_p linkage, zero training: rank-1 / AUC (chance)",
                     f"{link['rank1']:.3f} / {link['auc']:.3f} ({ch['rank1']:.3f} / {ch['auc']:.1f})"))
    rows.append(("privacy", "judge-scored identity of recovered faces",
                 "reported" if judge["passed"] else f"refused ({judge['quality']})"))
    for verdict in d.get("gradient_inversion", {}).get("verdict", []):
        rows.append(("privacy", "gradient inversion of one update", verdict))
    return rows


RENDERERS: dict[str, Callable[..., list[Row]]] = {"gpu": gpu, "federated_lfw": federated_lfw,
                                  "stage2_probe": stage2_probe, "lfw": lfw,
                                  "simulation": simulation, "generic": generic,
                                  "privacy_eval": privacy_eval}
SECTIONS = ("accuracy", "privacy", "speed", "scale")


def load(results: Path = RESULTS) -> list[dict]:
    """Every saved run in `results`, checked for the provenance fields and a known kind."""
    runs = []
    for path in sorted(results.glob("*.json")):
        rec = json.loads(path.read_text())
        missing = {"kind", "command", "machine", "date", "data"} - set(rec)
        if missing:
            raise ValueError(f"{path}: missing fields {sorted(missing)}")
        if rec["kind"] not in RENDERERS:
            raise ValueError(f"{path}: unknown kind {rec['kind']!r}; known: {', '.join(RENDERERS)}")
        rec["file"] = path.name
        runs.append(rec)
    return runs


def render(runs: list[dict]) -> str:
    """The README section: one table per section, every row with its machine, date and command."""
    out = [START, "",
           ("Generated by `python -m bench.report --write` from `bench/results/*.json`; details, "
            "caveats and older runs are in `BENCHMARKS.md`. LFW numbers: centre-cropped, not "
            "aligned, trained on LFW only (identity-disjoint from the test fold)."), ""]
    for section in SECTIONS:
        rows = [[what, value, f"{rec['machine']}, {rec['date']}", f"`{rec['command']}`"]
                for rec in runs for sec, what, value in RENDERERS[rec["kind"]](rec["data"])
                if sec == section]
        if rows:
            out += [f"**{section.capitalize()}**", "",
                    markdown_table(["measurement", "value", "machine, date", "reproduce with"],
                                   rows), ""]
    out.append(END)
    return "\n".join(out)


def write_readme(section: str, readme: Path) -> None:
    """Replace the section between the markers in `readme` (or append it under "## Results")."""
    text = readme.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n## Results\n\n" + section + "\n"
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.report", __doc__)
    ap.add_argument("--write", action="store_true", help="update README.md in place")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args(argv)
    section = render(load(args.results))
    if args.write:
        write_readme(section, args.readme)
        print(f"updated {args.readme}")
    else:
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
