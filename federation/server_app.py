"""Flower ServerApp: both MinusFace stages as one federated run.

Stage 1 rounds aggregate g and f's backbone; then the aggregated g is frozen and sent to the
sites with every stage-2 message, and stage 2 rounds aggregate f_p.  Each round is one
`strategy.start(num_rounds=1)` call so the LR schedule, checkpoint, server-side evaluation and
per-client metric lines happen between rounds; a restarted run resumes after the last
checkpointed round.  Outputs (absolute `out-dir`): checkpoint.pt, metrics.jsonl, final/.

Every checkpoint records the run-config values that shape the models (`made_with`).  A resume
whose run config cannot continue the checkpoint (another preset, arrays of other shapes, a
plan that puts the checkpoint's round in the other stage) fails before anything in out-dir is
written; so does a fresh run in an out-dir holding an earlier run's outputs without a
checkpoint.  A resumed run rewrites final/ (each file atomically); its files carry "meta"
(preset, rounds planned / completed / aggregated, commit) so an untrained g can be told apart.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from federation.init_bundle import InitBundle, load_init_bundle, record_start
from federation.pooled import run_pooled_stage2
from federation.privacy_round import run_privacy_round
from federation.progress import RoundClock, quiet_strategy
from federation.report import read_uploads, save_server_scores, write_report
from federation.runtime_link import harden_runtime_link
from federation.server_eval import server_evaluator
from federation.service.run_bundle import write_run_bundle
from federation.site_names import ASK_TIMEOUT, SiteNames
from federation.tensorboard import RunEvents
from minusface.atomic import write_atomic
from minusface.precision import configure as configure_precision
from minusface.presets import Preset
from minusface.runtime import tune_allocator
from minusface.weights import save_generator
from privacy.report import privacy_preset_for
from strategy import CheckpointStore, make_strategy
from strategy.checkpoint import METRICS, CheckpointError, array_mismatches
from strategy.dp import DpRun, dp_settings
from task.bundle import BundleError
from task.config import RunConfig, run_config
from task.models import GENERATOR, generator_from_arrays, initial_arrays, lr_for_round
from task.records import FROZEN_GENERATOR, STAGE1, STAGE2
from task.wire import from_wire, select, to_wire

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


def planned_rounds(cfg: RunConfig) -> dict[str, int]:
    """Rounds per stage: a run started from a bundle has no stage 1 (its g comes trained)."""
    return {STAGE1: 0 if cfg.init_bundle else cfg.stage1_rounds, STAGE2: cfg.stage2_rounds}


def made_with(cfg: RunConfig, preset: Preset) -> dict[str, object]:
    """The run-config values that shape the models; every checkpoint records them."""
    rounds = planned_rounds(cfg)
    return {"preset": preset.name, "seed": cfg.seed, "wire-dtype": cfg.wire_dtype,
            "stage1-rounds": rounds[STAGE1], "stage2-rounds": rounds[STAGE2],
            "stage2-mode": cfg.stage2_mode, "init-bundle": cfg.init_bundle,
            **cfg.preset_overrides()}


def check_fresh_out_dir(out_dir: Path) -> None:
    """A new run must not overwrite an earlier run's outputs that no checkpoint continues."""
    earlier = [p for p in (out_dir / "final" / "generator.pt", out_dir / "final" / "models.pt",
                           out_dir / METRICS) if p.is_file() and p.stat().st_size > 0]
    if earlier:
        raise FileExistsError(
            f"out-dir {out_dir} holds an earlier run's outputs "
            f"({', '.join(str(p.relative_to(out_dir)) for p in earlier)}) but no checkpoint to "
            "resume from: a new run would overwrite them. Use a new out-dir, or move those "
            "files elsewhere first.")


