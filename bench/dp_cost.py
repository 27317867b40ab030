"""Accuracy cost of central DP: the same in-process federation without and with DP.

    python -m bench.dp_cost --preset tiny --noise-multiplier 0.5 | tee runs/dp-cost.txt

1. Baseline run (DP off).  Every train reply's update norm (L2 of reply - sent over the float
   arrays: exactly what `fixedclipping_mod` clips) is measured on the way back.
2. DP run: same seeds and partition, `dp-noise-multiplier` = --noise-multiplier,
   `dp-clipping-norm` = the median baseline update norm (or --clipping-norm).
Prints the server-side LFW verification accuracy (held-out fold; see federation/server_eval.py)
per round for both, the epsilon from `dp_ledger.json`, machine, date and commit.  Choosing C
from observed norms is itself not private: it is a benchmark convenience, not a recipe.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

import simulation.inprocess as ip
from bench.common import (
    DATA_HELP,
    RUNS,
    arg_parser,
    data_path,
    git_commit,
    machine,
    markdown_table,
    site_configs,
)
from federation.report import read_run_log
from minusface.presets import PRESETS, get_preset
from task.models import initial_arrays


def update_norm(sent: Message, reply: Message) -> float:
    """L2 norm of reply - sent over the floating-point arrays (what `fixedclipping_mod` clips)."""
    ref = {k: v.numpy() for k, v in sent.content["arrays"].items()}
    total = 0.0
    for key, arr in reply.content["arrays"].items():
        if ref[key].dtype.kind == "f":
            total += float(np.sum((arr.numpy().astype(np.float64) - ref[key]) ** 2))
    return total ** 0.5


@contextmanager
def observed_grid(norms: list[tuple[str, float]] | None,
                  errors: list[tuple[str, str]]) -> Iterator[None]:
    """While active, every `InProcessGrid` turns a ClientApp exception into an error reply, as
    Flower's runtime does (a site whose training diverges on a noised model must not end the
    run), noting it in `errors`; with `norms`, it also records each train reply's update norm."""
    original = ip.InProcessGrid.send_and_receive

    def tolerant(app):
        def call(msg: Message, ctx) -> Message:
            try:
                return app(msg, ctx)
            except Exception as exc:  # noqa: BLE001 - mirrors the runtime
                errors.append((str(msg.content["config"].get("stage", "?")),
                               f"{type(exc).__name__}: {exc}"[:160]))
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                     reason=f"{type(exc).__name__}: {exc}"[:300]), reply_to=msg)
        return call

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        if not getattr(self, "_tolerant", False):
            self.client_app, self._tolerant = tolerant(self.client_app), True
        messages = list(messages)
        sent = {m.metadata.dst_node_id: m for m in messages}
        replies = list(original(self, messages, timeout=timeout))
        for reply in replies if norms is not None else ():
            msg = sent.get(reply.metadata.src_node_id)
            if (msg is not None and not reply.has_error()
                    and msg.metadata.message_type == "train" and "arrays" in reply.content):
                norms.append((str(msg.content["config"]["stage"]), update_norm(msg, reply)))
        return replies

    ip.InProcessGrid.send_and_receive = send_and_receive
    try:
        yield
    finally:
        ip.InProcessGrid.send_and_receive = original


def accuracy(metrics: dict) -> str:
    """Server accuracy ± its spread over the 10 sub-folds, in percent."""
    return f"{100 * metrics['server_accuracy']:.2f} ± {100 * metrics['server_accuracy_std']:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = arg_parser("bench.dp_cost", __doc__)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
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
    p.add_argument("--data", type=Path, default=None, help=DATA_HELP)
    p.add_argument("--out", default="", help="output folder (default runs/dp-cost-<time>)")
    a = p.parse_args(argv)

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out or RUNS / f"dp-cost-{stamp}").resolve()
    base = {"preset": a.preset, "stage1-rounds": a.stage1_rounds, "stage2-rounds": a.stage2_rounds,
            "local-epochs": a.local_epochs, "fraction-train": 1.0,
            "fraction-evaluate": a.fraction_evaluate, "data-path": str(data_path(a.data)),
            "min-nodes": a.clients, "max-identities": a.max_identities,
            "server-eval-pairs": a.server_eval_pairs, "seed": a.seed}
    print("# dp_cost: accuracy cost of central DP (client-side clipping + server-side noise)")
    print(f"date     {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(f"commit   {git_commit()}")
    print(f"machine  {machine()}")
    print(f"config   preset {a.preset}, {a.clients} in-process clients, rounds {a.stage1_rounds}+"
          f"{a.stage2_rounds}, local epochs {a.local_epochs}, max identities {a.max_identities}, "
          f"server eval pairs {a.server_eval_pairs}, seed {a.seed}, out {out}", flush=True)

    errors: list[tuple[str, str]] = []
    norms: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    np.random.seed(a.seed)
    with observed_grid(norms, errors):
        ip.run_inprocess({**base, "out-dir": str(out / "no-dp")}, a.clients,
                         node_configs=site_configs(a.clients, out / "cache", out / "no-dp-state"))
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
    with observed_grid(None, errors):
        ip.run_inprocess({**base, "out-dir": str(out / "dp"),
                          "dp-noise-multiplier": a.noise_multiplier,
                          "dp-clipping-norm": float(clip), "dp-target-delta": a.target_delta},
                         a.clients, node_configs=site_configs(a.clients, out / "cache", out / "dp-state"))
    t_dp = time.perf_counter() - t0
    ledger = json.loads((out / "dp" / "dp_ledger.json").read_text())

    plain, private = read_run_log(out / "no-dp")[0], read_run_log(out / "dp")[0]
    print()
    print(markdown_table(
        ["round", "stage", "no DP: server acc %",
         f"DP z={a.noise_multiplier}, C={clip:.3g}: server acc %", "no DP AUC", "DP AUC"],
        [[r0["round"], r0["stage"],
          accuracy(r0["metrics"]), accuracy(r1["metrics"]),
          f"{r0['metrics']['server_auc']:.4f}", f"{r1['metrics']['server_auc']:.4f}"]
         for r0, r1 in zip(plain, private)]))
    print()
    print(f"DP: noise std on the averaged update {ledger['noise_std']:.4g} (z*C/m, m = "
          f"{ledger['num_sampled_per_round']}), {ledger['releases']} releases, epsilon "
          f"{ledger['epsilon']:.4g} at delta {ledger['delta']:g} (client-level, replace-one, "
          f"Flower RdpAccountant)")
    for stage in ("stage1", "stage2"):
        d = sum(v.numel() for v in initial_arrays(stage, get_preset(a.preset), a.seed).values()
                if v.is_floating_point())
        print(f"  {stage}: {d} float weights -> noise L2 norm on the average ~ std*sqrt(d) = "
              f"{ledger['noise_std'] * d ** 0.5:.4g}, vs the averaged clipped update <= C = {clip:.4g}")
    print("  rounds: " + "; ".join(
        f"{r['round']} {r['stage']}: {'released' if r.get('released') else 'NOT released'}, "
        f"averaged {len(r.get('aggregated', []))} of {len(r.get('sampled', []))}"
        for r in ledger["rounds"]))
    for stage, error in errors:
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
