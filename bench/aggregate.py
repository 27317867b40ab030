"""Server-side aggregation throughput: NumPy, Flower FedAvg, streaming and Ray backends.

    python -m bench.aggregate [--sizes 10:paper,100:paper,1000:cpu-small] [--n 10,100]
                              [--model paper|paper-stage1|cpu-small|tiny] [--methods ...]
                              [--quick] [--append BENCHMARKS.md]

Default cases: the paper model (stage 2, the shared IR-50 w = 64 recognizer: 467 keys, 174.5 MB
per update) at N = 10 and N = 100, and N = 1000 updates of the cpu-small preset's recognizer
(IR-18 w = 16, 15.7 MB): N = 1000 at the paper size is 175 GB of update bytes per method
(minutes per method on 2 cores), which would break the 10-minute budget of the default run;
`--sizes 1000:paper --methods streaming` runs it.

Each case (N updates of one model's shared keys) is aggregated by each method in a fresh
subprocess, one at a time, so peak memory can be read per method. Reported: seconds, GB/s of
client-update bytes consumed (N x update bytes / seconds), that rate as a fraction of this
machine's memory-copy bandwidth (np.copyto of 512 MiB, read + write bytes counted), peak RSS
during aggregation (VmHWM, reset once the inputs exist, so it is inputs + working memory) and
the private working memory: peak RssAnon sampled every 5 ms minus RssAnon with the inputs
already made (shared-memory pages such as Ray's object store are left out of it).

Inputs: N updates cannot be held in memory at the paper size (N = 1000 x 175 MB), so updates
are made on the fly without copying: update i is one of 4 distinct pre-made buffer sets (i mod
4) with its own weight (num-examples = 1 + (37 i mod 100)), so the timings measure aggregation,
not generation. Flower's `aggregate_arrayrecords` needs every reply at once: it gets N
RecordDicts that share 4 ArrayRecords (its cost includes `Array.numpy()` decoding, which a
real server pays too); a real Flower server would hold all N replies (N x update MB).

Methods:
  numpy          plain NumPy: float64 accumulators, ``acc[k] += w * a[k]`` per key
  flower         flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords (FedAvg's
                 arithmetic: float32, temporaries per key) on RecordDicts (N <= --flower-max-n)
  streaming      strategy.streaming.StreamingWeightedMean as the strategy's "streaming"
                 backend runs it: float32 accumulators, torch kernel (fused
                 add_(a, alpha=w)), updates folded 8 at a time per cache-sized block
  streaming-g1   the same, one update at a time (the previous setting)
  streaming-numpy  the same float32 accumulators, NumPy kernel (w * a into a cache-sized
                   scratch block, then add: two ufunc passes per block, one thread)
  streaming-f64  float64 accumulators (float32 updates go through the scratch blocks)
  ray            strategy.ray_backend.ray_weighted_mean on a fresh local Ray instance with all
                 CPUs (the strategy's "ray" backend; startup and worker warm-up not timed)
  server         everything the server does per reply, from received ArrayRecords: validation
                 (keys, shapes, dtypes, finite values; no norm bound, the default) on
                 zero-copy views, then the "streaming" mean; the N replies share 4 ArrayRecords
  server-norm    the same with a norm bound configured (max-update-norm > 0)
  server-previous  the same with the previous code: Flower's Array.numpy() (a copy) for both
                 validation and averaging, full-size float64 temporaries for the finiteness
                 check and the norm (computed even without a bound), one update at a time
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import (
    ROOT,
    PeakSampler,
    arg_parser,
    command_line,
    descendants,
    markdown_table,
    peak_rss_mb,
    provenance,
    reset_peak_rss,
    status_kb,
    sum_kb,
)

METHODS = ("numpy", "flower", "streaming", "streaming-g1", "streaming-numpy", "streaming-f64",
           "ray", "server", "server-norm", "server-previous")
MODELS = ("paper", "paper-stage1", "cpu-small", "tiny")
DEFAULT_SIZES = "10:paper,100:paper,1000:cpu-small"
QUICK_SIZES = "10:tiny,100:tiny"
DISTINCT = 4  # pre-made buffer sets the updates rotate among


# --- model layouts ----------------------------------------------------------------------------


def model_layout(model: str) -> list[tuple[str, list[int], str]]:
    """(key, shape, dtype) of the shared keys the server aggregates for `model`.

    paper: stage 2 (recognizer IR-50, w = 64, 3 input channels); paper-stage1: generator
    U-Net w = 64 + recognizer IR-50 w = 64 on the 192-channel X_p; cpu-small / tiny: stage 2
    of those presets. Built on torch's meta device (no memory, no init).
    """
    import torch  # pylint: disable=import-outside-toplevel

    from minusface.backbones import build_backbone  # pylint: disable=import-outside-toplevel
    from minusface.generator import UNetGenerator  # pylint: disable=import-outside-toplevel
    from minusface.presets import get_preset  # pylint: disable=import-outside-toplevel

    preset = get_preset("paper" if model.startswith("paper") else model)
    with torch.device("meta"):
        modules = {"recognizer": build_backbone(preset.backbone, 3, width=preset.backbone_width)}
        if model == "paper-stage1":
            modules = {"generator": UNetGenerator(width=preset.generator_width),
                       "recognizer": build_backbone(preset.backbone, 192,
                                                    width=preset.backbone_width)}
        state = {}
        for prefix, module in modules.items():
            for key, value in module.state_dict().items():
                state[f"{prefix}.{key}"] = value
    # the key scheme of task.wire.flatten ("<module>.<state-dict key>")
    return [(key, list(value.shape), str(value.dtype).removeprefix("torch."))
            for key, value in state.items()]


def layout_bytes(layout: list[tuple[str, list[int], str]]) -> int:
    """Bytes of one update with this layout."""
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
               for _, shape, dtype in layout)


# --- child: one method on one case ------------------------------------------------------------


def _descendants_anon_kb() -> Callable[[], float]:
    """RssAnon summed over this process's descendants (Ray's raylet, GCS and workers); the
    process list is re-read every 20th call (a /proc walk per sample would perturb Ray)."""
    pids: list[int] = []
    calls = 0

    def measure() -> float:
        nonlocal pids, calls
        if calls % 20 == 0:
            pids = descendants(os.getpid())
        calls += 1
        return sum_kb("RssAnon", pids)
    return measure


def make_buffers(layout: list[tuple[str, list[int], str]], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """DISTINCT update buffer sets: random float arrays (scaled copies), small int counters."""
    rng = np.random.default_rng(seed)
    sets: list[dict[str, np.ndarray]] = [{} for _ in range(DISTINCT)]
    for key, shape, dtype in layout:
        if np.dtype(dtype).kind == "f":
            base = rng.random(shape, dtype=np.float32).astype(dtype, copy=False)
            for j, arrays in enumerate(sets):
                arrays[key] = base if j == 0 else base * np.asarray(1 + 0.01 * j, base.dtype)
        else:
            for j, arrays in enumerate(sets):
                arrays[key] = np.full(shape, 100 + j, dtype)
    return sets


def weight(i: int) -> float:
    """Update i's num-examples: spread over 1..100, the same in every method."""
    return float(1 + (37 * i) % 100)


