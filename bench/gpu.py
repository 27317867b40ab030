"""GPU benchmark for one lease: ceilings, protect(), training steps, FLOP fraction, LFW accuracy.

    bash bench/gpu.sh                      # on the GPU machine; writes $OUT (or runs/gpu)
    python -m bench.gpu --smoke            # CPU check of the script itself (tiny sizes)

One 15-minute device lease (start-up included) does not fit every phase at full size.  What is
still open needs, in this order (issue 4 first: it is that issue's last item):
    bash bench/gpu.sh --skip ceilings,protect,train,loader,compile --budget 540   # LFW, <= 16 ep.
    bash bench/gpu.sh --skip lfw --budget 300                                    # issue 7 phases

Phases, each time-boxed by --budget (seconds for the whole script) and saved as it finishes:
  1. ceilings: bf16 matrix product rate (8192^3, random data) and device copy bandwidth;
  2. protect() of the paper front end (g, w = 64) at batch 1 / 32 / 256, bf16 autocast +
     channels_last, with and without output registration (registration is what lets X_p leave
     a site; stage-2 training skips it), and e, d, g alone at batch 256: (e + d) / g;
  3. training img/s of the paper preset (IR-50, g w = 64), unprotected / stage 1 / stage 2 at
     batch 64 (paper) and 256, FLOPs counted with torch's FlopCounterMode (forward + backward),
     achieved TFLOP/s and fraction of the measured bf16 rate;
  4. batches: the host vs the staged batch path (`bench.data_loading`) for gpu-small: does
     data loading starve the GPU?
  5. torch.compile of each recipe's training step at batch 256 (stage 2, unprotected, stage 1),
     within --compile-budget;
  6. LFW View 2 fold 0, preset gpu-small: unprotected vs MinusFace centralized vs MinusFace
     federated (10 sites: the product's ServerApp and ClientApp in process),
     `bench.federated_lfw`, with epochs sized to the time left (or --lfw-epochs).
"""

from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from bench import data_loading
from bench import federated_lfw as fl
from bench.common import RUNS, arg_parser, git_commit, median_seconds, sync, today
from bench.train_step import DATASHEET_BF16_TFLOPS, bench_recipes
from minusface.dct import decode, encode
from minusface.frontend import MinusFaceFrontend
from minusface.generator import UNetGenerator
from minusface.presets import get_preset
from minusface.trainer import autocast, build_models, make_optimizer, train_step


def ceilings(device: torch.device, smoke: bool) -> dict:
    """Measured bf16 matmul rate and device copy bandwidth: the ceilings the rest is read against."""
    n = 1024 if smoke else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = median_seconds(partial(torch.matmul, a, b), device, iters=3 if smoke else 10,
                       warmup=1 if smoke else 3)
    nbytes = (16 if smoke else 1024) * 1024 * 1024                      # 1 GiB on the GPU
    big = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(big)
    c = median_seconds(partial(dst.copy_, big), device, iters=3 if smoke else 10)
    del a, b, big, dst
    return {"matmul_tflops": 2 * n ** 3 / s / 1e12, "matmul_n": n, "matmul_dtype": str(dtype),
            "copy_gb_s": 2 * nbytes / c / 1e9}


def bench_protect(device: torch.device, smoke: bool, width: int) -> dict:
    """protect() img/s per batch, with and without registration; e, d, g alone; bf16 error."""
    fe = MinusFaceFrontend(width=width).to(device).eval()
    if device.type == "cuda":
        fe = fe.to(memory_format=torch.channels_last)
    out: dict = {"generator_width": width, "rows": []}
    batches = (1, 2, 4) if smoke else (1, 32, 256)
    with torch.no_grad(), autocast(device):
        for b in batches:
            faces = torch.rand(b, 3, 112, 112, device=device) * 2 - 1
            iters = 3 if smoke else (50 if b == 1 else 20)
            for register in (True, False):
                s = median_seconds(partial(fe.protect, faces, register=register), device, iters)
                out["rows"].append({"batch": b, "registered": register, "ms_per_batch": 1e3 * s,
                                    "img_per_s": b / s})
        b = batches[-1]
        faces = torch.rand(b, 3, 112, 112, device=device) * 2 - 1
        coef = encode(faces)
        x = coef.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else coef
        iters = 3 if smoke else 20
        te = median_seconds(lambda: encode(faces), device, iters)
        td = median_seconds(lambda: decode(coef), device, iters)
        tg = median_seconds(lambda: fe.generator(x), device, iters)
        out["stages_batch"] = b
        out["e_ms"], out["d_ms"], out["g_ms"] = 1e3 * te, 1e3 * td, 1e3 * tg
        out["e_plus_d_over_g"] = (te + td) / tg
        # bf16 autocast must not reach the DCT maps: compare with float32 on the same input
        ref = fe.protect(faces, rng=torch.Generator().manual_seed(0), register=False).float()
    with torch.no_grad():
        full = fe.protect(faces, rng=torch.Generator().manual_seed(0), register=False).float()
    out["bf16_vs_fp32_protect_rel_err"] = float((ref - full).norm() / full.norm())
    return out


