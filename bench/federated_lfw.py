"""Federated vs centralized MinusFace on one LFW View 2 fold: same preset, same epochs.

    python bench/federated_lfw.py --preset gpu-small --fold 0 --clients 10 --epochs 8
    python bench/federated_lfw.py --preset cpu-small --only federated --federated-stages stage1 \
        --wire-dtype float32,float16 --epochs 3 --max-identities 150   # wire-dtype effect, CPU

Rows, all trained on the identities outside the test fold (identity-disjoint) and tested on the
fold's 600 pairs with flip TTA:
  (a) unprotected ArcFace, centralized                      (Trainer, recipe baseline)
  (b) MinusFace, centralized: stage 1, then f_p on X_p      (Trainer, recipes stage1 + stage2)
  (c) MinusFace, federated: K sites holding disjoint identities (uniform partition), E rounds of
      one local epoch per stage, private margin heads, shared weights averaged by num-examples.
Every recipe sees the same images for the same number of epochs (E).

The federated rows run the ServerApp's arithmetic without Flower's transport: the same
`clients.local` functions the ClientApp calls, the same per-round LR (`lr_for_round`), the same
seeds, and Flower FedAvg's weighted mean, in one process.  That keeps the benchmark runnable where
flwr is not installed (the GPU lease); `tests/test_federated_bench.py` checks its mean against
Flower's own `aggregate_arrayrecords` and runs both stages end to end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.data import FaceDataset, load_faces, pair_index, view2_fold_split  # noqa: E402
from clients.local import local_train, stage_models  # noqa: E402
from task.models import initial_arrays, lr_for_round
from task.records import STAGE1, STAGE2
from task.wire import WIRE_DTYPES, from_wire, to_wire, unflatten  # noqa: E402
from minusface.presets import Preset, get_preset  # noqa: E402
from minusface.trainer import Trainer, default_device, evaluate_verification  # noqa: E402
from simulation.partition import partition_identities  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lfw_112_centercrop"


@dataclass
class SiteArrays:
    """The part of `clients.site.SiteData` that local training reads."""
    images: np.ndarray
    labels: np.ndarray

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


@dataclass
class Site:
    train: SiteArrays

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


@dataclass
class TestSet:
    faces: torch.Tensor
    idx_a: np.ndarray
    idx_b: np.ndarray
    same: np.ndarray
    folds: np.ndarray


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Flower FedAvg's weighted mean of state dicts (float64 accumulation, reference dtypes;
    integer buffers such as BatchNorm's step counter are rounded)."""
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for state, w in zip(states, weights):
            acc.add_(state[key].double(), alpha=w / total)
        out[key] = acc.to(ref.dtype) if ref.is_floating_point() else acc.round().to(ref.dtype)
    return out


