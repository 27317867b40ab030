"""Does data loading starve training?  Loader throughput and its share of a training epoch.

    python -m bench.data_loading --preset cpu-small               # CPU
    python -m bench.data_loading --preset gpu-small               # GPU (bf16 + channels_last)

Two measurements, on random uint8 faces shaped like LFW crops (speed does not depend on the
pixels), every path yielding the same batches (`minusface.batches`):
  1. loader alone: img/s of the host path (gather + float conversion + flip on the CPU, one
     batch at a time) and of the staged path (uint8 gather in --workers threads into pinned
     memory, conversion and flip on the device), batches consumed on the device;
  2. one recipe's epoch of --steps steps through `train_epoch` with each path, against the
     step alone on a batch already on the device (the best an epoch can do); the loader's share
     of the epoch is at most 1 - epoch img/s / step img/s (that also holds everything else an
     epoch does beyond the steps).  The paths alternate, --rounds times.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import arg_parser, markdown_table, median_seconds, provenance, sync
from minusface.batches import iterate_batches
from minusface.generator import UNetGenerator
from minusface.presets import get_preset
from minusface.runtime import tune_allocator
from minusface.trainer import build_models, make_optimizer, train_epoch, train_step

PATHS = {"host": False, "staged": True}


def loader_rate(images: np.ndarray, labels: np.ndarray, batch: int, device: torch.device,
                staged: bool, workers: int, images_per_run: int) -> float:
    """img/s of producing batches on `device` (float in [-1, 1], flipped), nothing else."""
    repeat = max(1, -(-images_per_run // len(labels)))
    t = time.perf_counter()
    n = 0
    for x, _ in iterate_batches(images, labels, batch, repeat, seed=0, device=device,
                                staged=staged, workers=workers):
        x = x.to(device, non_blocking=True)
        n += x.shape[0]
        if n >= images_per_run:
            break
    sync(device)
    return n / (time.perf_counter() - t)


def epoch_rates(recipe: str, preset_name: str, device: torch.device, steps: int, rounds: int,
                workers: int, classes: int) -> dict:
    """img/s of the step alone and of a `steps`-step epoch with each batch path."""
    preset = get_preset(preset_name)
    generator = UNetGenerator(width=preset.generator_width) if recipe == "stage2" else None
    models = build_models(recipe, preset, classes, generator=generator).to(device)
    models.train()
    opt = make_optimizer(models, preset)
    b = preset.batch_size
    repeat = preset.repeat if recipe != "stage1" else 1
    n = max(b, steps * b // repeat)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, n).astype(np.int64)
    x = torch.rand(b, 3, 112, 112, device=device) * 2 - 1
    y = torch.randint(0, classes, (b,), device=device)
    step_s = median_seconds(lambda: train_step(models, x, y, opt, device), device,
                            iters=max(3, min(steps, 10)), warmup=2)
    out = {"recipe": recipe, "preset": preset_name, "batch": b, "steps": steps,
           "step_img_per_s": b / step_s, "epoch_img_per_s": {p: [] for p in PATHS}}
    sp = preset.with_(repeat=repeat)
    for r in range(rounds):
        for path, staged in PATHS.items():
            sync(device)
            stats = train_epoch(models, images, labels, sp, opt, None, device, seed=r,
                                progress=False, staged=staged)
            sync(device)
            out["epoch_img_per_s"][path].append(stats["images"] / stats["seconds"])
    for path in PATHS:
        best = statistics.median(out["epoch_img_per_s"][path])
        out[f"{path}_overhead"] = max(0.0, 1 - best / out["step_img_per_s"])
    return out


def run(preset_name: str, recipes: list[str], batches: list[int], device: torch.device,
        steps: int, rounds: int, workers: int, classes: int) -> dict:
    """Both measurements for one preset: loader alone per batch size, then each recipe's epoch."""
    tune_allocator()
    rng = np.random.default_rng(1)
    n = 2048
    images = rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, n).astype(np.int64)
    res: dict = {"device": _device_name(device), "preset": preset_name, "workers": workers,
                 "torch_threads": torch.get_num_threads(), "loader": [], "epochs": []}
    per_run = 4096 if device.type == "cuda" else 1024
    for b in batches:
        row = {"batch": b}
        for path, staged in PATHS.items():
            loader_rate(images, labels, b, device, staged, workers, b * 2)     # warm-up
            row[path] = statistics.median(loader_rate(images, labels, b, device, staged, workers,
                                                      per_run) for _ in range(3))
        res["loader"].append(row)
        print(f"loader batch {b}: host {row['host']:.0f} img/s, staged {row['staged']:.0f} img/s",
              flush=True)
    for recipe in recipes:
        row = epoch_rates(recipe, preset_name, device, steps, rounds, workers, classes)
        res["epochs"].append(row)
        print(table_epochs([row]), flush=True)
    return res


def table_loader(rows: list[dict]) -> str:
    """Loader-only img/s per batch size and path."""
    return markdown_table(["batch", "host path img/s", "staged path img/s"],
                          [[r["batch"], f"{r['host']:,.0f}", f"{r['staged']:,.0f}"] for r in rows])


def table_epochs(rows: list[dict]) -> str:
    """Epoch img/s per path against the step alone, and the share the loader may take."""
    cells = []
    for r in rows:
        h, s = (r["epoch_img_per_s"][p] for p in PATHS)
        cells.append([r["recipe"], r["preset"], r["batch"], f"{r['step_img_per_s']:.1f}",
                      _span(h), _span(s),
                      f"{100 * r['host_overhead']:.1f}% / {100 * r['staged_overhead']:.1f}%"])
    return markdown_table(["recipe", "preset", "batch", "step alone img/s",
                           "epoch, host path img/s", "epoch, staged path img/s",
                           "epoch time beyond the steps, host / staged"], cells)


def _span(v: list[float]) -> str:
    lo, hi = min(v), max(v)
    return f"{lo:.1f}" if abs(hi - lo) < 0.05 else f"{lo:.1f}–{hi:.1f}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.data_loading", __doc__)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--recipes", nargs="+", default=["baseline", "stage1", "stage2"])
    ap.add_argument("--batches", nargs="+", type=int, default=None,
                    help="loader-only batch sizes (default: 32 and the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="steps per epoch (default 8 CPU, 40 GPU)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="gather threads of the staged path")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    preset = get_preset(args.preset)
    batches = args.batches or sorted({32, preset.batch_size})
    steps = args.steps or (40 if device.type == "cuda" else 8)
    res = run(args.preset, args.recipes, batches, device, steps, args.rounds, args.workers,
              args.classes)
    print(f"\n{provenance()}; {res['device']}, {args.workers} gather threads\n"
          + table_loader(res["loader"])
          + "\n\n" + table_epochs(res["epochs"]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