def bench_train(device: torch.device, smoke: bool, peak_tflops: float, classes: int) -> list[dict]:
    """Training img/s of the paper preset's three recipes (bench.train_step)."""
    return bench_recipes("tiny" if smoke else "paper", (2, 4) if smoke else (64, 256), device,
                         classes, iters=3 if smoke else 12, warmup=1 if smoke else 3,
                         peak_tflops=peak_tflops)


def bench_compile(device: torch.device, smoke: bool, peak_tflops: float, classes: int,
                  eager_rows: list[dict], deadline: float,
                  recipes: tuple[str, ...] = ("stage2", "baseline", "stage1")) -> list[dict]:
    """torch.compile of each recipe's networks (recognizer; g too in stage 1) at batch 256, in
    order, while time is left.  The front end's permutation draw and the DCT maps stay eager
    (host code by design; `protect` is called under no_grad)."""
    preset = get_preset("tiny" if smoke else "paper")
    batch = 4 if smoke else 256
    rows = []
    for recipe in recipes:
        if rows and time.time() + 2 * rows[-1]["compile_seconds"] > deadline:
            break
        g = UNetGenerator(width=preset.generator_width) if recipe == "stage2" else None
        models = build_models(recipe, preset, classes, generator=g).to(device)
        models.train()
        models.recognizer = torch.compile(models.recognizer)
        if recipe == "stage1":
            models.frontend.generator = torch.compile(models.frontend.generator)
        opt = make_optimizer(models, preset)
        x = torch.rand(batch, 3, 112, 112, device=device) * 2 - 1
        y = torch.randint(0, classes, (batch,), device=device)
        t0 = time.perf_counter()
        train_step(models, x, y, opt, device)
        sync(device)
        compile_s = time.perf_counter() - t0
        s = median_seconds(partial(train_step, models, x, y, opt, device), device,
                           iters=3 if smoke else 12, warmup=2)
        eager = next((r for r in eager_rows if r["recipe"] == recipe and r["batch"] == batch), None)
        row = {"recipe": recipe, "batch": batch, "compile_seconds": compile_s,
               "img_per_s": batch / s, "eager_img_per_s": eager["img_per_s"] if eager else None}
        if eager and "gflop_per_img" in eager:  # same model and batch: same FLOPs per image
            row["fraction_of_measured_peak"] = eager["gflop_per_img"] * batch / s / 1e3 / peak_tflops
        rows.append(row)
        print(f"compiled {recipe}: {row['img_per_s']:.0f} img/s (eager "
              f"{row['eager_img_per_s'] or 0:.0f}), compile {compile_s:.0f} s", flush=True)
        del models, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_loader(device: torch.device, smoke: bool) -> dict:
    """Host vs staged batch path (bench.data_loading) for the preset the LFW phase trains."""
    if smoke:
        return data_loading.run("tiny", ["baseline"], [8], device, steps=3, rounds=1, workers=2,
                                classes=100)
    return data_loading.run("gpu-small", ["baseline", "stage2"], [128, 256], device, steps=40,
                            rounds=2, workers=4, classes=1000)


