"""Front-end throughput on this machine: e, d, g (w = 64 and w = 16) and protect().

    python bench/transform.py [--batch 32] [--repeats 3] [--threads N]

Prints img/s per stage and the ratio (e + d) / g(w = 64), all measured side by side in one run
(best of `repeats`), plus protect() latency at batch 1 and protect() img/s at batch 1, 32 and 256
(--protect-batches).  GPU numbers: bench/gpu.sh.  Target (issue 1): (e + d) <= 5% of g.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minusface.dct import decode, encode  # noqa: E402
from minusface.frontend import MinusFaceFrontend  # noqa: E402
from minusface.generator import UNetGenerator  # noqa: E402
from minusface.runtime import tune_allocator  # noqa: E402


def best_seconds(fn, repeats: int) -> float:
    fn()                                            # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--channels-last", action="store_true", help="run g in channels_last")
    ap.add_argument("--protect-batches", type=int, nargs="*", default=[1, 32, 256],
                    help="protect() img/s at these batch sizes (w = 64; one timed call at >= 64)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
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
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    print(f"{platform.node()} {platform.machine()} torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {b}, commit {commit}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| stage | ms / batch | img/s |\n|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {1000 * s:.1f} | {b / s:.1f} |")
    ratio = (rows["e (encode)"] + rows["d (decode)"]) / rows["g (w = 64)"]
    print(f"\n(e + d) / g(w = 64) = {ratio:.3f}  (target <= 0.05)")
    print(f"(e + d) / g(w = 16) = {(rows['e (encode)'] + rows['d (decode)']) / rows['g (w = 16)']:.3f}")
    print(f"protect() latency at batch 1 (w = 64): {1000 * lat:.1f} ms per image")
    for pb, rate in protect_rates.items():
        print(f"protect() at batch {pb} (w = 64): {rate:.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
