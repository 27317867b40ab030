"""Federated vs centralized MinusFace on one LFW View 2 fold: same preset, images and epochs.

    python -m bench.federated_lfw --preset gpu-small --fold 0 --clients 10 --epochs 8
    python -m bench.federated_lfw --preset cpu-small --only federated --federated-stages stage1 \
        --wire-dtype float32,float16 --epochs 3 --max-identities 150   # wire-dtype effect, CPU
    python -m bench.federated_lfw --preset tiny --only federated --federated-stages stage1 \
        --clients 2 --epochs 1 --max-identities 8 --max-pairs 20      # smoke run, about a minute

Rows, all trained on identities outside the test fold and tested on the fold's pairs (all 600,
or --max-pairs) with flip TTA:
  (a) unprotected ArcFace, centralized                      (Trainer, recipe baseline)
  (b) MinusFace, centralized: stage 1, then f_p on X_p      (Trainer, recipes stage1 + stage2)
  (c) MinusFace, federated: the product's ServerApp and ClientApp, run by
      `simulation.inprocess` (the apps pyproject.toml names, messages handed over in this
      process instead of through a SuperLink): K sites holding disjoint identities (uniform
      partition), E rounds of one local epoch per stage, every site every round.  Its numbers
      are the ServerApp's own: the server-side evaluation of each stage's last round
      (metrics.jsonl), the aggregated weights in final/models.pt.
The centralized recipes train on exactly the images the sites train on (the identities of the
federation, less each site's held-out evaluation image) and are scored on the pairs the server
scores, so the rows differ only in where the training happens.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from bench.common import (
    DATA_HELP,
    RUNS,
    arg_parser,
    data_path,
    markdown_table,
    provenance,
    site_configs,
)
from clients.data import FaceDataset, load_faces
from clients.site import federation_identities, split_held_out
from federation.report import read_run_log
from federation.server_eval import ServerEvaluator
from minusface.presets import Preset, get_preset
from minusface.trainer import Trainer, default_device, evaluate_verification
from simulation.inprocess import run_inprocess
from task.records import STAGE1, STAGE2
from task.wire import WIRE_DTYPES

CENTRAL_ROWS = {"baseline": "(a) unprotected, centralized",
                "stage1": "(b1) MinusFace centralized, stage 1 (f on r)",
                "stage2": "(b) MinusFace centralized, f_p on X_p"}


def federated_row(clients: int, stage: str, wire: str) -> str:
    tag = "" if wire == "float32" else f", {wire} wire"
    what = "stage 1" if stage == STAGE1 else "f_p on X_p"
    return f"({'c1' if stage == STAGE1 else 'c'}) MinusFace federated, {clients} sites, {what}{tag}"


def load_split(data: Path, fold: int, preset: Preset, cache: Path | None,
               max_identities: int | None = None, max_pairs: int | None = None
               ) -> tuple[FaceDataset, ServerEvaluator]:
    """The federation's training faces (as its sites hold them) and the server's test pairs."""
    identities = federation_identities(data, fold, preset, max_identities or 0)
    train_ids, _ = split_held_out(identities)          # each site's held-out image stays out
    return load_faces(train_ids, cache=cache), ServerEvaluator(data, fold, max_pairs or 0)


def evaluate(models: torch.nn.Module, test: ServerEvaluator, device: torch.device) -> dict:
    """Verification accuracy, AUC and TAR of `models` on the server's test pairs."""
    m = evaluate_verification(models, test.faces, test.idx_a, test.idx_b, test.same,
                              folds=test.folds, device=device)
    return {"accuracy": m["accuracy"], "accuracy_std": m["accuracy_std"], "auc": m["auc"],
            "tar@1e-2": m["tar_at_far"][0.01]["tar"], "tar@1e-3": m["tar_at_far"][0.001]["tar"]}