def weight_drift(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> float:
    """||other - reference|| / ||reference|| over all floating-point tensors."""
    num = den = 0.0
    for key, ref in reference.items():
        if ref.is_floating_point():
            num += float((other[key].double() - ref.double()).pow(2).sum())
            den += float(ref.double().pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0


def split_sites(train: FaceDataset, num_clients: int, seed: int) -> list[Site]:
    """Uniform identity partition (each identity on exactly one site), labels 0..k-1 per site."""
    labels = np.asarray(train.labels)
    counts = {str(c): int((labels == c).sum()) for c in np.unique(labels)}
    sites = []
    for names in partition_identities(counts, num_clients, "uniform", seed=seed):
        classes = np.array(sorted(int(n) for n in names))
        mask = np.isin(labels, classes)
        local = np.searchsorted(classes, labels[mask])
        sites.append(Site(SiteArrays(train.images[mask], local.astype(np.int64))))
    return sites


def evaluate(models, test: TestSet, device: torch.device) -> dict:
    m = evaluate_verification(models, test.faces, test.idx_a, test.idx_b, test.same,
                              folds=test.folds, device=device)
    return {"accuracy": m["accuracy"], "accuracy_std": m["accuracy_std"], "auc": m["auc"],
            "tar@1e-2": m["tar_at_far"][0.01]["tar"], "tar@1e-3": m["tar_at_far"][0.001]["tar"]}


def over_wire(state: Mapping[str, torch.Tensor], wire: str) -> dict[str, torch.Tensor]:
    """What the other side gets: cast to the run config's `wire-dtype` and back to float32
    (task/wire.py's to_wire / from_wire, both ways of every train message)."""
    return dict(state) if wire == "float32" else from_wire(to_wire(state, wire))


def run_federated(preset: Preset, sites: Sequence[Site], rounds: int, test: TestSet,
                  device: torch.device, seed: int = 0,
                  log: Callable[[str], None] = print, wire: str = "float32",
                  stages: Sequence[str] = (STAGE1, STAGE2)) -> dict:
    """`stages` (both by default), `rounds` rounds each, every site every round, one local
    epoch per round; shared weights pass through `wire` dtype in both directions."""
    if wire not in WIRE_DTYPES:
        raise ValueError(f"wire must be one of {sorted(WIRE_DTYPES)}, got {wire!r}")
    shared = initial_arrays(STAGE1, preset, seed)
    heads: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    frozen = None
    out: dict = {"round_seconds": {STAGE1: [], STAGE2: []}, "wire": wire}
    t_all = time.perf_counter()
    for stage in stages:
        if stage == STAGE2:
            frozen = over_wire({k: v for k, v in shared.items() if k.startswith("generator.")},
                               wire)
            shared = initial_arrays(STAGE2, preset, seed + 1)
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            lr = lr_for_round(preset, rnd, rounds)
            states, weights, losses = [], [], []
            sent = over_wire(shared, wire)
            for pid, site in enumerate(sites):
                client_seed = seed * 7919 + pid                      # as clients/client_app.py
                models = stage_models(stage, preset, site.num_classes, sent, frozen,
                                      heads.get((stage, pid)), seed=client_seed)
                state, head, metrics = local_train(models, stage, site, preset, lr=lr, epochs=1,
                                                   seed=client_seed + 100 * rnd, device=device)
                heads[(stage, pid)] = head                           # private: stays on the site
                states.append(over_wire(state, wire))
                weights.append(metrics["num-examples"])
                losses.append(metrics["train_loss"])
            shared = fedavg(states, weights)
            seconds = time.perf_counter() - t0
            out["round_seconds"][stage].append(seconds)
            log(f"[federated {stage}] round {rnd}/{rounds}: lr {lr:g}, mean train loss "
                f"{np.average(losses, weights=weights):.3f}, {seconds:.1f} s")
        evaluator = stage_models(stage, preset, 1, shared, frozen, None).to(device)
        out[stage] = evaluate(evaluator, test, device)
        out[f"{stage}_state"] = shared
        log(f"[federated {stage}] LFW accuracy {100 * out[stage]['accuracy']:.2f} %")
    out["seconds"] = time.perf_counter() - t_all
    out["generator"] = unflatten(frozen, "generator") if frozen else None
    return out


def run_centralized(recipe: str, preset: Preset, train: FaceDataset, test: TestSet, out_dir: Path,
                    device: torch.device, seed: int = 0, generator=None, progress: bool = False):
    t0 = time.perf_counter()
    trainer = Trainer(recipe, preset, train.images, train.labels, out_dir / recipe,
                      generator=generator, device=device, seed=seed, progress=progress)
    models = trainer.run()
    metrics = evaluate(models, test, device)
    metrics["seconds"] = time.perf_counter() - t0
    return models, metrics


def load_split(data: Path, fold: int, preset: Preset, cache: Path | None,
               max_identities: int | None = None, max_pairs: int | None = None
               ) -> tuple[FaceDataset, TestSet]:
    train_ids, pairs = view2_fold_split(data, fold, preset.min_images_per_identity)
    if max_pairs:                       # smoke runs: an even stride keeps same and different pairs
        pairs = pairs[::max(1, len(pairs) // max_pairs)][:max_pairs]
    if preset.max_images_per_identity:
        train_ids = {n: sorted(v)[:preset.max_images_per_identity] for n, v in train_ids.items()}
    if max_identities:
        train_ids = {n: train_ids[n] for n in sorted(train_ids)[:max_identities]}
    train = load_faces(train_ids, cache=cache)
    paths, idx_a, idx_b = pair_index(pairs)
    faces = torch.cat(list(FaceDataset([(p, 0) for p in paths], skip_errors=False).batches(256)))
    same = np.array([p.same for p in pairs])
    return train, TestSet(faces, idx_a, idx_b, same, np.arange(len(pairs)) % 10)


def table(rows: dict[str, dict]) -> str:
    lines = ["| recipe | LFW accuracy % | AUC | TAR@FAR=1e-2 | train time |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        if r.get("skipped"):
            lines.append(f"| {name} | skipped: {r['skipped']} | | | |")
            continue
        lines.append(f"| {name} | {100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f} | "
                     f"{r['auc']:.4f} | {r['tar@1e-2']:.3f} | {r.get('seconds', 0) / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, deadline: float | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu-small")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per recipe = rounds per stage")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "federated-lfw")
    ap.add_argument("--max-identities", type=int, default=None, help="subsample (smoke runs)")
    ap.add_argument("--results", type=Path, default=None,
                    help="where results.json goes (default: in --out); written after each recipe")
    ap.add_argument("--max-pairs", type=int, default=None, help="subsample test pairs (smoke runs)")
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
    preset = get_preset(args.preset)
    if args.epochs is not None:
        preset = preset.with_(epochs=args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    device = default_device()
    train, test = load_split(args.data, args.fold, preset, args.out / "train-faces.npz",
                             args.max_identities, args.max_pairs)
    sites = split_sites(train, args.clients, args.seed)
    print(f"fold {args.fold}: train {train.num_images} images / {train.num_classes} identities over "
          f"{args.clients} sites (sizes {[s.train.num_images for s in sites]}), test "
          f"{len(test.same)} pairs; preset {preset.name}, {preset.epochs} epochs, {device}", flush=True)
    only = set(args.only.split(","))
    rows: dict[str, dict] = {}
    results = {"preset": preset.to_dict(), "fold": args.fold, "clients": args.clients,
               "train_images": train.num_images, "train_identities": train.num_classes,
               "device": str(device), "rows": rows}

    def left() -> float:
        return float("inf") if deadline is None else deadline - time.time()

    def save() -> None:
        (args.results or args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    if "baseline" in only:
        _, rows["(a) unprotected, centralized"] = run_centralized(
            "baseline", preset, train, test, args.out, device, args.seed)
        save()
    if "central" in only:
        m1, rows["(b1) MinusFace centralized, stage 1 (f on r)"] = run_centralized(
            "stage1", preset, train, test, args.out, device, args.seed)
        save()
        _, rows["(b) MinusFace centralized, f_p on X_p"] = run_centralized(
            "stage2", preset, train, test, args.out, device, args.seed,
            generator=m1.frontend.generator)
        save()
    if "federated" in only:
        if left() < 0:
            rows[f"(c) MinusFace federated, {args.clients} sites"] = {"skipped": "out of time"}
        else:
            finals = {}
            for wire in wires:
                fed = run_federated(preset, sites, preset.epochs, test, device, args.seed,
                                    wire=wire, stages=stages)
                tag = "" if wire == "float32" else f", {wire} wire"
                rows[f"(c1) MinusFace federated, {args.clients} sites, stage 1{tag}"] = {
                    **fed[STAGE1], "seconds": sum(fed["round_seconds"][STAGE1])}
                if STAGE2 in stages:
                    rows[f"(c) MinusFace federated, {args.clients} sites, f_p on X_p{tag}"] = {
                        **fed[STAGE2], "seconds": sum(fed["round_seconds"][STAGE2])}
                results.setdefault("federated_round_seconds", {})[wire] = fed["round_seconds"]
                finals[wire] = {st: fed[f"{st}_state"] for st in stages}
                torch.save(finals[wire], args.out / f"federated-{wire}-final.pt")
                save()
            if "float32" in finals and len(finals) > 1:
                results["wire_drift"] = {
                    w: {st: weight_drift(finals["float32"][st], finals[w][st]) for st in stages}
                    for w in finals if w != "float32"}
        save()
    central = rows.get("(b) MinusFace centralized, f_p on X_p")
    fed_row = rows.get(f"(c) MinusFace federated, {args.clients} sites, f_p on X_p")
    base = rows.get("(a) unprotected, centralized")
    if central and base:
        results["gap_central_vs_unprotected_points"] = 100 * (base["accuracy"] - central["accuracy"])
    if central and fed_row:
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
