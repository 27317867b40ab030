"""Training-step throughput: unprotected twin vs MinusFace stage 1 and stage 2, per preset and device.

    python -m bench.train_step --preset cpu-small --batch 32           # CPU
    python -m bench.train_step --preset paper --batch 64 256           # GPU (bf16 + channels_last)
    python -m bench.train_step --preset cpu-small --compare-precision 3 # CPU: float32 vs bf16

One full step each (forward, backward, SGD update) on random faces, median of --iters after
--warmup, synchronised on CUDA.  FLOPs per image are counted once with torch's FlopCounterMode
(convolutions and matrix products, forward + backward); on CUDA the achieved rate is compared
with the bf16 peak (--peak-tflops, default the H100/H200 datasheet's).  The ratio
MinusFace / unprotected img/s is the front end's training cost.
`--compare-precision R` (CPU): each recipe's step in every precision candidate of
minusface/precision.py (float32 NCHW, bf16 autocast, bf16 + channels_last; protect() inside
stage 2 in the same mode) and as the policy chooses ("auto": its probe, or this machine's cached
choice, picked per model), the variants alternating step by step in one process, median of R x
--iters steps after --warmup; the policy's choice is named and its speed-up over float32 given.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import sys
from collections.abc import Sequence
from functools import partial

import torch

from bench.common import arg_parser, markdown_table, median_seconds, provenance
from minusface import precision
from minusface.generator import UNetGenerator
from minusface.presets import Preset, get_preset
from minusface.runtime import tune_allocator
from minusface.trainer import Models, build_models, make_optimizer, step_plan, train_step

DATASHEET_BF16_TFLOPS = 989.0      # H100 / H200 SXM dense bf16 (a lead; bench/gpu.py measures)


def count_flops(models: Models, preset: Preset, device: torch.device, classes: int,
                batch: int = 4) -> float:
    """FLOPs of one training step per image (forward + backward; the SGD update excluded)."""
    from torch.utils.flop_counter import FlopCounterMode

    opt = make_optimizer(models, preset)
    x = torch.rand(batch, 3, 112, 112, device=device) * 2 - 1
    y = torch.randint(0, classes, (batch,), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(models, x, y, opt, device)
    return counter.get_total_flops() / batch


def bench_recipes(preset_name: str, batches: Sequence[int], device: torch.device, classes: int,
                  iters: int, warmup: int, peak_tflops: float | None = None,
                  recipes: Sequence[str] = ("baseline", "stage1", "stage2")) -> list[dict]:
    """img/s, FLOPs per image and achieved rate of each recipe's training step per batch."""
    preset = get_preset(preset_name)
    generator = UNetGenerator(width=preset.generator_width)
    rows = []
    for recipe in recipes:
        g = None
        if recipe == "stage2":
            g = UNetGenerator(width=preset.generator_width)
            g.load_state_dict(generator.state_dict())
        models = build_models(recipe, preset, classes, generator=g).to(device)
        models.train()
        flops = count_flops(models, preset, device, classes)
        for batch in batches:
            opt = make_optimizer(models, preset)
            x = torch.rand(batch, 3, 112, 112, device=device) * 2 - 1
            y = torch.randint(0, classes, (batch,), device=device)
            s = median_seconds(partial(train_step, models, x, y, opt, device), device, iters,
                               warmup)
            tflops = flops * batch / s / 1e12
            row = {"recipe": recipe, "preset": preset.name, "batch": batch, "device": device.type,
                   "img_per_s": batch / s, "gflop_per_img": flops / 1e9, "tflops": tflops}
            if peak_tflops:
                row["fraction_of_measured_peak"] = tflops / peak_tflops
                row["fraction_of_datasheet"] = tflops / DATASHEET_BF16_TFLOPS
            rows.append(row)
            print(f"  train {recipe} {preset.name} batch {batch}: {batch / s:.1f} img/s, "
                  f"{1e3 * tflops:.1f} GFLOP/s", flush=True)
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    """The step table (with % of peak on a GPU) and each recipe's speed relative to baseline."""
    gpu = any("fraction_of_measured_peak" in r for r in rows)
    base = {(r["preset"], r["batch"]): r["img_per_s"] for r in rows if r["recipe"] == "baseline"}
    cells = []
    for r in rows:
        rate = f"{r['tflops']:.1f} TFLOP/s" if r["tflops"] >= 1 else f"{1e3 * r['tflops']:.1f} GFLOP/s"
        cells.append([r["recipe"], r["preset"], r["batch"], f"{r['img_per_s']:.1f}",
                      f"{r['gflop_per_img']:.2f}", rate]
                     + ([f"{100 * r['fraction_of_measured_peak']:.1f}"] if gpu else []))
    lines = [markdown_table(["recipe", "preset", "batch", "img/s", "GFLOP / img", "achieved"]
                            + (["% of peak"] if gpu else []), cells), ""]
    for r in rows:
        if r["recipe"] != "baseline" and (r["preset"], r["batch"]) in base:
            lines.append(f"{r['recipe']} / unprotected ({r['preset']}, batch {r['batch']}): "
                         f"{r['img_per_s'] / base[(r['preset'], r['batch'])]:.2f}x")
    return "\n".join(lines)