def run_child(spec: dict) -> dict:
    """Make the inputs, then time one method's aggregation of them and read its memory."""
    layout, n, method = spec["layout"], spec["n"], spec["method"]
    sets = make_buffers(layout)
    like = sets[0]
    nbytes = layout_bytes(layout)
    extra: dict[str, object] = {}

    def stream():
        for i in range(n):
            yield sets[i % DISTINCT], weight(i)

    if method == "flower":
        from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
        from flwr.serverapp.strategy.strategy_utils import (
            aggregate_arrayrecords,
        )

        records = [ArrayRecord({k: Array(v) for k, v in s.items()}) for s in sets]
        del sets, like
        contents = [RecordDict({"arrays": records[i % DISTINCT],
                                "metrics": MetricRecord({"num-examples": weight(i)})})
                    for i in range(n)]

        def run():
            return aggregate_arrayrecords(contents, "num-examples")
    elif method == "numpy":
        def run():
            acc = {k: np.zeros(v.shape, np.float64) for k, v in like.items()}
            total = 0.0
            for arrays, w in stream():
                for k, a in arrays.items():
                    acc[k] += w * a
                total += w
            out = {}
            for k, a in acc.items():
                a /= total
                out[k] = (np.rint(a) if like[k].dtype.kind in "iu" else a).astype(like[k].dtype)
            return out
    elif method.startswith("server"):
        from flwr.app import Array, ArrayRecord

        from strategy.aggregation import BACKEND_ACCUMULATE, BACKEND_GROUP
        from strategy.streaming import StreamingWeightedMean
        from strategy.validation import reference_to_numpy, validate_update

        records = [ArrayRecord({k: Array(v) for k, v in s.items()}) for s in sets]
        reference = reference_to_numpy(records[0])
        del sets, like
        like = reference
        bound = 1e30 if method == "server-norm" else None   # computed, never exceeded

        if method in ("server", "server-norm"):
            def run():
                acc = StreamingWeightedMean(BACKEND_ACCUMULATE, group=BACKEND_GROUP)
                for i in range(n):
                    rec = records[i % DISTINCT]
                    if validate_update(rec, reference, bound):
                        raise RuntimeError("a valid update was rejected")
                    acc.add(reference_to_numpy(rec), weight(i))
                return acc.result(like)
        else:
            def run():
                acc = StreamingWeightedMean(BACKEND_ACCUMULATE, group=1)
                for i in range(n):
                    rec = records[i % DISTINCT]
                    sq = 0.0
                    for key, expected in reference.items():      # the previous validation
                        value = rec[key].numpy()
                        if not np.issubdtype(value.dtype, np.inexact):
                            continue
                        if value.size - int(np.count_nonzero(np.isfinite(value))):
                            raise RuntimeError("non-finite")
                        diff = value.astype(np.float64) - expected.astype(np.float64)
                        sq += float(np.vdot(diff, diff))
                    if bound is not None and sq > bound ** 2:
                        raise RuntimeError("norm")
                    acc.add({k: a.numpy() for k, a in rec.items()}, weight(i))
                return acc.result(like)
    elif method.startswith("streaming"):
        from strategy.aggregation import BACKEND_GROUP
        from strategy.streaming import StreamingWeightedMean

        accumulate = "float64" if method == "streaming-f64" else "float32"
        kernel = "numpy" if method == "streaming-numpy" else "torch"
        group = BACKEND_GROUP if method == "streaming" else 1

        def run():
            acc = StreamingWeightedMean(accumulate, kernel=kernel, group=group)
            for arrays, w in stream():
                acc.add(arrays, w)
            return acc.result(like)
    elif method == "ray":
        import ray

        from strategy.ray_backend import (
            DEFAULT_FAN_IN,
            DEFAULT_SHARD_BYTES,
            plan_shards,
            ray_weighted_mean,
        )

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, object_store_memory=spec["object_store_bytes"])
        tiny = {"w": np.ones(8, np.float32)}
        ray_weighted_mean(((tiny, 1.0) for _ in range(4 * (os.cpu_count() or 1))), fan_in=2)
        extra["ray_start_s"] = round(time.perf_counter() - t0, 1)
        extra["shards"] = len(plan_shards({k: v.nbytes for k, v in like.items()},
                                          DEFAULT_SHARD_BYTES))
        extra["fan_in"] = DEFAULT_FAN_IN

        def run():
            return ray_weighted_mean(stream(), like=like)
    else:
        raise ValueError(f"unknown method {method!r}")

    rss_before = status_kb("VmRSS")
    anon_before = status_kb("RssAnon") or 0
    own = PeakSampler(lambda: status_kb("RssAnon") or 0, interval=0.005)
    ray_procs = PeakSampler(_descendants_anon_kb(), interval=0.05) if method == "ray" else None
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    with own:
        if ray_procs is not None:
            with ray_procs:
                result = run()
        else:
            result = run()
    seconds = time.perf_counter() - t0
    extra["anon_delta_mb"] = (own.peak - anon_before) / 1024
    peak = (status_kb("VmHWM") or 0) / 1024 if reset else peak_rss_mb()
    if ray_procs is not None:
        import ray

        extra["ray_procs_anon_mb"] = round(ray_procs.peak / 1024)
        ray.shutdown()
    del result
    return {"seconds": seconds, "gb_per_s": n * nbytes / seconds / 1e9,
            "rss_before_mb": (rss_before or 0) / 1024, "peak_mb": peak,
            "peak_reset": reset, **extra}


