"""Recognition service: f_p alone vs through the service, verify latency, identify search.

    python -m bench.service [--backbone ir18 --backbone-width 16] [--batches 1,8,32]
                            [--clients 4] [--requests 40] [--galleries 10000,100000,1000000]

Side by side in one run, on one machine:

* embed: X_p images/s of f_p alone (in this process, through the service's own `Embedder`, so
  under the same CPU precision plan and the same normalisation) and through
  `POST /v1/embed` of a real `minusfed serve` subprocess on loopback (TLS + token on), same
  batch sizes, same torch thread count; the service time is the client's wall time per request
  (float16 .npy encode, TLS, parse and checks, f_p, JSON reply).
  With --cpu-compile the service and the in-process `Embedder` may run f_p compiled
  (`minusfed serve --cpu-compile`), and an eager `Embedder` (the default service's f_p) is
  timed beside them, alternating.
* verify: p50/p99 latency of `POST /v1/subjects/ID/verify` (one face, two float16 views) with
  --clients concurrent client threads, each sending --requests requests (bounded load).
* identify: exact search (`federation.service.gallery.top_subjects`) over galleries of random
  unit embeddings, one template per subject, against the time to read the gallery matrix once
  from memory (a torch sum over it); and `POST /v1/identify` through the service at the
  largest gallery that fits its SQLite file in --max-served-gallery rows.

Weights are freshly initialised (speed does not depend on training); the load generator runs on
the same cores as the server, so concurrent numbers are those of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    arg_parser,
    command_line,
    markdown_table,
    provenance,
    result_record,
    timings,
)
from federation.service.payload import npy_bytes


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def make_bundle(out: Path, backbone: str, width: int) -> Path:
    from minusface.backbones import build_backbone
    from minusface.generator import UNetGenerator
    from task.bundle import write_bundle

    torch.manual_seed(0)
    card = {"preset": "bench", "rounds": {}, "run-config": {}}
    info = {"backbone": backbone, "backbone-width": width,
            "thresholds": {"1e-2": {"threshold": 0.3}, "1e-3": {"threshold": 0.4}}}
    return write_bundle(out, UNetGenerator(width=4), build_backbone(backbone, 3, width=width)
                        .state_dict(), info, card)


def fill_gallery(path: Path, n: int, dim: int) -> None:
    from federation.service.gallery import Gallery

    g = Gallery(path, dim)
    done = 0
    while done < n:
        step = min(100_000, n - done)
        g.enroll_many([f"s{i}" for i in range(done, done + step)], torch.randn(step, dim))
        done += step
    g.close()


def bench_identify(sizes: list[int], dim: int, iters: int, threads: int) -> list[list[object]]:
    from federation.service.gallery import template_buffer, top_subjects

    torch.set_num_threads(threads)
    rows = []
    for n in sizes:
        buffer = template_buffer(n, dim)         # the layout the gallery keeps
        buffer.copy_(torch.nn.functional.normalize(torch.randn(dim, n), dim=0))
        matrix = buffer.T
        owner = torch.arange(n)
        q = torch.nn.functional.normalize(torch.randn(dim), dim=0)
        # alternating, so a slow spell of this shared machine hits both alike
        t_search, t_read = [], []
        for i in range(iters + 2):
            s = timings(lambda m=matrix, o=owner, n=n, q=q: top_subjects(m, o, n, q, 5), 1, 0)
            r = timings(lambda b=buffer: b.sum(), 1, 0)
            if i >= 2:                           # 2 warm-up rounds
                t_search += s
                t_read += r
        search, read = statistics.median(t_search), statistics.median(t_read)
        rows.append([f"{n:,}", f"{matrix.numel() * 4 / 2**20:,.0f}", _ms(search), _ms(read),
                     f"{search / read:.2f}"])
        del matrix, buffer, owner
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.service", __doc__)
    ap.add_argument("--backbone", default="ir18")
    ap.add_argument("--backbone-width", type=int, default=16, help="16 = cpu-small's f_p")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=40, help="verify requests per client")
    ap.add_argument("--galleries", default="10000,100000,1000000")
    ap.add_argument("--max-served-gallery", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cpu-compile", action="store_true",
                    help="f_p compiled where the policy measures a win, alone and in the service")
    ap.add_argument("--json", type=Path, help="also write a bench/results record here")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    sizes = [int(s) for s in args.galleries.split(",") if s]
    torch.set_num_threads(args.threads)

    from federation.service.model import Embedder, served_model
    from federation.service.process import Service
    from minusface import precision

    # in a fresh child process: gigabyte matrices freed here would change how this process's
    # allocator serves f_p's activations, and the service section would leave its own state
    print("identify search ...", file=sys.stderr, flush=True)
    dim = 512
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        id_rows = pool.apply(bench_identify, (sizes, dim, 3 * args.iters, args.threads))
    with tempfile.TemporaryDirectory(prefix="minusfed-bench-service-") as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(tmp / "bundle", args.backbone, args.backbone_width)
        served_here = served_model(bundle / "server")
        # the eager Embedder is the no-compile service's f_p, timed beside the compiled one
        eager = embedder = Embedder(served_here)
        if args.cpu_compile:
            embedder = Embedder(served_here, compile=True)
            embedder.warm_up()
        served_n = max([n for n in sizes if n <= args.max_served_gallery], default=0)
        print(f"filling a {served_n:,}-template gallery ...", file=sys.stderr, flush=True)
        fill_gallery(tmp / "gallery.db", served_n, dim)
        svc = Service(tmp, bundle / "server", tmp / "gallery.db",
                      extra=["--threads", str(args.threads), "--max-body-bytes",
                             str(64 * 2**20), *(["--cpu-compile"] if args.cpu_compile else [])]
                      ).wait(timeout=900 if args.cpu_compile else 120)
        try:
            embed_rows, embed_raw = [], []
            rng = np.random.default_rng(0)
            with svc.http() as h:
                for b in batches:
                    x = rng.random((b, 3, 112, 112), dtype=np.float32)
                    xt = torch.from_numpy(x)[:, None]          # (N, 1 view, 3, 112, 112)
                    body = npy_bytes(x.astype(np.float16))

                    def alone(xt=xt) -> None:
                        embedder(xt)

                    def alone_eager(xt=xt) -> None:
                        eager(xt)

                    def served(body=body, accept="application/json") -> None:
                        r = h.post("/v1/embed", content=body,
                                   headers={"Content-Type": "application/x-npy", "Accept": accept})
                        assert r.status_code == 200, r.text

                    # alternate, so drifting load on the shared machine hits all alike
                    t_alone, t_json, t_npy, t_eager = [], [], [], []
                    for _ in range(args.iters):
                        if eager is not embedder:
                            t_eager += timings(alone_eager, 1, 1)
                        t_alone += timings(alone, 1, 1)
                        t_json += timings(served, 1, 1)
                        t_npy += timings(lambda: served(accept="application/x-npy"), 1, 1)
                    a, j, n = (statistics.median(t) for t in (t_alone, t_json, t_npy))
                    plan = precision.inference_plan("embed", embedder.model,
                                                    min(b, precision.EMBED_PROBE_BATCH),
                                                    calls=embedder.calls).choice
                    e = statistics.median(t_eager) if t_eager else a
                    embed_raw.append({"batch": b, "plan": plan, "alone_ms": 1000 * a,
                                      "alone_eager_ms": 1000 * e,
                                      "service_json_ms": 1000 * j, "service_npy_ms": 1000 * n})
                    embed_rows.append([b, plan, _ms(e), f"{b / a:.1f}", _ms(a), _ms(j), _ms(n),
                                       f"{100 * (j - a) / a:+.0f} %", f"{100 * (n - a) / a:+.0f} %"])
            # verify under bounded concurrent load
            face = npy_bytes(rng.random((2, 3, 112, 112), dtype=np.float32).astype(np.float16))
            latencies: list[float] = []
            lock = threading.Lock()

            def client() -> None:
                with svc.http() as h:
                    for i in range(args.requests):
                        t = time.perf_counter()
                        r = h.post(f"/v1/subjects/s{i}/verify", content=face,
                                   headers={"Content-Type": "application/x-npy"})
                        dt = time.perf_counter() - t
                        assert r.status_code == 200, r.text
                        with lock:
                            latencies.append(dt)

            with svc.http() as h:           # warm-up
                h.post("/v1/subjects/s0/verify", content=face,
                       headers={"Content-Type": "application/x-npy"})
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            p50, p99 = np.percentile(latencies, [50, 99])
            # identify through the service
            with svc.http() as h:
                one = npy_bytes(rng.random((2, 3, 112, 112), dtype=np.float32).astype(np.float16))
                t_id = statistics.median(timings(lambda: h.post(
                    "/v1/identify", content=one, params={"k": 5},
                    headers={"Content-Type": "application/x-npy"}), args.iters, 1))
        finally:
            svc.stop()

    print(f"\n{provenance()}")
    print(f"f_p = {args.backbone} width {args.backbone_width} (fresh weights), torch "
          f"{args.threads} thread(s) in both the bench and the service; service = `minusfed "
          "serve` subprocess, HTTPS + token on loopback, float16 .npy bodies\n")
    print(markdown_table(["batch (X_p)", "CPU plan", "f_p eager ms", "f_p alone img/s", "f_p ms",
                          "service ms (JSON reply)",
                          "service ms (.npy reply)", "overhead (JSON)", "overhead (.npy)"],
                         embed_rows))
    print(f"\nverify (one face, 2 float16 views), {args.clients} concurrent clients x "
          f"{args.requests} requests, gallery {served_n:,} templates: p50 {_ms(p50)} ms, "
          f"p99 {_ms(p99)} ms, {len(latencies) / wall:.1f} requests/s")
    print(f"identify through the service (gallery {served_n:,}, k = 5, 2 views): median "
          f"{_ms(t_id)} ms per request\n")
    print(markdown_table(["gallery", "matrix MiB", "search ms", "read once ms",
                          "search / read"], id_rows))
    if args.json:
        verify = {"clients": args.clients, "requests": args.requests, "gallery": served_n,
                  "p50_ms": 1000 * p50, "p99_ms": 1000 * p99,
                  "requests_per_s": len(latencies) / wall, "identify_ms": 1000 * t_id}
        identify = [dict(zip(("templates", "matrix_mib", "search_ms", "read_ms", "ratio"), r))
                    for r in id_rows]
        record = result_record(
            command_line("bench.service", argv),
            "recognition service over HTTPS + token on loopback vs f_p alone through the same "
            "Embedder; verify under concurrent load; exact identify search",
            {"embed": embed_raw, "verify": verify, "identify": identify,
             "rows": headline_rows(args, embed_raw, verify, id_rows)})
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def headline_rows(args: argparse.Namespace, embed: list[dict], verify: dict,
                  identify: list[list]) -> list[dict]:
    """The README rows (bench.report, kind "generic")."""
    model = f"{args.backbone} w{args.backbone_width}"
    rows = [{"section": "speed",
             "measurement": f"service vs f_p alone ({model}, {r['plan']}), batch {r['batch']}, "
                            ".npy reply: overhead (target <= 10 %)",
             "value": f"{100 * (r['service_npy_ms'] / r['alone_ms'] - 1):+.0f} % "
                      f"({r['service_npy_ms']:.1f} vs {r['alone_ms']:.1f} ms)"} for r in embed]
    rows.append({"section": "speed",
                 "measurement": f"verify p50 / p99, {verify['clients']} concurrent clients, "
                                f"gallery {verify['gallery']:,}",
                 "value": f"{verify['p50_ms']:.1f} / {verify['p99_ms']:.1f} ms, "
                          f"{verify['requests_per_s']:.1f} requests/s"})
    rows += [{"section": "scale",
              "measurement": f"identify search over {n} templates / one read of the matrix "
                             "(target at 1M: <= 2x)",
              "value": f"{ratio}x ({search} vs {read} ms)"}
             for n, _, search, read, ratio in identify]
    return rows


if __name__ == "__main__":
    sys.exit(main())
