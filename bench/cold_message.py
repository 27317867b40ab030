"""What one ClientApp message costs in a fresh process vs a warm one (issue 7, client round trip).

    python -m bench.cold_message [--preset tiny] [--max-identities 12] [--repeats 2]

A deployed SuperNode (Flower 1.42) handles every message in a fresh `flwr-clientapp` process; a
simulation's Ray actors stay warm.  For each message kind (stage-1 train, stage-2 train,
evaluate) this runs, in a new Python process: the ClientApp's imports, `import torch._dynamo`
on its own (torch.optim imports it lazily at the first optimizer: `Optimizer.__init__` is
wrapped by `torch._disable_dynamo` and `step` calls `torch._dynamo.graph_break()`), the handler
once (cold) and the same message again (warm).  cold - warm is what a fresh process adds beyond
the imports (measured: the first convolutions, the first encode, listing the site's
identities).  The site is
partition 0 of 2 of `--max-identities` LFW identities, as in the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    DATA_HELP,
    ROOT,
    arg_parser,
    data_path,
    git_commit,
    markdown_table,
    provenance,
)

KINDS = ("stage1", "stage2", "evaluate")

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from clients.client_app import app
from task.records import FROZEN_GENERATOR, STAGE1, STAGE2
from task.models import initial_arrays
from minusface.presets import get_preset
kind, data, out, preset, max_ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
t1 = time.perf_counter()
if kind != "evaluate":
    import torch._dynamo  # what torch.optim would import inside the first train handler
t2 = time.perf_counter()
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1   # no SuperNode here
cfg = {"preset": preset, "stage1-rounds": 1, "stage2-rounds": 1, "local-epochs": 1,
       "fraction-train": 1.0, "data-path": data, "out-dir": out, "min-nodes": 2,
       "max-identities": max_ids, "server-eval-pairs": 20}
p = get_preset(preset)
stage = STAGE1 if kind == "stage1" else STAGE2
content = {"arrays": ArrayRecord(initial_arrays(stage, p, 0)),
           "config": ConfigRecord({"stage": stage, "lr": 0.01, "local-epochs": 1, "server-round": 1})}
if stage == STAGE2:
    g = initial_arrays(STAGE1, p, 0)
    content[FROZEN_GENERATOR] = ArrayRecord({k: v for k, v in g.items() if k.startswith("generator.")})
msg_kind = "evaluate" if kind == "evaluate" else "train"
times, metrics = [], {}
for _ in range(2):     # cold, then warm: same process, same message
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                  state=RecordDict(), run_config=cfg)
    msg = Message(RecordDict(dict(content)), 7, msg_kind, group_id="1")
    s = time.perf_counter()
    reply = app(msg, ctx)
    times.append(time.perf_counter() - s)
    if reply.has_error():
        raise SystemExit(f"{kind}: the ClientApp replied with an error: {reply.error}")
    metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
print(json.dumps({"kind": kind, "imports_s": t1 - t0, "dynamo_import_s": t2 - t1,
                  "cold_handler_s": times[0], "warm_handler_s": times[1],
                  "dynamo_loaded": "torch._dynamo" in sys.modules,
                  "num_examples": metrics.get("num-examples"),
                  "train_seconds": metrics.get("train_seconds")}))
"""


def measure(kind: str, data: Path, out: Path, preset: str, max_ids: int) -> dict:
    """One message kind handled twice in a fresh interpreter (started in the checkout, so it
    imports this code): the row of timings it prints."""
    # the site's cache lives with the benchmark's outputs; no head file, so every process starts
    # a fresh head as a first-round message does (and none restores another's)
    env = {**os.environ, "MINUSFED_CACHE_DIR": str(out / "cache"), "MINUSFED_STATE_DIR": "off"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(data), str(out), preset,
                           str(max_ids)], capture_output=True, text=True, env=env, cwd=ROOT,
                          check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} message failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_wall_s"] = wall
    return row


def table(rows: list[dict]) -> str:
    """One line per fresh process: where its time went."""
    cells = []
    for r in rows:
        dyn = (f"{r['dynamo_import_s']:.2f}" if r["kind"] != "evaluate" else
               "imported by the handler" if r["dynamo_loaded"] else "not needed")
        # a fresh process pays the imports, dynamo (train messages: imported before the handler,
        # so the cold handler time excludes it) and the cold handler's extra over a warm one
        adds = r["imports_s"] + r["dynamo_import_s"] + r["cold_handler_s"] - r["warm_handler_s"]
        total = r["imports_s"] + r["dynamo_import_s"] + r["cold_handler_s"]
        cells.append([r["kind"], f"{r['process_wall_s']:.2f}", f"{r['imports_s']:.2f}", dyn,
                      f"{r['cold_handler_s']:.2f}", f"{r['warm_handler_s']:.2f}", f"{adds:.2f}",
                      f"{adds / total:.0%}"])
    return markdown_table(["message", "process wall s", "imports s", "torch._dynamo import s",
                           "cold handler s", "warm handler s", "fresh process adds s",
                           "share of the cold message"], cells)


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.cold_message", __doc__)
    ap.add_argument("--data", type=Path, default=None, help=DATA_HELP)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--max-identities", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per message kind")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        ap.error(f"--kinds: unknown {sorted(unknown)}; valid: {', '.join(KINDS)}")
    data = data_path(args.data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="minusfed-cold-") as out:
        for _ in range(args.repeats):         # kinds alternate, so drifting load hits each alike
            for kind in kinds:
                rows.append(measure(kind, data, Path(out), args.preset,
                                    args.max_identities))
                print(f"{kind}: {rows[-1]['process_wall_s']:.1f} s", file=sys.stderr, flush=True)
    commit = git_commit()
    print(f"\n{provenance()}; preset {args.preset}, site = partition 0 of 2 of "
          f"{args.max_identities} identities")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "max_identities": args.max_identities,
                                         "commit": commit, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