def weight_drift(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> float:
    """||other - reference|| / ||reference|| over all floating-point tensors."""
    num = den = 0.0
    for key, ref in reference.items():
        if ref.is_floating_point():
            num += float((other[key].double() - ref.double()).pow(2).sum())
            den += float(ref.double().pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0


def federated_config(preset: str, rounds: int, stages: list[str], clients: int, fold: int,
                     data: Path, out_dir: Path, wire: str, seed: int,
                     max_identities: int | None, max_pairs: int | None) -> dict[str, object]:
    """The run config of one federated run: every site every round, one local epoch per round,
    no client-side evaluation (the server scores the held-out fold)."""
    return {"preset": preset, "stage1-rounds": rounds,
            "stage2-rounds": rounds if STAGE2 in stages else 0, "local-epochs": 1,
            "fraction-train": 1.0, "fraction-evaluate": 0.0, "data-path": str(data),
            "out-dir": str(out_dir), "min-nodes": clients, "eval-fold": fold,
            "partition-scheme": "uniform", "partition-seed": seed,
            "max-identities": max_identities or 0, "server-eval-pairs": max_pairs or 0,
            "wire-dtype": wire, "seed": seed}


def run_federated(config: Mapping[str, object], clients: int, work: Path) -> dict:
    """Run the ServerApp and ClientApp in this process on a fresh out-dir and read back what
    the ServerApp wrote: per stage, its last round's server evaluation, the round times and
    the final weights."""
    out_dir = Path(str(config["out-dir"]))
    for folder in (out_dir, work / "state"):
        shutil.rmtree(folder, ignore_errors=True)  # a benchmark measures a fresh run, no resume
    # the sites' own folders: a shared face cache, and margin heads of this run only
    nodes = site_configs(clients, work / "cache", work / "state")
    t0 = time.perf_counter()
    run_inprocess(config, clients, node_configs=nodes)
    wall = time.perf_counter() - t0
    rounds, replies = read_run_log(out_dir)
    final = torch.load(out_dir / "final" / "models.pt", weights_only=False)
    out: dict = {"out_dir": str(out_dir), "seconds": wall, "round_seconds": {}, "states": {},
                 "site_examples": sorted(   # images each site trained on in round 1
                     int(r["client"]["metrics"]["num-examples"]) for r in replies
                     if r["round"] == 1 and r["client"].get("accepted")
                     and "num-examples" in r["client"].get("metrics", {}))}
    for stage in (STAGE1, STAGE2):
        mine = [r for r in rounds if r["stage"] == stage]
        if not mine:
            continue
        m = mine[-1]["metrics"]
        out[stage] = {"accuracy": m["server_accuracy"], "accuracy_std": m["server_accuracy_std"],
                      "auc": m["server_auc"], "tar@1e-2": m["server_tar_at_far_1e-2"],
                      "tar@1e-3": m["server_tar_at_far_1e-3"],
                      "rounds_aggregated": final["meta"][f"{stage}-rounds-aggregated"]}
        out["round_seconds"][stage] = [r["metrics"]["round_seconds"] for r in mine]
        out["states"][stage] = final[stage]
    return out


def run_centralized(recipe: str, preset: Preset, train: FaceDataset, test: ServerEvaluator,
                    out_dir: Path, device: torch.device, seed: int = 0,
                    generator: torch.nn.Module | None = None) -> tuple[torch.nn.Module, dict]:
    """One recipe trained by the method's own Trainer; (models, metrics with seconds)."""
    t0 = time.perf_counter()
    trainer = Trainer(recipe, preset, train.images, train.labels, out_dir / recipe,
                      generator=generator, device=device, seed=seed, progress=False)
    models = trainer.run()
    metrics = evaluate(models, test, device)
    metrics["seconds"] = time.perf_counter() - t0
    return models, metrics


def table(rows: dict[str, dict]) -> str:
    """The results table (accuracy ± spread over the 10 sub-folds of the test pairs)."""
    cells = []
    for name, r in rows.items():
        if r.get("skipped"):
            cells.append([name, f"skipped: {r['skipped']}", "", "", ""])
            continue
        cells.append([name, f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}",
                      f"{r['auc']:.4f}", f"{r['tar@1e-2']:.3f}",
                      f"{r.get('seconds', 0) / 60:.1f} min"])
    return markdown_table(["recipe", "LFW accuracy %", "AUC", "TAR@FAR=1e-2", "train time"], cells)


def main(argv: list[str] | None = None, deadline: float | None = None) -> dict:
    ap = arg_parser("bench.federated_lfw", __doc__)
    ap.add_argument("--preset", default="gpu-small")
    ap.add_argument("--fold", type=int, default=0, help="LFW View 2 fold to test on (0-9)")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs per recipe = rounds per stage (default: the preset's)")
    ap.add_argument("--data", type=Path, default=None, help=DATA_HELP)
    ap.add_argument("--out", type=Path, default=RUNS / "federated-lfw")
    ap.add_argument("--max-identities", type=int, default=None,
                    help="the federation's identities, most images first (smoke runs)")
    ap.add_argument("--results", type=Path, default=None,
                    help="where results.json goes (default: in --out); written after each recipe")
    ap.add_argument("--max-pairs", type=int, default=None, help="test pairs (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="baseline,central,federated",
                    help="comma list of baseline, central, federated")
    ap.add_argument("--wire-dtype", default="float32",
                    help="federated rows per wire dtype, comma list (float32,float16 compares "
                         "them: accuracy and how far the final weights drift apart)")
    ap.add_argument("--federated-stages", default=f"{STAGE1},{STAGE2}",
                    help=f"{STAGE1} alone skips stage 2 (wire-dtype studies on a CPU)")
    args = ap.parse_args(argv)
    wires = [w.strip() for w in args.wire_dtype.split(",") if w.strip()]
    stages = [x.strip() for x in args.federated_stages.split(",") if x.strip()]
    for w in wires:
        if w not in WIRE_DTYPES:
            ap.error(f"--wire-dtype {w!r}: expected one of {', '.join(WIRE_DTYPES)}")
    if stages not in ([STAGE1], [STAGE1, STAGE2]):
        ap.error(f"--federated-stages: {STAGE1} or {STAGE1},{STAGE2}")
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if only - {"baseline", "central", "federated"}:
        ap.error(f"--only: unknown {sorted(only - {'baseline', 'central', 'federated'})}")
    preset = get_preset(args.preset)
    if args.epochs is not None:
        preset = preset.with_(epochs=args.epochs)
    data = data_path(args.data)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = default_device()
    train, test = load_split(data, args.fold, preset, out / "train-faces.npz",
                             args.max_identities, args.max_pairs)
    print(f"fold {args.fold}: train {train.num_images} images / {train.num_classes} identities "
          f"over {args.clients} sites, test {test.num_pairs} pairs; preset {preset.name}, "
          f"{preset.epochs} epochs, {device}; {provenance()}", flush=True)
    rows: dict[str, dict] = {}
    results: dict = {"preset": preset.to_dict(), "fold": args.fold, "clients": args.clients,
                     "train_images": train.num_images, "train_identities": train.num_classes,
                     "device": str(device), "rows": rows,
                     "federated_path": "ServerApp + ClientApp in process (simulation.inprocess)"}

    def save() -> None:
        (args.results or out / "results.json").write_text(
            json.dumps(results, indent=2, default=str))

    if "baseline" in only:
        _, rows[CENTRAL_ROWS["baseline"]] = run_centralized(
            "baseline", preset, train, test, out, device, args.seed)
        save()
    if "central" in only:
        m1, rows[CENTRAL_ROWS["stage1"]] = run_centralized(
            "stage1", preset, train, test, out, device, args.seed)
        save()
        _, rows[CENTRAL_ROWS["stage2"]] = run_centralized(
            "stage2", preset, train, test, out, device, args.seed,
            generator=m1.frontend.generator)
        save()
    if "federated" in only:
        if deadline is not None and time.time() > deadline:
            rows[federated_row(args.clients, stages[-1], "float32")] = {"skipped": "out of time"}
        else:
            finals = {}
            for wire in wires:
                config = federated_config(preset.name, preset.epochs, stages, args.clients,
                                          args.fold, data, out / f"federated-{wire}", wire,
                                          args.seed, args.max_identities, args.max_pairs)
                fed = run_federated(config, args.clients, out / f"sites-{wire}")
                for stage in stages:
                    rows[federated_row(args.clients, stage, wire)] = {
                        **fed[stage], "seconds": sum(fed["round_seconds"][stage])}
                    if fed[stage]["rounds_aggregated"] < preset.epochs:
                        print(f"WARNING: {wire} wire, {stage}: only "
                              f"{fed[stage]['rounds_aggregated']} of {preset.epochs} rounds "
                              "aggregated a reply (see metrics.jsonl)", flush=True)
                results.setdefault("federated_round_seconds", {})[wire] = fed["round_seconds"]
                results.setdefault("federated_site_examples", {})[wire] = fed["site_examples"]
                results.setdefault("federated_runs", {})[wire] = fed["out_dir"]
                finals[wire] = fed["states"]
                save()
            if "float32" in finals and len(finals) > 1:
                results["wire_drift"] = {
                    w: {st: weight_drift(finals["float32"][st], finals[w][st]) for st in stages}
                    for w in finals if w != "float32"}
        save()
    central = rows.get(CENTRAL_ROWS["stage2"])
    fed_row = rows.get(federated_row(args.clients, STAGE2, "float32"))
    base = rows.get(CENTRAL_ROWS["baseline"])
    if central and base:
        results["gap_central_vs_unprotected_points"] = 100 * (base["accuracy"] - central["accuracy"])
    if central and fed_row and "accuracy" in fed_row:
        results["gap_federated_vs_central_points"] = 100 * (central["accuracy"] - fed_row["accuracy"])
    save()
    print(table(rows))
    for w, by_stage in results.get("wire_drift", {}).items():
        for st, d in by_stage.items():
            print(f"{w} wire vs float32, {st}: final weights differ by {100 * d:.3f} % (relative L2)")
    for key in ("gap_central_vs_unprotected_points", "gap_federated_vs_central_points"):
        if key in results:
            print(f"{key}: {results[key]:+.2f}")
    return results


if __name__ == "__main__":
    main()
