"""Does f_p ever learn from X_p on LFW-sized data?  Stage 1, then stage 2 with periodic evaluation.

    python -m bench.stage2_probe --preset gpu-small --stage1-epochs 12 --stage2-epochs 16 \
        --eval-every 4 --budget 260 --data DIR --out DIR

Why: on LFW fold 0 (gpu-small, 8 epochs per recipe) stage 1 (f on the residue) reached 78.5 %
but f_p on X_p stayed at chance.  This probe trains g longer and follows stage 2's train loss,
train accuracy and LFW accuracy every few epochs, so the curve says whether stage 2 is slow or
stuck.  Stops cleanly at --budget seconds and still evaluates what it has.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench import federated_lfw as fl
from bench.common import DATA_HELP, RUNS, arg_parser, data_path
from minusface.presets import get_preset
from minusface.trainer import Trainer, default_device


def last_metrics(run_dir: Path) -> dict:
    """The Trainer's last metrics line of a recipe's run folder ({} if none yet)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.stage2_probe", __doc__)
    ap.add_argument("--preset", default="gpu-small")
    ap.add_argument("--stage1-epochs", type=int, default=12)
    ap.add_argument("--stage2-epochs", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--budget", type=float, default=260.0)
    ap.add_argument("--data", type=Path, default=None, help=DATA_HELP)
    ap.add_argument("--out", type=Path, default=RUNS / "stage2-probe")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--max-identities", type=int, default=None)
    ap.add_argument("--max-pairs", type=int, default=None)
    args = ap.parse_args(argv)
    deadline = time.time() + args.budget
    preset = get_preset(args.preset)
    device = default_device()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.results or args.out / "probe.json"
    train, test = fl.load_split(data_path(args.data), 0, preset, args.out / "train-faces.npz",
                                args.max_identities, args.max_pairs)
    res: dict = {"preset": preset.name, "stage1_epochs": args.stage1_epochs,
                 "stage2_epochs": args.stage2_epochs, "train_images": train.num_images,
                 "curve": []}

    def save() -> None:
        results_path.write_text(json.dumps(res, indent=2, default=str))

    t = Trainer("stage1", preset, train.images, train.labels, args.out / "stage1", device=device,
                epochs=args.stage1_epochs, progress=False)
    s1 = t.run()
    res["stage1"] = {**fl.evaluate(s1, test, device), **{k: last_metrics(args.out / "stage1").get(k)
                     for k in ("loss_gen", "loss_fr", "train_acc")}}
    print(f"stage 1 after {args.stage1_epochs} epochs: {res['stage1']}", flush=True)
    save()
    t2 = Trainer("stage2", preset, train.images, train.labels, args.out / "stage2",
                 generator=s1.frontend.generator, device=device, epochs=args.stage2_epochs,
                 progress=False)
    epoch = 0
    per_epoch = None
    while epoch < args.stage2_epochs:
        stop = min(args.stage2_epochs, epoch + args.eval_every) - 1
        t0 = time.time()
        models = t2.run(stop_after_epoch=stop)
        per_epoch = (time.time() - t0) / (stop + 1 - epoch)
        epoch = stop + 1
        m = last_metrics(args.out / "stage2")
        point = {"epoch": epoch, "train_loss": m.get("loss"), "train_acc": m.get("train_acc"),
                 **fl.evaluate(models, test, device)}
        res["curve"].append(point)
        print(f"stage 2 epoch {epoch}: {point}", flush=True)
        save()
        if time.time() + per_epoch * args.eval_every + 10 > deadline:
            res["stopped_early"] = f"time budget: stopped after epoch {epoch}"
            break
    save()
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
