"""Flower + Ray simulation at scale: wall time, per-round overhead and peak memory for N clients.

    python -m bench.simulation [--clients 10 100 1000] [--sampled 10] [--rounds 3]

Each N runs `flwr run .` once on a private simulation SuperLink (`simulation.launch`), preset
tiny, LFW fold-0 training identities partitioned uniformly over the N virtual clients,
`--sampled` clients per round (fraction-train = sampled / N), `--rounds` rounds (stage 1 then
stage 2: rounds - 1 and 1), no federated evaluation and a 20-pair server evaluation.  Each
client holds `--identities-per-client` LFW identities (max-identities = N x that), so the work
per sampled client is the same at every N and what grows with N is Flower's and Ray's.

Reported per N: total wall time, mean round wall time (the strategy's `start` for one round),
mean client time per round (each sampled ClientApp's own handler time, summed), the overhead
estimate  round wall - sum(client time) / actors  (actors = concurrent ClientApps = CPUs /
num-cpus), and the peak resident memory of the SuperLink's whole process tree (SuperLink,
simulation engine, Ray and its workers; sampled every 0.2 s from /proc; shared pages are counted
once per process, so it overestimates).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    PeakSampler,
    arg_parser,
    descendants,
    markdown_table,
    provenance,
    sum_kb,
)
from federation.report import read_run_log
from simulation.launch import run_simulation


def descendants_rss_kb() -> int:
    """Resident memory of every process started below this one (the SuperLink and all it
    spawns), kB."""
    return sum_kb("VmRSS", descendants(os.getpid()))


def round_stats(out_dir: Path) -> dict:
    """Per round: the ServerApp's wall time, the sampled sites' summed handler time and how
    many sites replied."""
    rounds, replies = read_run_log(out_dir)
    clients: dict[int, list[float]] = {}
    for rec in replies:
        m = rec["client"].get("metrics", {})
        clients.setdefault(rec["round"], []).append(float(m.get("client_seconds", 0.0)))
    return {"round_seconds": [r["metrics"]["round_seconds"] for r in rounds],
            "client_seconds": [sum(clients.get(r["round"], [])) for r in rounds],
            "clients_per_round": [len(clients.get(r["round"], [])) for r in rounds]}


def run_one(n: int, sampled: int, rounds: int, cpus: int, num_cpus: int, out: Path,
            identities_per_client: int = 1) -> dict:
    """One `flwr run` simulation with `n` virtual clients, its times and peak memory."""
    cfg = {"preset": "tiny", "stage1-rounds": rounds - 1, "stage2-rounds": 1, "local-epochs": 1,
           "fraction-train": min(1.0, sampled / n), "fraction-evaluate": 0.0, "min-nodes": 2,
           "max-identities": n * identities_per_client, "server-eval-pairs": 20,
           "out-dir": str(out)}
    t0 = time.perf_counter()
    with PeakSampler(descendants_rss_kb, interval=0.2) as sampler:
        result = run_simulation(cfg, n, num_cpus=num_cpus,
                                federation_extra={"init-args-num-cpus": cpus}, timeout=3600)
    wall = time.perf_counter() - t0
    peak = sampler.peak * 1024
    row = {"clients": n, "sampled": sampled, "rounds": rounds, "status": result.status,
           "wall_seconds": wall, "peak_rss_gb": peak / 1e9}
    if result.completed:
        stats = round_stats(out)
        actors = max(1, cpus // num_cpus)
        rs, cs = stats["round_seconds"], stats["client_seconds"]
        row.update(stats)
        row["mean_round_seconds"] = sum(rs) / len(rs)
        row["mean_client_seconds_per_round"] = sum(cs) / len(cs)
        row["overhead_seconds_per_round"] = sum(r - c / min(actors, k) for r, c, k in
                                                zip(rs, cs, stats["clients_per_round"])) / len(rs)
    else:
        row["details"] = result.details
    return row


def table(rows: list[dict]) -> str:
    """One line per N; a run that did not complete shows its status and memory only."""
    cells = []
    for r in rows:
        head = [r["clients"], r["sampled"], r["rounds"], r["status"], f"{r['wall_seconds']:.0f} s"]
        peak = f"{r['peak_rss_gb']:.2f} GB"
        if "mean_round_seconds" not in r:
            cells.append([*head, "", "", "", peak])
            continue
        cells.append([*head, f"{r['mean_round_seconds']:.1f} s",
                      f"{r['mean_client_seconds_per_round']:.1f} s",
                      f"{r['overhead_seconds_per_round']:.1f} s", peak])
    return markdown_table(["virtual clients", "sampled / round", "rounds", "status", "wall time",
                           "mean round", "client time / round (sum)", "overhead / round",
                           "peak RSS (process tree)"], cells)


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.simulation", __doc__)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--sampled", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs given to Ray")
    ap.add_argument("--num-cpus", type=int, default=1, help="CPUs per ClientApp")
    ap.add_argument("--identities-per-client", type=int, default=1,
                    help="LFW identities per virtual client (the same per-client work at every N)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (stage 1 and stage 2)")
    base = args.out or Path(tempfile.mkdtemp(prefix="minusfed-simbench-"))
    rows = []
    for n in args.clients:
        row = run_one(n, args.sampled, args.rounds, args.cpus, args.num_cpus, base / f"n{n}",
                      args.identities_per_client)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
    print(f"\n{provenance()}; Ray with {args.cpus} CPUs, {args.num_cpus} per ClientApp, "
          "preset tiny")
    print(table(rows))
    (base / "simulation-bench.json").write_text(json.dumps(rows, indent=2))
    return 0 if all(str(r["status"]).endswith("completed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
