"""Pooled vs federated stage 2 side by side: same stage 1, same faces, same epochs.

    python -m bench.pooled --preset cpu-small --sites 4 --max-identities 60 --stage1-rounds 2 \\
        --epochs 3 | tee runs/pooled.txt

1. Stage 1 once (in-process federation, `stage2-rounds` = 0); its checkpoint is copied twice.
2. Federated stage 2 from that checkpoint: `epochs` rounds of 1 local epoch, FedAvg of f_p.
3. Pooled stage 2 from the same checkpoint: every site uploads its X_p (protect-copies = the
   preset's repeat, so an epoch takes as many steps as a federated one), the server trains f_p
   for `epochs` epochs on Ray Train with --workers workers.
4. Ray Train throughput: the pooled training again on the same spool with 1 worker
   (--no-scaling skips it).
Prints the server-side LFW benchmark (held-out fold), the sites' own evaluation, stage-2 wall
time and the bytes each site sent and received in stage 2, with machine, date and commit.
The in-process federation runs its sites one after another in this process (no Ray); the
pooled training runs in its own process on a local Ray.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import simulation.inprocess as ip
from bench.common import (
    DATA_HELP,
    RUNS,
    arg_parser,
    command_line,
    data_path,
    markdown_table,
    provenance,
    site_configs,
)
from federation.pooled import array_bytes
from federation.report import read_run_log
from minusface.presets import PRESETS, get_preset
from strategy.pooled_train import PROGRESS, PooledJob, run_pooled_training


def _array_bytes(records) -> int:
    return sum(array_bytes(rec) for rec in records.values())


@contextmanager
def stage2_bytes(counts: dict[int, dict[str, int]]) -> Iterator[None]:
    """While active, count the array bytes of every stage-2 message and reply per site."""
    original = ip.InProcessGrid.send_and_receive

    def counting(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(original(self, messages, timeout=timeout))
        by_node = {r.metadata.src_node_id: r for r in replies}
        for m in messages:
            conf = m.content.get("config", {})
            if conf.get("stage") != "stage2":
                continue
            node = m.metadata.dst_node_id
            counts[node]["received"] += _array_bytes(m.content.array_records)
            reply = by_node.get(node)
            if reply is not None and not reply.has_error():
                counts[node]["sent"] += _array_bytes(reply.content.array_records)
        return replies

    ip.InProcessGrid.send_and_receive = counting
    try:
        yield
    finally:
        ip.InProcessGrid.send_and_receive = original


def config(args, data: Path, out: Path, **over) -> dict:
    cfg = {"preset": args.preset, "stage1-rounds": args.stage1_rounds, "stage2-rounds": 0,
           "local-epochs": 1, "data-path": str(data), "out-dir": str(out),
           "min-nodes": args.sites, "max-identities": args.max_identities,
           "server-eval-pairs": args.eval_pairs, "seed": args.seed}
    cfg.update(over)
    return cfg


def stage2_row(out: Path) -> dict:
    rounds, _ = read_run_log(out)
    last = [r for r in rounds if r["stage"] == "stage2"]
    m = last[-1]["metrics"]
    return {"server_accuracy": m["server_accuracy"], "server_auc": m["server_auc"],
            "server_tar": m.get("server_tar_at_far_1e-2"),
            "clients_accuracy": m.get("clients_evaluate_accuracy"),
            "seconds": sum(r["metrics"]["round_seconds"] for r in last)}


def throughput(folder: Path) -> float:
    lines = [json.loads(x) for x in (folder / PROGRESS).read_text().splitlines()]
    return statistics.median(x["img_per_s"] for x in lines)


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser("bench.pooled", __doc__)
    parser.add_argument("--data", type=Path, default=None, help=DATA_HELP)
    parser.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--max-identities", type=int, default=60)
    parser.add_argument("--stage1-rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="stage-2 rounds / pooled epochs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eval-pairs", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RUNS / "bench-pooled")
    parser.add_argument("--no-scaling", action="store_true",
                        help="skip step 4 (the 1-worker rerun of the pooled training)")
    args = parser.parse_args(argv)
    data = data_path(args.data)
    preset = get_preset(args.preset)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)

    t0 = time.perf_counter()
    stage1 = args.out / "stage1"
    ip.run_inprocess(config(args, data, stage1), args.sites,
                     site_configs(args.sites, args.out / "cache", args.out / "state-stage1"))
    stage1_seconds = time.perf_counter() - t0
    rows, sizes = [], {}
    for mode in ("federated", "pooled"):
        out = args.out / mode
        shutil.copytree(stage1, out)
        counts: dict[int, dict[str, int]] = defaultdict(lambda: {"sent": 0, "received": 0})
        over = {"stage2-rounds": args.epochs, "stage2-mode": mode,
                "protect-copies": preset.repeat, "pooled-workers": args.workers}
        with stage2_bytes(counts):
            ip.run_inprocess(config(args, data, out, **over), args.sites,
                             site_configs(args.sites, args.out / "cache", args.out / f"state-{mode}"))
        sizes[mode] = counts
        rows.append((mode, stage2_row(out)))

    pooled = args.out / "pooled" / "pooled"
    rates = {args.workers: throughput(pooled)}
    if not args.no_scaling:
        job = json.loads((pooled / "job.json").read_text())
        one = args.out / "pooled-1-worker"
        run_pooled_training(PooledJob(**{**job, "workers": 1, "folder": str(one)}))
        rates[1] = throughput(one)

    print(f"# bench.pooled: {command_line('bench.pooled', argv)}")
    print(f"# {provenance()}")
    print(f"# preset {args.preset}, {args.sites} sites, {args.max_identities} identities, stage 1: "
          f"{args.stage1_rounds} round(s) in {stage1_seconds:.0f} s (shared), stage 2: "
          f"{args.epochs} round(s) / epoch(s); server benchmark: {args.eval_pairs} LFW View 2 "
          "pairs of fold 0 (identities no site holds)\n")
    table = []
    for mode, r in rows:
        sent = [c["sent"] for c in sizes[mode].values()]
        received = [c["received"] for c in sizes[mode].values()]
        table.append([mode, f"{100 * r['server_accuracy']:.2f}", f"{r['server_auc']:.4f}",
                      f"{r['server_tar']:.3f}", f"{100 * (r['clients_accuracy'] or 0):.2f}",
                      f"{r['seconds']:.0f}", f"{statistics.mean(sent) / 1e6:.1f}",
                      f"{statistics.mean(received) / 1e6:.1f}"])
    print(markdown_table(["stage 2", "server acc %", "AUC", "TAR@1e-2", "sites' acc %",
                          "stage-2 wall s", "MB sent / site", "MB received / site"], table))
    print()
    base = rates.get(1)
    print(markdown_table(["Ray Train workers", "img/s (median epoch)", "ratio to 1 worker"],
                         [[w, f"{rates[w]:.0f}", f"{rates[w] / base:.2f}x" if base else "n/a"]
                          for w in sorted(rates)]))


if __name__ == "__main__":
    main()