def _gather_shuffle(r: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The previous shuffle: one gather with the permutation broadcast over every pixel."""
    from minusface.shuffle import _seeded_permutations, csprng_permutations
    n, c = r.shape[:2]
    perm = csprng_permutations(n, c) if generator is None else _seeded_permutations(n, c, generator)
    index = perm.to(r.device).view(n, c, *([1] * (r.dim() - 2))).expand_as(r)
    return torch.gather(r, 1, index)


def _variants(what: str) -> tuple[str, object, str, dict[str, object]]:
    """(recipe, owner, attribute, {variant name: value}) of an A/B comparison; the first
    variant is the previous code, the last the present one."""
    from minusface import dct, frontend
    if what == "decode-backward":        # the same forward, differentiated by plain autograd
        return ("stage1", dct._DecodePlanes, "apply",
                {"autograd": dct._decode_planes, "adjoint": dct._DecodePlanes.apply})
    return ("stage2", frontend, "shuffle_channels",
            {"gather": _gather_shuffle, "row copy": frontend.shuffle_channels})


def compare(what: str, preset: str, batch: int, device: torch.device, classes: int, iters: int,
            warmup: int, repeats: int) -> None:
    """One recipe's img/s with each variant of `what`, alternating `repeats` times in one
    process, so machine noise hits both alike."""
    recipe, owner, attr, variants = _variants(what)
    present = getattr(owner, attr)
    runs: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(repeats):
            for name, value in variants.items():
                setattr(owner, attr, value)
                row = bench_recipes(preset, [batch], device, classes, iters, warmup,
                                    recipes=(recipe,))[0]
                runs[name].append(row["img_per_s"])
    finally:
        setattr(owner, attr, present)
    for name, v in runs.items():
        print(f"{recipe}, {preset}, batch {batch}, {what} = {name}: "
              f"{' / '.join(f'{x:.2f}' for x in v)} img/s")


def compare_precision(preset_name: str, batch: int, classes: int, iters: int, warmup: int,
                      repeats: int, recipes: Sequence[str] = ("baseline", "stage1", "stage2")
                      ) -> str:
    """ms per image of each recipe's CPU training step in each precision candidate and as the
    policy chooses, alternating step by step (same initial weights and faces for all)."""
    preset = get_preset(preset_name)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    generator = UNetGenerator(width=preset.generator_width)
    x = torch.rand(batch, 3, 112, 112) * 2 - 1
    y = torch.randint(0, classes, (batch,))
    variants = (*precision.CANDIDATES, "policy")
    rows = []
    for recipe in recipes:
        torch.manual_seed(1)
        g = None
        if recipe == "stage2":
            g = UNetGenerator(width=preset.generator_width)
            g.load_state_dict(generator.state_dict())
        base = build_models(recipe, preset, classes, generator=g)
        runs = {}
        for v in variants:
            models = copy.deepcopy(base)
            models.train()
            opt = make_optimizer(models, preset)

            def step(v: str = v, models: Models = models, opt=opt) -> None:
                mode = precision.forced(v) if v != "policy" else contextlib.nullcontext()
                with mode:
                    train_step(models, x, y, opt, cpu)
            runs[v] = step
        ms = precision.time_alternating(runs, iters * repeats, warmup)
        chosen = step_plan(base, batch, cpu).choice
        protect = ""
        if recipe == "stage2":
            protect = f", protect() {precision.inference_plan('protect', g, 2).choice}"
        rows.append([f"{recipe} ({preset.name}, batch {batch})",
                     *(f"{ms[v] / batch:.1f}" for v in variants),
                     f"{chosen}{protect}", f"{ms['float32'] / ms['policy']:.2f}x"])
        print(f"  {recipe}: " + ", ".join(f"{v} {ms[v] / batch:.1f}" for v in variants)
              + " ms/img", flush=True)
    return markdown_table(["step (ms / img)", "float32 NCHW", "bf16 autocast",
                           "bf16 + channels_last", "policy", "policy chose",
                           "float32 / policy"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.train_step", __doc__)
    ap.add_argument("--preset", nargs="+", default=["tiny", "cpu-small"])
    ap.add_argument("--compare-decode-backward", type=int, default=0, metavar="REPEATS",
                    help="instead: stage-1 img/s with d's adjoint vs autograd backward, "
                         "alternating REPEATS times (first --preset and --batch)")
    ap.add_argument("--compare-shuffle", type=int, default=0, metavar="REPEATS",
                    help="instead: stage-2 img/s with the row-copy vs the gather shuffle")
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="batch sizes (default: each preset's own)")
    ap.add_argument("--compare-precision", type=int, default=0, metavar="REPEATS",
                    help="instead (CPU): every recipe's step in float32, bf16, bf16 + "
                         "channels_last and as the CPU precision policy chooses, alternating")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="bf16 peak for the %% column on CUDA (default: datasheet 989)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tune_allocator()
    peak = (args.peak_tflops or DATASHEET_BF16_TFLOPS) if device.type == "cuda" else None
    if args.compare_precision:
        if device.type != "cpu":
            raise SystemExit("--compare-precision: a CPU comparison; this machine has CUDA "
                             "(set CUDA_VISIBLE_DEVICES= to run it on the CPU)")
        for name in args.preset:
            for batch in args.batch or [get_preset(name).batch_size]:
                print(f"{provenance()}; {precision.cpu_features().describe()}")
                print(compare_precision(name, batch, args.classes, args.iters, args.warmup,
                                        args.compare_precision))
        return 0
    for what, repeats in (("decode-backward", args.compare_decode_backward),
                          ("shuffle", args.compare_shuffle)):
        if repeats:
            name = args.preset[0]
            compare(what, name, (args.batch or [get_preset(name).batch_size])[0], device,
                    args.classes, args.iters, args.warmup, repeats)
            return 0
    rows = []
    for name in args.preset:
        batches = args.batch or [get_preset(name).batch_size]
        rows += bench_recipes(name, batches, device, args.classes, args.iters, args.warmup, peak)
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"\n{where}; {provenance()}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