def fmt_tables(res: dict) -> str:
    """Every phase's results so far, as text and Markdown tables."""
    lines = [(f"GPU benchmark: {res['device_name']}, torch {res['torch']}, "
              f"commit {res['commit']}, {res['date']}")]
    c = res.get("ceilings")
    if c:
        lines.append(f"measured ceilings: bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s "
                     f"(n = {c['matmul_n']}), device copy {c['copy_gb_s']:.0f} GB/s (read + write)")
    p = res.get("protect")
    if p:
        lines += ["", f"protect() (g w = {p['generator_width']}, bf16 autocast, channels_last)",
                  "| batch | registered for shipping | ms / batch | img/s |", "|---|---|---|---|"]
        for r in p["rows"]:
            lines.append(f"| {r['batch']} | {'yes' if r['registered'] else 'no'} | "
                         f"{r['ms_per_batch']:.2f} | {r['img_per_s']:.0f} |")
        lines.append(f"stages at batch {p['stages_batch']}: e {p['e_ms']:.2f} ms, d {p['d_ms']:.2f} ms, "
                     f"g {p['g_ms']:.2f} ms: (e + d) / g = {p['e_plus_d_over_g']:.3f} (target <= 0.05); "
                     f"bf16-vs-fp32 protect rel. error {p['bf16_vs_fp32_protect_rel_err']:.2e}")
    t = res.get("train")
    if t:
        lines += ["", "training step (forward + backward + SGD), bf16 autocast + channels_last",
                  "| recipe | preset | batch | img/s | GFLOP / img | TFLOP/s | % of measured bf16 peak |",
                  "|---|---|---|---|---|---|---|"]
        for r in t:
            lines.append(f"| {r['recipe']} | {r['preset']} | {r['batch']} | {r['img_per_s']:.0f} | "
                         f"{r['gflop_per_img']:.1f} | {r['tflops']:.1f} | "
                         f"{100 * r['fraction_of_measured_peak']:.1f} |")
    for comp in res.get("compile") or []:
        lines.append(f"torch.compile {comp['recipe']}, batch {comp['batch']}: "
                     f"{comp['img_per_s']:.0f} img/s vs eager {comp['eager_img_per_s'] or 0:.0f} "
                     f"(compile {comp['compile_seconds']:.0f} s)"
                     + (f", {100 * comp['fraction_of_measured_peak']:.1f}% of peak"
                        if "fraction_of_measured_peak" in comp else ""))
    ld = res.get("loader")
    if ld:
        lines += ["", f"batches: host vs staged path ({ld['workers']} gather threads)",
                  data_loading.table_loader(ld["loader"]), "", data_loading.table_epochs(ld["epochs"])]
    for key in ("errors",):
        if res.get(key):
            lines.append(f"\nerrors: {res[key]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("bench.gpu", __doc__)
    ap.add_argument("--out", type=Path, default=RUNS / "gpu")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole script")
    ap.add_argument("--data", type=Path, default=None, help="LFW folder for the accuracy phase")
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch folder for checkpoints and caches (default: --out)")
    ap.add_argument("--lfw-epochs", type=int, default=None, help="override the sized epochs")
    ap.add_argument("--lfw-reserve", type=float, default=30.0,
                    help="seconds kept back at the end of the accuracy phase")
    ap.add_argument("--classes", type=int, default=10_000, help="head size for the step benchmark")
    ap.add_argument("--compile-budget", type=float, default=240.0,
                    help="seconds the torch.compile phase may start recipes in")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script on CPU")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: "
                    "ceilings,protect,train,loader,compile,lfw")
    args = ap.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.budget
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    res: dict = {"device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else
                 platform.processor() or platform.machine(),
                 "torch": torch.__version__, "commit": git_commit(), "date": today(),
                 "host": platform.node(), "errors": {}}

    def save() -> None:
        (args.out / "gpu.json").write_text(json.dumps(res, indent=2, default=str))
        (args.out / "gpu.md").write_text(fmt_tables(res) + "\n")

    def phase(name: str, fn: Callable[[], object]) -> None:
        if name in skip:
            return
        t = time.time()
        print(f"== {name} ({deadline - t:.0f} s left)", flush=True)
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one phase failing must not lose the others
            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"
        res.setdefault("phase_seconds", {})[name] = time.time() - t
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    phase("ceilings", lambda: ceilings(device, args.smoke))
    peak = res.get("ceilings", {}).get("matmul_tflops", DATASHEET_BF16_TFLOPS)
    phase("protect", lambda: bench_protect(device, args.smoke, 4 if args.smoke else 64))
    phase("train", lambda: bench_train(device, args.smoke, peak, 100 if args.smoke else args.classes))
    phase("loader", lambda: bench_loader(device, args.smoke))
    compile_deadline = min(deadline, time.time() + args.compile_budget)
    phase("compile", lambda: bench_compile(device, args.smoke, peak,
                                           100 if args.smoke else args.classes,
                                           res.get("train", []), compile_deadline))
    print(fmt_tables(res), flush=True)

    if args.data is not None and "lfw" not in skip:
        def lfw() -> dict:
            preset = "tiny" if args.smoke else "gpu-small"
            epochs = args.lfw_epochs
            if epochs is None:
                epochs = size_epochs(device, preset, deadline - time.time() - args.lfw_reserve)
            print(f"LFW accuracy phase: preset {preset}, {epochs} epochs per recipe", flush=True)
            extra = ["--max-identities", "20", "--clients", "3", "--max-pairs", "40"] if args.smoke else []
            return fl.main(["--preset", preset, "--epochs", str(epochs), "--data", str(args.data),
                            "--out", str((args.work or args.out) / "lfw"),
                            "--results", str(args.out / "lfw_results.json"), *extra])
        phase("lfw", lfw)
    res["total_seconds"] = time.time() - t_start
    save()
    print("\n" + fmt_tables(res))
    lfw_res = res.get("lfw")
    if lfw_res:
        print("\nLFW View 2 fold 0 (centre crops, trained on LFW only), preset "
              f"{lfw_res['preset']['name']}, {lfw_res['preset']['epochs']} epochs:")
        print(fl.table(lfw_res["rows"]))
    print(f"\ntotal {res['total_seconds']:.0f} s; results in {args.out}")
    return 0