# --- parent -----------------------------------------------------------------------------------


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """GB/s of np.copyto on `nbytes` arrays, read + write bytes counted, best of `repeats`."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def parse_sizes(text: str) -> list[tuple[int, str]]:
    """"10:paper,100:tiny" -> [(10, "paper"), (100, "tiny")]."""
    cases = []
    for item in text.split(","):
        n, _, model = item.strip().partition(":")
        if model not in MODELS:
            raise SystemExit(f"--sizes: unknown model {model!r} in {item!r}; valid: {MODELS}")
        cases.append((int(n), model))
    return cases


def run_case(spec: dict, timeout: float) -> dict:
    """One method on one case in a fresh interpreter (its own peak memory); {"error"} if not."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
        path = fh.name
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.aggregate", "--child", path], text=True,
                              capture_output=True, timeout=timeout, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.aggregate", __doc__)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default=None,
                    help=f"cases N:model, comma separated (default {DEFAULT_SIZES})")
    ap.add_argument("--n", default=None, help="numbers of updates, with --model (e.g. 10,100)")
    ap.add_argument("--model", default="paper", choices=MODELS)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--flower-max-n", type=int, default=100,
                    help="largest N for the flower method (it needs every reply in memory)")
    ap.add_argument("--object-store-gb", type=float, default=4.0,
                    help="object store of the local Ray instance")
    ap.add_argument("--timeout", type=float, default=300, help="per method and case, seconds")
    ap.add_argument("--quick", action="store_true", help=f"--sizes {QUICK_SIZES}")
    ap.add_argument("--append", type=Path, default=None, help="append the table to this file")
    args = ap.parse_args(argv)

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        print(json.dumps(run_child(spec)))
        return 0

    if args.sizes:
        cases = parse_sizes(args.sizes)
    elif args.n:
        cases = [(int(n), args.model) for n in args.n.split(",")]
    else:
        cases = parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    methods = [m.strip() for m in args.methods.split(",")]
    for method in methods:
        if method not in METHODS:
            raise SystemExit(f"--methods: unknown {method!r}; valid: {', '.join(METHODS)}")

    t_start = time.time()
    layouts = {model: model_layout(model) for model in {m for _, m in cases}}
    bandwidth = copy_bandwidth()
    load_before = os.getloadavg()
    rows = []
    for n, model in cases:
        layout = layouts[model]
        mb = layout_bytes(layout) / 1e6
        for method in methods:
            if method == "flower" and n > args.flower_max_n:
                continue
            spec = {"layout": layout, "n": n, "method": method,
                    "object_store_bytes": int(args.object_store_gb * 1e9)}
            res = run_case(spec, args.timeout)
            res.update(n=n, model=model, mb=mb, method=method)
            rows.append(res)
            shown = ("ERROR " + res["error"]) if "error" in res else (
                f"{res['seconds']:.2f} s, {res['gb_per_s']:.2f} GB/s, "
                f"peak {res['peak_mb']:.0f} MiB")
            print(f"# N={n} {model} {method}: {shown}", file=sys.stderr, flush=True)
    bandwidth_after = copy_bandwidth()
    load_after = os.getloadavg()

    header = [
        f"`{command_line('bench.aggregate', argv)}`",
        f"{provenance()}; total {time.time() - t_start:.0f} s",
        (f"memory-copy bandwidth (np.copyto 512 MiB, read + write): {bandwidth:.1f} GB/s "
         f"before, {bandwidth_after:.1f} GB/s after; load average {load_before[0]:.2f} before, "
         f"{load_after[0]:.2f} after (other processes share the machine)"),
        (f"updates rotate among {DISTINCT} pre-made buffer sets, weight 1 + (37 i mod 100); "
         "GB/s = N x update bytes / seconds"),
    ]
    cells = []
    for r in rows:
        label = f"{r['model']} ({r['mb']:.1f})"
        if "error" in r:
            cells.append([r["n"], label, r["method"], *["—"] * 5, r["error"]])
            continue
        notes = []
        if r["method"] == "flower":
            notes.append(f"a real server holds all N replies: {r['n'] * r['mb'] / 1e3:.1f} GB")
        if r["method"] == "ray":
            notes.append(f"{r['shards']} shards, fan-in {r['fan_in']}, Ray start "
                         f"{r['ray_start_s']} s (not timed); Ray processes' private peak "
                         f"{r['ray_procs_anon_mb']} MiB + object store (shared memory, "
                         "in peak RSS)")
        if not r.get("peak_reset", True):
            notes.append("peak = ru_maxrss (incl. setup)")
        cells.append([r["n"], label, r["method"], f"{r['seconds']:.2f}", f"{r['gb_per_s']:.2f}",
                      f"{100 * r['gb_per_s'] / bandwidth:.0f}%", f"{r['peak_mb']:.0f}",
                      f"{r['anon_delta_mb']:.0f}", "; ".join(notes)])
    lines = [markdown_table(["N", "model (MB/update)", "method", "seconds", "GB/s",
                             "% of copy BW", "peak RSS MiB", "private peak over inputs MiB",
                             "notes"], cells)]
    lines.append("")
    for n, model in cases:
        done = [r for r in rows if (r["n"], r["model"]) == (n, model) and "error" not in r]
        if not done:
            continue
        best = max(done, key=lambda r: r["gb_per_s"])
        ray_row = next((r for r in done if r["method"] == "ray"), None)
        vs_ray = (f"; ray at {ray_row['gb_per_s'] / best['gb_per_s']:.2f}x of it"
                  if ray_row is not None and ray_row is not best else "")
        lines.append(f"- N = {n}, {model}: fastest {best['method']} "
                     f"({best['gb_per_s']:.2f} GB/s){vs_ray}")
    text = "\n".join(header) + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with args.append.open("a", encoding="utf-8") as fh:
            fh.write("\n## Aggregation throughput (issue 7)\n\n"
                     + "\n\n".join(header) + "\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
