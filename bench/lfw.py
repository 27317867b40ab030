"""LFW verification benchmark: unprotected ArcFace vs MinusFace, trained centrally, one fold.

    python -m bench.lfw --preset cpu-small --fold 0            # View 2 fold 0 (report)
    python -m bench.lfw --preset tiny --view1                  # View 1 DevTest (tuning)

Trains on every identity not in the test pairs (identity-disjoint), then evaluates the test
pairs with flip TTA (10 sub-folds of the fold's 600 pairs).  Re-running with the same --out
resumes finished or interrupted recipes from their checkpoints.  Prints one table and writes
results.json.  Label every number: LFW, centre-cropped, not aligned, trained on LFW only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    DATA_HELP,
    RUNS,
    arg_parser,
    data_path,
    git_commit,
    markdown_table,
    provenance,
)
from clients.data import (
    FaceDataset,
    load_faces,
    pair_index,
    view1_split,
    view2_fold_split,
)
from minusface.presets import get_preset
from minusface.trainer import Trainer, build_models, evaluate_verification


def summarise(name: str, m: dict, seconds: float) -> dict:
    """The row of one recipe: accuracy, AUC, TAR at two FARs and its training time."""
    return {"recipe": name, "accuracy": m["accuracy"], "accuracy_std": m["accuracy_std"],
            "auc": m["auc"], "tar@1e-2": m["tar_at_far"][0.01]["tar"],
            "tar@1e-3": m["tar_at_far"][0.001]["tar"], "train_seconds": seconds}


def table(rows: list[dict], gap: float | None) -> str:
    """The results table, and MinusFace's gap to the unprotected recipe."""
    out = markdown_table(
        ["recipe", "accuracy %", "AUC", "TAR@FAR=1e-2", "TAR@FAR=1e-3", "train time"],
        [[r["recipe"], f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}",
          f"{r['auc']:.4f}", f"{r['tar@1e-2']:.3f}", f"{r['tar@1e-3']:.3f}",
          f"{r['train_seconds'] / 60:.1f} min"] for r in rows])
    if gap is not None:
        out += f"\n\nMinusFace gap to the unprotected twin: {gap:+.2f} points"
    return out


def train_seconds(out: Path) -> float:
    """Seconds the Trainer logged for a recipe (its epochs, across resumes)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0.0
    return sum(json.loads(line).get("seconds", 0.0) for line in path.read_text().splitlines() if line)


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.lfw", __doc__)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--fold", type=int, default=0, help="View 2 fold (0-9) to test on")
    ap.add_argument("--view1", action="store_true", help="tune on View 1 (pairsDevTest) instead")
    ap.add_argument("--data", type=Path, default=None, help=DATA_HELP)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    ap.add_argument("--max-identities", type=int, default=None, help="subsample (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    preset = get_preset(args.preset)
    if args.epochs is not None:
        preset = preset.with_(epochs=args.epochs)
    split = "view1" if args.view1 else f"fold{args.fold}"
    out = (args.out or RUNS / f"lfw-{preset.name}-{split}").resolve()
    data = data_path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    train_ids, pairs = (view1_split(data, preset.min_images_per_identity) if args.view1
                        else view2_fold_split(data, args.fold, preset.min_images_per_identity))
    if preset.max_images_per_identity:
        train_ids = {n: sorted(v)[:preset.max_images_per_identity] for n, v in train_ids.items()}
    if args.max_identities:
        names = sorted(train_ids)[:args.max_identities]
        train_ids = {n: train_ids[n] for n in names}
    train = load_faces(train_ids, cache=out / "train-faces.npz")
    paths, idx_a, idx_b = pair_index(pairs)
    test = FaceDataset([(p, 0) for p in paths], skip_errors=False)
    test_faces = torch.cat(list(test.batches(256)))
    same = np.array([p.same for p in pairs])
    # sub-folds of the test pairs (View 2 fold: 10 x 60 pairs, same and different mixed)
    folds = np.arange(len(pairs)) % 10
    progress = not args.quiet
    print(f"{split}: train {train.num_images} images / {train.num_classes} identities "
          f"(identity-disjoint), test {len(pairs)} pairs; preset {preset.name}; out {out}")

    rows, results = [], {}
    t_all = time.perf_counter()
    # Reference: the same unprotected recognizer before any training (random features already
    # separate some LFW pairs; a recipe that does not beat this has not learned).
    torch.manual_seed(args.seed)
    untrained = build_models("baseline", preset, train.num_classes)
    reference = summarise("(0) untrained recognizer, raw faces",
                          evaluate_verification(untrained, test_faces, idx_a, idx_b, same,
                                                folds=folds), 0.0)
    for recipe in ("baseline", "stage1", "stage2"):
        rdir = out / recipe
        generator = None
        if recipe == "stage2":
            generator = results["stage1"]["models"].frontend.generator
        trainer = Trainer(recipe, preset, train.images, train.labels, rdir, generator=generator,
                          seed=args.seed, progress=progress)
        models = trainer.run()
        metrics = evaluate_verification(models, test_faces, idx_a, idx_b, same, folds=folds)
        row = summarise({"baseline": "(a) unprotected ArcFace", "stage1": "(b) MinusFace f on r",
                         "stage2": "(c) MinusFace f_p on X_p"}[recipe], metrics, train_seconds(rdir))
        results[recipe] = {"models": models, "metrics": metrics, "row": row}
        rows.append(row)
        if recipe == "stage1":
            torch.save({"generator": models.frontend.generator.state_dict(),
                        "width": preset.generator_width}, out / "generator.pt")
    gap = 100 * (rows[0]["accuracy"] - rows[2]["accuracy"])
    text = table([reference] + rows, gap)
    print("\nLFW, centre-cropped, not aligned, trained on LFW only; "
          f"{split}, preset {preset.name}; {provenance()}; "
          f"total {(time.perf_counter() - t_all) / 60:.1f} min")
    print(text)
    (out / "results.json").write_text(json.dumps({
        "split": split, "preset": preset.to_dict(), "commit": git_commit(),
        "train_images": train.num_images, "train_identities": train.num_classes,
        "rows": [reference] + rows, "gap_points": gap,
        "metrics": {k: v["metrics"] for k, v in results.items()}}, indent=2, default=str))
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
