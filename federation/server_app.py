"""Flower ServerApp: both MinusFace stages as one federated run.

Stage 1 rounds aggregate g and f's backbone; then the aggregated g is frozen and sent to the
sites with every stage-2 message, and stage 2 rounds aggregate f_p.  Each round is one
`strategy.start(num_rounds=1)` call so the LR schedule, checkpoint, server-side evaluation and
per-client metric lines happen between rounds; a restarted run resumes after the last
checkpointed round.  Outputs (absolute `out-dir`): checkpoint.pt, metrics.jsonl, final/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from clients.site import resolve_data_path
from federation.protocol import (FROZEN_GENERATOR, STAGE1, STAGE2, from_wire,  # noqa: F401
                                 initial_arrays, lr_for_round, to_wire, run_config, unflatten)
from federation.report import write_report
from federation.runtime_link import harden_runtime_link
from federation.server_eval import ServerEvaluator
from minusface.generator import UNetGenerator
from minusface.presets import get_preset
from minusface.runtime import tune_allocator
from minusface.weights import save_generator
from strategy import CheckpointStore, make_strategy
from strategy.dp import DpRun

app = ServerApp()
INFO, WARNING = 20, 30


def resolve_out_dir(configured: str, run_id: int) -> Path:
    out = Path(configured) if configured else Path.cwd() / "runs" / f"flwr-run-{run_id}"
    if not out.is_absolute():
        raise ValueError(f"run config 'out-dir' must be an absolute path, got {configured!r}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def wait_for_nodes(grid: Grid, expected: int, timeout: float = 300.0) -> int:
    """Virtual nodes register asynchronously: wait so round 1 samples all of them."""
    deadline = time.monotonic() + timeout
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= expected or time.monotonic() > deadline:
            if n < expected:
                log(WARNING, "only %d of %d expected nodes after %.0f s", n, expected, timeout)
            return n
        time.sleep(0.5)


def run_server(grid: Grid, context: Context) -> None:
    """The whole run; registered as the ServerApp's main (and callable in-process)."""
    harden_runtime_link(grid)      # deployed runs: survive a dropped TLS keep-alive connection
    tune_allocator()
    cfg = run_config(context.run_config)
    preset = get_preset(str(cfg["preset"]))
    out_dir = resolve_out_dir(str(cfg["out-dir"]), context.run_id)
    store = CheckpointStore(out_dir)
    data_path = resolve_data_path(str(cfg["data-path"]))
    min_nodes = int(cfg["min-nodes"])
    log(INFO, "minusfed: preset %s, out-dir %s, data %s", preset.name, out_dir, data_path)
    nodes = wait_for_nodes(grid, min_nodes)
    # what later tools (privacy-eval --run DIR) need to rebuild the sites' partition
    (out_dir / "run_config.json").write_text(json.dumps(
        {**cfg, "data-path": str(data_path), "num-clients": nodes}, indent=2, sort_keys=True))
    evaluator = ServerEvaluator(data_path, int(cfg["eval-fold"]), int(cfg["server-eval-pairs"]))

    wire = str(cfg["wire-dtype"])          # float16 halves the bytes; the master copy stays float32
    rounds = {STAGE1: int(cfg["stage1-rounds"]), STAGE2: int(cfg["stage2-rounds"])}
    plan = [(s, r) for s in (STAGE1, STAGE2) for r in range(1, rounds[s] + 1)]
    state = {STAGE1: initial_arrays(STAGE1, preset, int(cfg["seed"])), STAGE2: None}
    frozen: dict[str, torch.Tensor] | None = None
    done = 0
    ck = store.latest()
    if ck is not None:
        done = int(ck["round"])
        arrays = ck["arrays"]
        stage = ck["stage"]
        if stage == STAGE2:
            frozen = {k[len("frozen."):]: v for k, v in arrays.items() if k.startswith("frozen.")}
            state[STAGE2] = {k: v for k, v in arrays.items() if not k.startswith("frozen.")}
        else:
            state[STAGE1] = arrays
        log(INFO, "minusfed: resuming after round %d (%s) from %s", done, stage, store.checkpoint_path)

    dp = DpRun.from_config(cfg, out_dir, grid.get_node_ids(), min_nodes)   # None: DP off
    strategy = (dp.make_strategy if dp else make_strategy)(
        str(cfg["aggregation"]), fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=float(cfg["fraction-evaluate"]), min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes,
        max_update_norm=float(cfg["max-update-norm"]) or None,
        backend=str(cfg["aggregation-backend"]))
    runner = dp.wrap(strategy) if dp else strategy       # Flower's DP wrapper around it
    if dp and done:
        dp.resume()

    for index, (stage, stage_round) in enumerate(plan, start=1):
        if index <= done:
            continue
        if dp and dp.budget_exhausted():                 # dp-max-epsilon: stop, keep outputs
            break
        if stage == STAGE2 and state[STAGE2] is None:
            # freeze the aggregated g and start a fresh f_p
            frozen = {f"generator.{k}": v for k, v in unflatten(state[STAGE1], "generator").items()}
            state[STAGE2] = initial_arrays(STAGE2, preset, int(cfg["seed"]) + 1)
        strategy.frozen_arrays = ({FROZEN_GENERATOR: ArrayRecord(to_wire(frozen, wire))}
                                  if stage == STAGE2 else {})
        lr = lr_for_round(preset, stage_round, rounds[stage])
        common = {"stage": stage, "minusfed-round": index}   # Flower overwrites "server-round" with 1 per start()
        t0 = time.perf_counter()
        result = runner.start(
            grid=grid, initial_arrays=ArrayRecord(to_wire(state[stage], wire)), num_rounds=1,
            timeout=float(cfg["round-timeout"]),     # per phase; late or dead nodes are dropped
            train_config=ConfigRecord({**common, "lr": lr, "local-epochs": int(cfg["local-epochs"])}),
            evaluate_config=ConfigRecord(common))
        seconds = time.perf_counter() - t0
        if dp:
            dp.record_round(index, stage)                # dp_ledger.json, before anything else
        # no aggregate this round (all replies refused, or the DP wrapper skipped it): Flower's
        # Result then holds an empty ArrayRecord; the previous global arrays stand
        state[stage] = from_wire(result.arrays.to_torch_state_dict()) or state[stage]
        metrics = {"stage_round": stage_round, "lr": lr, "round_seconds": seconds,
                   **evaluator(stage, preset, state[stage], frozen)}
        for source, by_round in (("train", result.train_metrics_clientapp),
                                 ("evaluate", result.evaluate_metrics_clientapp)):
            for values in by_round.values():
                metrics.update({f"clients_{source}_{k}": v for k, v in dict(values).items()})
        metrics.update(strategy.node_summary())      # sampled / replied / dropped node ids
        saved = dict(state[stage])
        if stage == STAGE2:
            saved.update({f"frozen.{k}": v for k, v in frozen.items()})
        store.save(index, stage, saved, metrics=metrics)
        for entry in strategy.round_log:             # every reply, accepted or not, with why
            store.append_metrics({"round": index, "stage": stage, "client": entry})
        strategy.round_log.clear()
        strategy.rejected.clear()
        log(INFO, "minusfed: round %d/%d (%s %d) server accuracy %.4f",
            index, len(plan), stage, stage_round, metrics["server_accuracy"])

    if dp:
        dp.finish()
    final = out_dir / "final"
    final.mkdir(exist_ok=True)
    g = UNetGenerator(width=preset.generator_width)
    g.load_state_dict(unflatten(frozen if frozen is not None else state[STAGE1], "generator"))
    save_generator(g, final / "generator.pt")
    torch.save({"stage1": state[STAGE1], "stage2": state[STAGE2], "preset": preset.name},
               final / "models.pt")
    report = write_report(out_dir, preset)
    log(INFO, "minusfed: finished; report %s", report)
    if cfg["privacy-eval"]:                         # every site attacks its own faces
        from federation.privacy_round import run_privacy_round
        gen = frozen if frozen is not None else {
            f"generator.{k}": v for k, v in unflatten(state[STAGE1], "generator").items()}
        summary = run_privacy_round(grid, out_dir, gen, state[STAGE2], preset.name,
                                    int(cfg["seed"]))
        log(INFO, "minusfed: privacy evaluation %s", summary)


app.main()(run_server)
