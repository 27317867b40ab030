"""Accuracy cost of central DP: the same in-process federation without and with DP.

    python bench/dp_cost.py --preset tiny --noise-multiplier 0.5 | tee runs/dp-cost.txt

1. Baseline run (DP off).  Every train reply's update norm (L2 of reply - sent over the float
   arrays: exactly what `fixedclipping_mod` clips) is measured on the way back.
2. DP run: same seeds and partition, `dp-noise-multiplier` = --noise-multiplier,
   `dp-clipping-norm` = the median baseline update norm (or --clipping-norm).
Prints the server-side LFW verification accuracy (held-out fold; see federation/server_eval.py)
per round for both, the epsilon from `dp_ledger.json`, machine, date and commit.  Choosing C
from observed norms is itself not private: it is a benchmark convenience, not a recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flwr  # noqa: E402
import torch  # noqa: E402

import simulation.inprocess as ip  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lfw_112_centercrop"


def commit() -> str:
    """HEAD's commit read from .git (no git subprocess)."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()[:12] + f" ({ref.rsplit('/', 1)[-1]})"
        packed = git / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            if line.endswith(" " + ref):
                return line.split()[0][:12] + f" ({ref.rsplit('/', 1)[-1]})"
    except OSError:
        pass
    return "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node()} | {cpu} | {os.cpu_count()} CPUs (load {load:.1f}) | "
            f"Python {platform.python_version()} | torch {torch.__version__} "
            f"({torch.get_num_threads()} threads) | flwr {flwr.__version__}")


def measure_update_norms(norms: list[tuple[str, float]]):
    """Patch InProcessGrid.send_and_receive to record each train reply's update norm."""
    original = ip.InProcessGrid.send_and_receive

    def recording(self, messages, *, timeout=None):
        messages = list(messages)
        sent = {m.metadata.dst_node_id: m for m in messages}
        replies = list(original(self, messages, timeout=timeout))
        for reply in replies:
            msg = sent.get(reply.metadata.src_node_id)
            if (msg is None or reply.has_error() or msg.metadata.message_type != "train"
                    or "arrays" not in reply.content):
                continue
            ref = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            total = 0.0
            for key, arr in reply.content["arrays"].items():
                if ref[key].dtype.kind == "f":
                    total += float(np.sum((arr.numpy().astype(np.float64) - ref[key]) ** 2))
            norms.append((str(msg.content["config"]["stage"]), total ** 0.5))
        return replies

    ip.InProcessGrid.send_and_receive = recording
    return original


CLIENT_ERRORS: list[tuple[str, str]] = []


