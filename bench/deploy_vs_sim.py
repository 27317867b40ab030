"""Deployment vs simulation round time for the same work (issue 6).

    python -m bench.deploy_vs_sim [--nodes 3] [--rounds 1 1]

Runs the same run config twice, one after the other: once as a TLS + node-auth deployment on
loopback (`minusfed deploy local`: SuperLink + N SuperNodes, each message handled by a fresh
`flwr-clientapp` process) and once as a `flwr run` simulation with N virtual SuperNodes on Ray
(`simulation.launch`).  Same preset (tiny), sites, partitions, rounds and seeds; prints each
round's wall time (the ServerApp's `round_seconds`) and the sum of the sites' own handler time
(`client_seconds`), so the difference is what each transport adds.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from bench.common import arg_parser, markdown_table, provenance
from federation.deploy.local import deploy_local
from federation.report import read_run_log
from simulation.launch import run_simulation


def rounds_of(out: Path) -> list[dict]:
    """Per round of the run in `out`: stage, the ServerApp's round wall time and the sum of
    the sites' own handler time."""
    rounds, replies = read_run_log(out)
    clients: dict[int, float] = {}
    for rec in replies:
        m = rec["client"].get("metrics", {})
        clients[rec["round"]] = clients.get(rec["round"], 0.0) + float(m.get("client_seconds", 0.0))
    return [{"round": r["round"], "stage": r["stage"],
             "round_seconds": r["metrics"]["round_seconds"],
             "client_seconds": clients.get(r["round"], 0.0)} for r in rounds]


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.deploy_vs_sim", __doc__)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, nargs=2, default=[1, 1], metavar=("STAGE1", "STAGE2"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    base = (args.out or Path(tempfile.mkdtemp(prefix="minusfed-deploy-vs-sim-"))).resolve()
    cfg = {"preset": "tiny", "stage1-rounds": args.rounds[0], "stage2-rounds": args.rounds[1],
           "local-epochs": 1, "fraction-evaluate": 0.0, "max-identities": 4 * args.nodes,
           "server-eval-pairs": 20, "min-nodes": args.nodes}
    results = {}
    t = time.perf_counter()
    dep = deploy_local(base / "deploy", nodes=args.nodes,
                       run_config={**cfg, "out-dir": str(base / "deploy" / "run")},
                       in_memory_state=True)
    results["deployment (TLS + auth, loopback)"] = {"status": dep.status,
                                                    "wall": time.perf_counter() - t,
                                                    "rounds": rounds_of(base / "deploy" / "run")}
    t = time.perf_counter()
    sim = run_simulation({**cfg, "out-dir": str(base / "sim")}, args.nodes, num_cpus=1)
    results["simulation (Ray, 1 CPU per site)"] = {"status": sim.status,
                                                   "wall": time.perf_counter() - t,
                                                   "rounds": rounds_of(base / "sim")}
    print(f"{provenance()}; {args.nodes} sites, tiny, {args.rounds[0]} + {args.rounds[1]} rounds")
    print(markdown_table(
        ["transport", "status", "total wall", "round", "stage", "round wall",
         "sites' own time (sum)"],
        [[name, r["status"], f"{r['wall']:.0f} s", row["round"], row["stage"],
          f"{row['round_seconds']:.1f} s", f"{row['client_seconds']:.1f} s"]
         for name, r in results.items() for row in r["rounds"]]))
    (base / "deploy-vs-sim.json").write_text(json.dumps(results, indent=2))
    ok = all(str(r["status"]).endswith("completed") for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