def expected_arrays(stage: str, preset: Preset, seed: int,
                    stage1_init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys and shapes a checkpoint of `stage` holds under `preset` (stage 2: f_p + frozen g,
    keys "recognizer.*" and "generator.*")."""
    if stage == STAGE1:
        return stage1_init
    with torch.random.fork_rng(devices=[]):      # initial_arrays seeds the global RNG
        fresh = initial_arrays(STAGE2, preset, seed + 1)
    return {**fresh, **select(stage1_init, GENERATOR)}


def resume_problem(ck: dict, old: dict, made: dict, plan: list[tuple[str, int]], preset: Preset,
                   stage1_init: dict[str, torch.Tensor]) -> str | None:
    """Why this run config cannot continue checkpoint `ck` (made with `old`), or None."""
    done, stage = int(ck["round"]), str(ck["stage"])
    if stage not in (STAGE1, STAGE2):
        return f"its stage is {stage!r}, expected {STAGE1!r} or {STAGE2!r}"
    if old.get("preset", preset.name) != preset.name:
        return f"its preset is {old['preset']!r}, the run config's is {preset.name!r}"
    wrong = array_mismatches(ck["arrays"], expected_arrays(stage, preset, int(made["seed"]),
                                                           stage1_init))
    if wrong:
        return f"its arrays do not fit preset {preset.name!r} ({'; '.join(wrong)})"
    if not 1 <= done <= len(plan):
        return f"it is after round {done}, but the run config plans {len(plan)} round(s)"
    if plan[done - 1][0] != stage:
        return (f"its round {done} is {stage}, but with stage1-rounds={made['stage1-rounds']} "
                f"round {done} is {plan[done - 1][0]}")
    if stage == STAGE2 and old.get("stage1-rounds", made["stage1-rounds"]) != made["stage1-rounds"]:
        return (f"stage 1 ended after {old['stage1-rounds']} round(s) and g is frozen, so "
                f"stage1-rounds must stay {old['stage1-rounds']}")
    return None


def check_resume(ck: dict, out_dir: Path, made: dict, plan: list[tuple[str, int]], preset: Preset,
                 stage1_init: dict[str, torch.Tensor]) -> None:
    """Refuse, before anything is written, a checkpoint this run config cannot continue."""
    old = ck["extra"].get("made-with")
    old = old if isinstance(old, dict) else {}      # checkpoints before made-with was recorded
    problem = resume_problem(ck, old, made, plan, preset, stage1_init)
    if problem:
        shown = ("preset", "stage1-rounds", "stage2-rounds")
        was = (", ".join(f"{k}={old[k]!r}" for k in shown if k in old)
               or "unknown: see run_config.json")
        now = ", ".join(f"{k}={made[k]!r}" for k in shown)
        raise CheckpointError(
            f"cannot resume the run in out-dir {out_dir} (checkpoint after round {ck['round']}, "
            f"{ck['stage']}; made with {was}) with this run config ({now}): {problem}. Nothing "
            "was changed. To continue that run, start it again with the run config it was made "
            "with; to train with this one, use a new out-dir.")
    for key in [k for k in made if k not in ("preset", "stage1-rounds", "stage2-rounds")]:
        if key in old and old[key] != made[key]:
            log(WARNING, "minusfed: the checkpoint in %s was made with %s=%r; continuing with %r",
                out_dir, key, old[key], made[key])


def resumed_aggregated(ck: dict, plan: list[tuple[str, int]]) -> dict[str, int]:
    """Rounds per stage whose aggregate changed the model, as of `ck` (older checkpoints did
    not count them: every finished round is assumed to have)."""
    saved = ck["extra"].get("aggregated")
    if isinstance(saved, dict) and all(isinstance(saved.get(s), int) for s in (STAGE1, STAGE2)):
        return {s: int(saved[s]) for s in (STAGE1, STAGE2)}
    finished = plan[:int(ck["round"])]
    return {s: sum(1 for stage, _ in finished if stage == s) for s in (STAGE1, STAGE2)}


def source_commit() -> str | None:
    """The git commit of this code when it runs from a checkout (a FAB install has none)."""
    here = Path(__file__).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=here.parent,
                             capture_output=True, text=True, timeout=10, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    # an enclosing repository that is not this project's must not be credited
    if len(out) != 2 or Path(out[0]) / "federation" / "server_app.py" != here:
        return None
    return out[1] if re.fullmatch(r"[0-9a-f]{40}", out[1]) else None


def final_meta(made: dict, plan: list[tuple[str, int]], done: int, aggregated: dict[str, int],
               out_dir: Path, init: InitBundle | None = None) -> dict[str, object]:
    """How final/ was made, stored in its files so `protect` can tell an untrained g (a run
    started from a bundle counts the bundle's stage-1 rounds: its g is the bundle's)."""
    finished = plan[:done]
    return {"preset": made["preset"], "seed": made["seed"], "wire-dtype": made["wire-dtype"],
            "stage2-mode": made.get("stage2-mode", "federated"),
            **({"init-bundle": init.summary} if init else {}),
            **{f"{s}-rounds-planned": made[f"{s}-rounds"] for s in (STAGE1, STAGE2)},
            **{f"{s}-rounds-completed": sum(1 for st, _ in finished if st == s)
               for s in (STAGE1, STAGE2)},
            **{f"{s}-rounds-aggregated": aggregated[s] for s in (STAGE1, STAGE2)},
            "run-dir": str(out_dir), "commit": source_commit(),
            "written-at": datetime.now(UTC).isoformat(timespec="seconds")}


def run_server(grid: Grid, context: Context) -> None:
    """The whole run; registered as the ServerApp's main (and callable in-process)."""
    harden_runtime_link(grid)      # deployed runs: survive a dropped TLS keep-alive connection
    tune_allocator()
    cfg = run_config(context.run_config)
    configure_precision(cfg.cpu_precision)  # server-side eval on a CPU; $MINUSFED_CPU_PRECISION wins
    preset = cfg.preset()                  # the named preset with the run's overrides
    out_dir = resolve_out_dir(cfg.out_dir, context.run_id)
    store = CheckpointStore(out_dir)
    evaluator, data_path = server_evaluator(cfg)     # None: no LFW at the server, no benchmark
    min_nodes = cfg.min_nodes
    wire = cfg.wire_dtype                  # float16 halves the bytes; the master copy stays float32
    rounds = planned_rounds(cfg)
    plan = [(s, r) for s in (STAGE1, STAGE2) for r in range(1, rounds[s] + 1)]
    state = {STAGE1: initial_arrays(STAGE1, preset, cfg.seed), STAGE2: None}
    made = made_with(cfg, preset)
    # a bundle that does not fit the run's preset stops the run before anything is written
    init = load_init_bundle(cfg.init_bundle, preset) if cfg.init_bundle else None
    # before anything in out-dir is written: a checkpoint this config cannot continue (or an
    # earlier run's outputs without one) stops the run here, with nothing overwritten
    ck = store.latest()
    if ck is not None:     # stage-2 checkpoints before one key scheme: "frozen.generator.*"
        ck["arrays"] = {k.removeprefix("frozen."): v for k, v in ck["arrays"].items()}
    if ck is None:
        check_fresh_out_dir(out_dir)
    else:
        check_resume(ck, out_dir, made, plan, preset, state[STAGE1])
    log(INFO, "minusfed: preset %s, out-dir %s, data %s", preset.name, out_dir, data_path)
    nodes = wait_for_nodes(grid, min_nodes)
    # what later tools (privacy-eval --run DIR) need to rebuild the sites' partition
    (out_dir / "run_config.json").write_text(json.dumps(
        {**cfg.to_flower(), "data-path": str(data_path or ""), "num-clients": nodes}, indent=2,
        sort_keys=True))
    names = SiteNames(out_dir, timeout=min(ASK_TIMEOUT, cfg.round_timeout))
    names.refresh(grid)                    # reports name sites, not node ids

    frozen: dict[str, torch.Tensor] | None = None
    done = 0
    aggregated = {STAGE1: 0, STAGE2: 0}    # rounds whose aggregate changed the model
    if init is not None:                   # stage 1 happened in the bundle's own run
        frozen, state[STAGE1] = init.generator, dict(init.generator)
        state[STAGE2] = init.recognizer
        aggregated[STAGE1] = init.stage1_aggregated
    if ck is not None:
        done = int(ck["round"])
        arrays = ck["arrays"]
        stage = ck["stage"]
        if stage == STAGE2:
            frozen = select(arrays, GENERATOR)
            state[STAGE2] = {k: v for k, v in arrays.items() if k not in frozen}
        else:
            state[STAGE1] = arrays
        aggregated = resumed_aggregated(ck, plan)
        log(INFO, "minusfed: resuming after round %d (%s) from %s", done, stage, store.checkpoint_path)

    settings = dp_settings(cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.dp_target_delta,
                           cfg.dp_max_epsilon)
    dp = (DpRun(settings, out_dir, grid.get_node_ids(), cfg.fraction_train, min_nodes,
                wire_dtype=cfg.wire_dtype) if settings else None)      # None: DP off
    strategy = (dp.make_strategy if dp else make_strategy)(
        cfg.aggregation, fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate, min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes,
        max_update_norm=cfg.max_update_norm or None,
        backend=cfg.aggregation_backend, weighting=cfg.weighting,
        max_num_examples=cfg.max_num_examples,
        max_weight_ratio=cfg.max_weight_ratio or None)
    runner = dp.wrap(strategy) if dp else strategy       # Flower's DP wrapper around it
    if dp and done:
        dp.resume()

    if init is not None and done == 0:     # the bundle as it came, on the same benchmark
        as_loaded = evaluator(STAGE2, preset, state[STAGE2], frozen)
        record_start(out_dir, init, as_loaded)
        log(INFO, "minusfed: starting from bundle %s (preset %s, %d stage-1 round(s)): no stage 1, "
            "g frozen; server accuracy as loaded %.3f, AUC %.3f", init.path, init.card.get("preset"),
            init.stage1_aggregated, as_loaded.get("server_accuracy", float("nan")),
            as_loaded.get("server_auc", float("nan")))
    clock = RoundClock(plan, done)       # one progress line per round replaces Flower's blocks
    events = RunEvents(out_dir, purge_from=done + 1)    # tensorboard --logdir OUT_DIR
    pooled = cfg.stage2_mode == "pooled"
    log(INFO, "minusfed: %d round(s) to run (stage 1: %d, stage 2: %d%s) with %d site(s)",
        len(plan) - done, rounds[STAGE1], rounds[STAGE2],
        ", pooled on Ray Train" if pooled else "", nodes)
    if pooled and dp:
        log(WARNING, "minusfed: DP covers stage 1's weight updates only; pooled stage 2 ships "
            "X_p, which DP does not cover")
    for index, (stage, stage_round) in enumerate(plan, start=1):
        if index <= done:
            continue
        if dp and dp.budget_exhausted():                 # dp-max-epsilon: stop, keep outputs
            break
        if stage == STAGE2 and pooled:       # all stage-2 rounds as one pooled training
            # g of stage 1's last round (a resume from a federated stage-2 checkpoint holds it
            # as `frozen`: its stage-1 arrays are not restored)
            frozen = frozen if frozen is not None else select(state[STAGE1], GENERATOR)
            index = len(plan)
            t0 = time.perf_counter()
            state[STAGE2], metrics = run_pooled_stage2(
                grid, out_dir, cfg, preset, frozen, store, index, site_names=names,
                on_epoch=lambda m: log(INFO, "[stage 2 pooled] epoch %d/%d  loss %.3f  %.0f img/s "
                                       "(%d worker(s))", m["epoch"], m["epochs"], m["loss"],
                                       m["img_per_s"], m["workers"]),
                initial=init.recognizer if init is not None else None)
            aggregated[STAGE2] += 1
            metrics.update({"stage_round": rounds[STAGE2], "round_seconds":
                            time.perf_counter() - t0,
                            **evaluator(STAGE2, preset, state[STAGE2], frozen)})
            if evaluator.last_scores is not None:
                save_server_scores(out_dir, index, STAGE2, evaluator.last_scores, evaluator.same)
            store.save(index, STAGE2, {**state[STAGE2], **frozen}, metrics=metrics,
                       extra={"made-with": made, "aggregated": dict(aggregated)})
            done = index
            events.round(index, metrics, [])
            log(INFO, "minusfed: pooled stage 2 done: server accuracy %.3f, AUC %.3f",
                metrics.get("server_accuracy", float("nan")),
                metrics.get("server_auc", float("nan")))
            break
        if stage == STAGE2 and state[STAGE2] is None:
            # freeze the aggregated g and start a fresh f_p
            frozen = select(state[STAGE1], GENERATOR)
            state[STAGE2] = initial_arrays(STAGE2, preset, cfg.seed + 1)
        strategy.frozen_arrays = ({FROZEN_GENERATOR: ArrayRecord(to_wire(frozen, wire))}
                                  if stage == STAGE2 else {})
        lr = lr_for_round(preset, stage_round, rounds[stage])
        # Flower overwrites "server-round" with 1 per start(): the run's own round goes separately
        common = {"stage": stage, "minusfed-round": index}
        t0 = time.perf_counter()
        with quiet_strategy():                       # Flower's per-round INFO blocks; warnings pass
            result = runner.start(
                grid=grid, initial_arrays=ArrayRecord(to_wire(state[stage], wire)), num_rounds=1,
                timeout=cfg.round_timeout,           # per phase; late or dead nodes are dropped
                train_config=ConfigRecord({**common, "lr": lr, "local-epochs": cfg.local_epochs}),
                evaluate_config=ConfigRecord(common))
        seconds = time.perf_counter() - t0
        if dp:
            dp.record_round(index, stage)                # dp_ledger.json, before anything else
        # no aggregate this round (all replies refused, or the DP wrapper skipped it): Flower's
        # Result then holds an empty ArrayRecord; the previous global arrays stand
        state[stage] = from_wire(result.arrays.to_torch_state_dict()) or state[stage]
        aggregated[stage] += len(result.arrays) > 0
        metrics = {"stage_round": stage_round, "lr": lr, "round_seconds": seconds,
                   **evaluator(stage, preset, state[stage], frozen)}
        if evaluator.last_scores is not None:        # the report's ROC curve
            save_server_scores(out_dir, index, stage, evaluator.last_scores, evaluator.same)
        for source, by_round in (("train", result.train_metrics_clientapp),
                                 ("evaluate", result.evaluate_metrics_clientapp)):
            for values in by_round.values():
                metrics.update({f"clients_{source}_{k}": v for k, v in dict(values).items()})
        metrics.update(result.report.node_summary())  # sampled / replied / dropped node ids
        saved = {**state[stage], **(frozen if stage == STAGE2 else {})}
        store.save(index, stage, saved, metrics=metrics,
                   extra={"made-with": made, "aggregated": dict(aggregated)})
        done = index
        names.refresh(grid, [e["node_id"] for e in result.report.replies])
        replies = [{**e, "site": names(e["node_id"])} for e in result.report.replies]
        for entry in replies:                        # every reply, accepted or not, with why
            store.append_metrics({"round": index, "stage": stage, "client": entry})
        events.round(index, metrics, replies)
        clock.record(stage, time.perf_counter() - t0)     # training, server eval, checkpoint
        log(INFO, "%s", clock.line(index, stage, stage_round, metrics))

    events.close()
    if dp:
        dp.finish()
    final = out_dir / "final"
    final.mkdir(exist_ok=True)
    meta = final_meta(made, plan, done, aggregated, out_dir, init)
    if meta["stage1-rounds-aggregated"] == 0:
        log(WARNING, "minusfed: no stage-1 round changed g: %s is an UNTRAINED generator",
            final / "generator.pt")
    g = generator_from_arrays(frozen if frozen is not None else state[STAGE1])
    save_generator(g, final / "generator.pt", meta=meta)
    models = {"stage1": state[STAGE1], "stage2": state[STAGE2], "preset": preset.name,
              "preset-fields": preset.to_dict(), "meta": meta}      # with the run's overrides
    write_atomic(final / "models.pt", lambda f: torch.save(models, f))
    report = write_report(out_dir, preset)
    log(INFO, "minusfed: finished; report %s", report)
    if cfg.privacy_eval:                            # every site attacks its own faces
        gen = frozen if frozen is not None else select(state[STAGE1], GENERATOR)
        summary = run_privacy_round(grid, out_dir, gen, state[STAGE2],
                                    privacy_preset_for(preset.name), cfg.seed,
                                    shipped=read_uploads(out_dir) if pooled else None,
                                    site_names=names)
        log(INFO, "minusfed: privacy evaluation %s", summary)
    try:                      # final/site, final/server, card (task/bundle.py), after privacy
        log(INFO, "minusfed: model bundle %s", write_run_bundle(out_dir, overwrite=True))
    except BundleError as e:
        log(WARNING, "minusfed: no model bundle written: %s", e)


app.main()(run_server)