def tolerate_client_errors():
    """As Flower's runtime does (and unlike InProcessGrid), turn a ClientApp exception into an
    error reply: a site whose training diverges on a noised model must not end the run."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    original = ip.InProcessGrid.send_and_receive

    def tolerant(self, messages, *, timeout=None):
        if not getattr(self, "_tolerant", False):
            app = self.client_app

            def call(msg, ctx):
                try:
                    return app(msg, ctx)
                except Exception as exc:  # noqa: BLE001 - mirrors the runtime
                    CLIENT_ERRORS.append((str(msg.content["config"].get("stage", "?")),
                                          f"{type(exc).__name__}: {exc}"[:160]))
                    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                         reason=f"{type(exc).__name__}: {exc}"[:300]), reply_to=msg)

            self.client_app, self._tolerant = call, True
        return original(self, messages, timeout=timeout)

    ip.InProcessGrid.send_and_receive = tolerant


def rounds_of(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if "client" not in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "cpu-small", "paper"])
    p.add_argument("--noise-multiplier", type=float, default=0.5)
    p.add_argument("--clipping-norm", type=float, default=0.0,
                   help="0 = median update norm of the baseline run")
    p.add_argument("--target-delta", type=float, default=1e-5)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--stage1-rounds", type=int, default=1)
    p.add_argument("--stage2-rounds", type=int, default=1)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--max-identities", type=int, default=8)
    p.add_argument("--server-eval-pairs", type=int, default=20)
    p.add_argument("--fraction-evaluate", type=float, default=0.0,
                   help="client-side evaluation (not reported here); 0 saves time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default="", help="absolute output folder (default runs/dp-cost-<time>)")
    a = p.parse_args()

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out or ROOT / "runs" / f"dp-cost-{stamp}").resolve()
    base = {"preset": a.preset, "stage1-rounds": a.stage1_rounds, "stage2-rounds": a.stage2_rounds,
            "local-epochs": a.local_epochs, "fraction-train": 1.0,
            "fraction-evaluate": a.fraction_evaluate, "data-path": str(Path(a.data).resolve()),
            "min-nodes": a.clients, "max-identities": a.max_identities,
            "server-eval-pairs": a.server_eval_pairs, "seed": a.seed}
    print("# dp_cost: accuracy cost of central DP (client-side clipping + server-side noise)")
    print(f"date     {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(f"commit   {commit()} (working tree may hold uncommitted changes)")
    print(f"machine  {machine()}")
    print(f"config   preset {a.preset}, {a.clients} in-process clients, rounds {a.stage1_rounds}+"
          f"{a.stage2_rounds}, local epochs {a.local_epochs}, max identities {a.max_identities}, "
          f"server eval pairs {a.server_eval_pairs}, seed {a.seed}, out {out}", flush=True)

    tolerate_client_errors()
    norms: list[tuple[str, float]] = []
    original = measure_update_norms(norms)
    t0 = time.perf_counter()
    np.random.seed(a.seed)
    try:
        ip.run_inprocess({**base, "out-dir": str(out / "no-dp")}, a.clients)
    finally:
        ip.InProcessGrid.send_and_receive = original
    t_base = time.perf_counter() - t0
    by_stage: dict[str, list[float]] = {}
    for stage, n in norms:
        by_stage.setdefault(stage, []).append(n)
    clip = a.clipping_norm or statistics.median(n for _, n in norms)
    print("update norms (baseline, L2 over float arrays): " + "; ".join(
        f"{s}: " + ", ".join(f"{v:.3f}" for v in vs) for s, vs in by_stage.items()))
    print(f"clipping norm C = {clip:.4f} ({'given' if a.clipping_norm else 'median of those'})",
          flush=True)

    t0 = time.perf_counter()
    np.random.seed(a.seed)
    ip.run_inprocess({**base, "out-dir": str(out / "dp"), "dp-noise-multiplier": a.noise_multiplier,
                      "dp-clipping-norm": float(clip), "dp-target-delta": a.target_delta},
                     a.clients)
    t_dp = time.perf_counter() - t0
    ledger = json.loads((out / "dp" / "dp_ledger.json").read_text())

    plain, private = rounds_of(out / "no-dp"), rounds_of(out / "dp")
    print()
    print(f"| round | stage | no DP: server acc % | DP z={a.noise_multiplier}, C={clip:.3g}: server acc % |"
          " no DP AUC | DP AUC |")
    print("|---|---|---|---|---|---|")
    for r0, r1 in zip(plain, private):
        m0, m1 = r0["metrics"], r1["metrics"]
        print(f"| {r0['round']} | {r0['stage']} | {100 * m0['server_accuracy']:.2f} ± "
              f"{100 * m0['server_accuracy_std']:.2f} | {100 * m1['server_accuracy']:.2f} ± "
              f"{100 * m1['server_accuracy_std']:.2f} | {m0['server_auc']:.4f} | {m1['server_auc']:.4f} |")
    print()
    print(f"DP: noise std on the averaged update {ledger['noise_std']:.4g} (z*C/m, m = "
          f"{ledger['num_sampled_per_round']}), {ledger['releases']} releases, epsilon "
          f"{ledger['epsilon']:.4g} at delta {ledger['delta']:g} (client-level, replace-one, "
          f"Flower RdpAccountant)")
    from task.models import initial_arrays
    from minusface.presets import get_preset
    for stage in ("stage1", "stage2"):
        d = sum(v.numel() for v in initial_arrays(stage, get_preset(a.preset), a.seed).values()
                if v.is_floating_point())
        print(f"  {stage}: {d} float weights -> noise L2 norm on the average ~ std*sqrt(d) = "
              f"{ledger['noise_std'] * d ** 0.5:.4g}, vs the averaged clipped update <= C = {clip:.4g}")
    print("  rounds: " + "; ".join(
        f"{r['round']} {r['stage']}: {'released' if r.get('released') else 'NOT released'}, "
        f"averaged {len(r.get('aggregated', []))} of {len(r.get('sampled', []))}"
        for r in ledger["rounds"]))
    for stage, error in CLIENT_ERRORS:
        print(f"  a site's ClientApp raised ({stage}), sent as an error reply: {error}")
    print(f"wall time: no DP {t_base:.0f} s, DP {t_dp:.0f} s")
    pairs = plain[-1]["metrics"]["server_eval_pairs"]
    print(f"server eval: {pairs} LFW View 2 pairs of the held-out fold (LFW, centre-cropped, not "
          f"aligned, trained on LFW only); one pair = {100 / pairs:.1f} points, ± is the spread "
          f"over 10 sub-folds.  Preset {a.preset} with {a.stage1_rounds}+{a.stage2_rounds} rounds: "
          "smoke-test numbers, not a measured accuracy cost of DP.")
    if any(not np.isfinite(r["metrics"]["server_accuracy"]) for r in private):
        print(f"DP model: non-finite embeddings (scored NaN).  With m = {ledger['num_sampled_per_round']} "
              "sites the noise added to the average (L2 above) is orders of magnitude larger than "
              "any clipped update, whatever C: DP-FedAvg needs many sites per round (the noise on "
              "the average shrinks as 1/m).")


if __name__ == "__main__":
    main()
