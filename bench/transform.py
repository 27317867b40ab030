"""Front-end throughput on this machine: e, d, g (w = 64 and w = 16) and protect().

    python -m bench.transform [--batch 32] [--repeats 3] [--threads N]
    python -m bench.transform --compare-allocators     # every MINUSFED_ALLOCATOR mode side by side
    python -m bench.transform --precision-only         # only the CPU precision table

Prints img/s per stage and the ratio (e + d) / g(w = 64), all measured side by side in one run
(best of `repeats`), plus protect() latency at batch 1 and protect() img/s at batch 1, 32 and 256
(--protect-batches).  GPU numbers: `bash bench/gpu.sh`.  Target (issue 1): (e + d) <= 5% of g.
`--compare-allocators` runs the same measurement in one child process per allocator mode
(MINUSFED_ALLOCATOR, minusface/runtime.py: the settings are per process and PyTorch reads its
huge-page switch once), alternating the modes twice, and prints best-of per mode with each
child's peak RSS.
On a CPU it also prints g and protect() in every precision candidate (float32 NCHW, bf16
autocast, bf16 + channels_last; minusface/precision.py) side by side, the modes alternating in
one process (median of --repeats), with the policy's own choice (its short probe, or this
machine's cached one) marked *: the probe should pick the fastest, and never one slower than
float32.  The rows above the table run as the policy chooses (MINUSFED_CPU_PRECISION overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import (
    ROOT,
    arg_parser,
    markdown_table,
    peak_rss_mb,
    provenance,
    timings,
)
from minusface import precision
from minusface.dct import decode, encode
from minusface.frontend import MinusFaceFrontend
from minusface.generator import UNetGenerator
from minusface.runtime import (
    ALLOCATOR_ENV,
    MODES,
    THP_ENV,
    allocator_mode,
    tune_allocator,
)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up call (allocator, kernels)."""
    return min(timings(fn, repeats, warmup=1))


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.transform", __doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--channels-last", action="store_true", help="run g in channels_last")
    ap.add_argument("--protect-batches", type=int, nargs="*", default=[1, 32, 256],
                    help="protect() img/s at these batch sizes (w = 64; one timed call at >= 64)")
    ap.add_argument("--compare-allocators", action="store_true",
                    help="one child process per allocator mode, alternating, twice")
    ap.add_argument("--json", action="store_true", help="print one JSON line (for the parent)")
    ap.add_argument("--precision-only", action="store_true",
                    help="only the CPU precision table (float32 vs bf16, the policy's choice)")
    ap.add_argument("--precision-batch", type=int, default=8,
                    help="the larger batch of the precision table's g and protect() rows")
    args = ap.parse_args(argv)
    if args.compare_allocators:
        return compare_allocators(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not tune_allocator():
        print(f"warning: glibc refused allocator mode {allocator_mode()}", file=sys.stderr)
    if args.precision_only:
        print(f"{provenance()}; {precision.cpu_features().describe()}")
        print(precision_table(args.repeats, args.precision_batch))
        return 0
    torch.manual_seed(0)
    b = args.batch
    faces = torch.rand(b, 3, 112, 112) * 2 - 1
    rows: dict[str, float] = {}
    with torch.no_grad():
        coef = encode(faces)
        rows["e (encode)"] = best_seconds(lambda: encode(faces), args.repeats)
        rows["d (decode)"] = best_seconds(lambda: decode(coef), args.repeats)
        for w in (64, 16):
            g = UNetGenerator(width=w).eval()
            x = coef
            if args.channels_last:
                g = g.to(memory_format=torch.channels_last)
                x = coef.contiguous(memory_format=torch.channels_last)
            rows[f"g (w = {w})"] = best_seconds(lambda g=g, x=x: g(x), args.repeats)
        fe = MinusFaceFrontend(width=64).eval()
        rows["protect() (w = 64)"] = best_seconds(lambda: fe.protect(faces), args.repeats)
        lat = best_seconds(lambda: fe.protect(faces[:1]), args.repeats)
        protect_rates = {}
        for pb in args.protect_batches:
            batch = torch.rand(pb, 3, 112, 112) * 2 - 1
            secs = best_seconds(lambda batch=batch: fe.protect(batch), 1 if pb >= 64 else args.repeats)
            protect_rates[pb] = pb / secs
    if args.json:
        print(json.dumps({"seconds": rows, "latency_b1": lat, "protect_img_s": protect_rates,
                          "maxrss_mb": peak_rss_mb()}))
        return 0
    print(f"{provenance()}; batch {b}")
    print(markdown_table(["stage", "ms / batch", "img/s"],
                         [[name, f"{1000 * s:.1f}", f"{b / s:.1f}"] for name, s in rows.items()]))
    ratio = (rows["e (encode)"] + rows["d (decode)"]) / rows["g (w = 64)"]
    print(f"\n(e + d) / g(w = 64) = {ratio:.3f}  (target <= 0.05)")
    print(f"(e + d) / g(w = 16) = {(rows['e (encode)'] + rows['d (decode)']) / rows['g (w = 16)']:.3f}")
    print(f"protect() latency at batch 1 (w = 64): {1000 * lat:.1f} ms per image")
    for pb, rate in protect_rates.items():
        print(f"protect() at batch {pb} (w = 64): {rate:.1f} img/s")
    print(f"\nCPU precision ({precision.cpu_features().describe()}), median of {args.repeats}, "
          f"modes alternating:")
    print(precision_table(args.repeats, args.precision_batch))
    return 0


LONG_JOB_CALLS = 10_000        # the policy's choice is shown for a job of this many forwards


def precision_table(repeats: int, batch: int) -> str:
    """g and protect() in each precision candidate, alternating in this process; ms per image,
    the policy's choice for a long job (`LONG_JOB_CALLS` forwards: compiling may pay) marked *
    (its own probe, compilation included, or the cached one, at the same batch).  The compiled
    column needs a C++ compiler; without one it shows the eager fallback."""
    torch.manual_seed(0)
    gens = {64: UNetGenerator(width=64).eval(), 16: UNetGenerator(width=16).eval()}
    fe = MinusFaceFrontend(generator=gens[64]).eval()
    faces = {n: torch.rand(n, 3, 112, 112) * 2 - 1 for n in (1, batch)}
    coef = {n: encode(f) for n, f in faces.items()}
    modes = (*precision.CANDIDATES, precision.COMPILED)

    def g_run(w: int, n: int) -> dict[str, Callable[[], object]]:
        def one(plan: precision.Plan) -> Callable[[], object]:
            def run() -> None:
                with torch.no_grad(), plan.autocast():
                    plan.forward(gens[w], coef[n])
            return run
        return {c: one(precision.Plan("bench", c)) for c in modes}

    def protect_run(n: int) -> dict[str, Callable[[], object]]:
        return {c: (lambda c=c: fe.protect(faces[n], precision_mode=c, register=False))
                for c in modes}

    cases = [(f"g (w = {w}), forward, batch {n}", n, gens[w], n, g_run(w, n))
             for w, n in ((64, 1), (64, batch), (16, batch))]
    # protect() runs g in micro-batches of 2 on a CPU: the policy's plan is the one for that
    cases += [(f"protect() (w = 64), batch {n}", n, gens[64], min(n, 2), protect_run(n))
              for n in (1, batch)]
    rows = []
    for label, n, g, plan_batch, runs in cases:
        # choose first, so the probe pays a real compilation before the timing runs reuse it
        plan = precision.inference_plan("protect", g, plan_batch, mode="auto",
                                        calls=LONG_JOB_CALLS)
        ms = {c: v / n for c, v in precision.time_alternating(runs, repeats, 1).items()}
        cells = [f"{ms[c]:.1f}{' *' if c == plan.choice else ''}" for c in modes]
        rows.append([label, *cells, f"{ms['float32'] / ms[plan.choice]:.2f}x"])
    return markdown_table(["model, pass (ms / img)", "float32 NCHW", "bf16 autocast",
                           "bf16 + channels_last", "bf16 compiled", "float32 / chosen"], rows)


def compare_allocators(args: argparse.Namespace) -> int:
    """Each allocator mode in its own child process, modes alternating, twice."""
    child = [sys.executable, "-m", "bench.transform", "--json", "--batch", str(args.batch),
             "--repeats", str(args.repeats), "--protect-batches", *map(str, args.protect_batches)]
    if args.threads:
        child += ["--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(2):
        for mode in MODES:
            env = {k: v for k, v in os.environ.items() if k != THP_ENV}
            out = subprocess.run(child, capture_output=True, text=True, cwd=ROOT, check=True,
                                 env={**env, ALLOCATOR_ENV: mode})
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    b = args.batch
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp_setting = thp.read_text().strip() if thp.exists() else "n/a"
    print(f"{provenance()}; batch {b}; best of 2 child processes per mode, alternating; "
          f"kernel THP: {thp_setting}")
    pb = max(args.protect_batches) if args.protect_batches else None
    cells = []
    for mode, rs in runs.items():
        best = {k: min(r["seconds"][k] for r in rs) for k in rs[0]["seconds"]}
        e, d, g = best["e (encode)"], best["d (decode)"], best["g (w = 64)"]
        rate = max(r["protect_img_s"][str(pb)] for r in rs) if pb else float("nan")
        rss = max(r["maxrss_mb"] for r in rs)
        cells.append([mode, f"{1000 * e / b:.2f}", f"{1000 * d / b:.2f}", f"{1000 * g / b:.1f}",
                      f"{(e + d) / g:.3f}", f"{rate:.2f}", f"{rss:.0f}"])
    print(markdown_table(["allocator", "e ms/img", "d ms/img", "g(w=64) ms/img", "(e + d) / g",
                          f"protect() img/s (batch {pb})", "peak RSS MB"], cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