def size_epochs(device: torch.device, preset_name: str, seconds: float) -> int:
    """Epochs per recipe that fit `seconds` for all five trainings, from a short timing of each
    recipe's step at the preset's batch size (images per epoch: LFW fold-0 split, ~9k), plus
    the federated run's server-side evaluation after every round (on the CPU, as the ServerApp
    does: ~1,200 images of the fold's 600 pairs, each with its flip)."""
    preset = get_preset(preset_name)
    per_img = {}
    generator = UNetGenerator(width=preset.generator_width)
    for recipe in ("baseline", "stage1", "stage2"):
        models = build_models(recipe, preset, 1000, generator=generator if recipe == "stage2"
                              else None).to(device)
        models.train()
        opt = make_optimizer(models, preset)
        b = preset.batch_size
        x = torch.rand(b, 3, 112, 112, device=device) * 2 - 1
        y = torch.randint(0, 1000, (b,), device=device)
        per_img[recipe] = median_seconds(partial(train_step, models, x, y, opt, device), device,
                                         iters=5, warmup=3) / b
    cpu_models = build_models("stage2", preset, 2, generator=generator).eval()
    faces = torch.rand(16, 3, 112, 112) * 2 - 1
    transform = cpu_models.transform()
    with torch.no_grad():
        cpu_per_img = median_seconds(lambda: cpu_models.recognizer(transform(faces)),
                                     iters=2, warmup=1) / len(faces)
    n = 9000 if preset_name != "tiny" else 100
    eval_images = 2 * (1200 if preset_name != "tiny" else 40)
    r = preset.repeat
    central = n * (r * per_img["baseline"] + per_img["stage1"] + r * per_img["stage2"])
    federated = (n * (per_img["stage1"] + r * per_img["stage2"]) + 2 * 10 * 0.4   # site rebuilds
                 + 2 * eval_images * cpu_per_img)                    # server eval, both stages
    per_epoch = (central + federated) * 1.15                                 # + evaluation, loading
    epochs = int(max(1, min(preset.epochs * 2, seconds // max(per_epoch, 1e-9))))
    print(f"sizing: {per_epoch:.1f} s per epoch of all recipes -> {epochs} epochs in {seconds:.0f} s",
          flush=True)
    return epochs


if __name__ == "__main__":
    sys.exit(main())
