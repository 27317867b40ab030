"""`make demo`: a real federated MinusFace run on LFW, its pictures, and recognition on X_p.

Runs `flwr run .` (Flower simulation on Ray) with 4 virtual sites through a private SuperLink
(simulation/launch.py), with pyproject.toml's run config (tiny preset) and the rounds, data and
output given here.  With a trained bundle (`--bundle`, default models/gpu-small-lfw when it is
there) the run starts from it (run config init-bundle: no stage 1, its f_p fine-tuned) and shows
its accuracy; without one it says plainly that it trains from scratch.  While it trains it prints
the ServerApp's progress line per round and any warning; then the final table, the report and
its pictures, a grid of held-out LFW faces next to their X_p, a folder of protected sample
faces, and a few held-out people enrolled, verified and identified through the recognition
service on loopback (minusfed/demo_service.py).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
GRID_PEOPLE = 6
SERVICE_PEOPLE = 6
DEFAULT_BUNDLE = ROOT / "models" / "gpu-small-lfw"      # where a trained bundle is committed
# Flower 1.42 logs this WARNING on every simulation, whatever num-supernodes says: a newcomer
# would read it as something to fix, and there is nothing to fix
FLOWER_NOTICES = ("default simulated SuperNodes changed from 10 to 2",)


def progress_printer(start: float):
    """A log-line callback that shows what a person watching the demo needs: the ServerApp's
    own lines (progress per round) and warnings or errors, each after the time since start."""
    def show(line: str) -> None:
        text = ANSI.sub("", line).strip()
        level, _, message = text.partition(":")
        message = message.strip()
        if any(notice in message for notice in FLOWER_NOTICES):
            return
        if level.strip() in ("WARNING", "ERROR") or message.startswith("minusfed:"):
            shown = message if level.strip() == "INFO" else f"{level.strip()}: {message}"
            print(f"  [{time.monotonic() - start:5.0f} s] {shown}", flush=True)
    return show


def held_out_faces(data: Path, fold: int, count: int) -> list[Path]:
    """One image each of the first `count` people in the server's benchmark fold: people no
    site trained on."""
    from clients.data import read_pairs

    chosen: dict[str, Path] = {}
    for pair in read_pairs(data / "pairs.txt"):
        if pair.fold != fold:
            continue
        person = Path(pair.path_a).parent.name
        if person not in chosen:
            chosen[person] = Path(pair.path_a)
        if len(chosen) == count:
            break
    return list(chosen.values())


def face_grid(data: Path, fold: int, generator_path: Path, out: Path, trained_with: str) -> Path:
    """faces-and-protected.png: held-out LFW faces above their X_p under the run's final g."""
    import torch

    from clients.data import load_image
    from federation.curves import face_grid as draw
    from minusface.frontend import MinusFaceFrontend
    from minusface.weights import load_generator

    paths = held_out_faces(data, fold, GRID_PEOPLE)
    faces = torch.stack([load_image(p) for p in paths])
    frontend = MinusFaceFrontend(generator=load_generator(generator_path))
    protected = frontend.protect(faces, register=False)     # a picture, never shipped
    return draw(faces.numpy(), protected.numpy(), [p.parent.name for p in paths],
                out / "faces-and-protected.png",
                f"LFW faces of the held-out fold {fold} (top) and their X_p (bottom), "
                f"protected with the run's final g ({trained_with})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="LFW folder (images/, pairs.txt)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--stage1-rounds", type=int, default=2)
    ap.add_argument("--stage2-rounds", type=int, default=2)
    ap.add_argument("--bundle", type=Path, default=None,
                    help="start from this trained bundle (default: models/gpu-small-lfw when "
                         "present); 'none' trains from scratch")
    args = ap.parse_args(argv)

    from clients.protect_dir import protect_directory
    from federation.report import PICTURES, final_summary
    from minusface.frontend import MinusFaceFrontend
    from minusface.weights import load_generator
    from simulation.launch import run_simulation
    from task.bundle import is_smoke
    from task.config import run_config

    data = args.data.resolve()
    if not (data / "images").is_dir() or not (data / "pairs.txt").is_file():
        print(f"error: {data} is not an LFW folder: expected images/<person>/<person>_NNNN.jpg "
              "and pairs.txt (build one with `minusfed data prepare-lfw ARCHIVE OUT`, or pass "
              "DATA=/path/to/lfw_112_centercrop)", file=sys.stderr)
        return 2
    out = args.out.resolve()
    run_dir = out / f"federated-{time.strftime('%Y%m%d-%H%M%S')}"
    bundle = chosen_bundle(args.bundle)
    try:
        extra = start_from(bundle) if bundle else {}
        cfg = run_config({"stage1-rounds": args.stage1_rounds, "stage2-rounds": args.stage2_rounds,
                          "data-path": str(data), "out-dir": str(run_dir), "min-nodes": args.nodes,
                          **extra})
    except (TypeError, ValueError) as exc:         # BundleError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rounds = (f"{cfg.stage2_rounds} stage-2 round(s)" if bundle else
              f"{cfg.stage1_rounds} + {cfg.stage2_rounds} rounds")
    print(f"federated MinusFace: {args.nodes} virtual sites, {rounds}, preset {cfg.preset_name}, "
          f"LFW at {data}\n{starting_line(bundle, cfg.preset_name)}\n"
          f"(equivalent: flwr run . --stream -c 'out-dir=\"{run_dir}\" ...' "
          f"--federation-config 'num-supernodes={args.nodes}')\n"
          "Starting a private SuperLink, Ray and the sites (about a minute), then one line per "
          "round:", flush=True)
    start = time.monotonic()
    result = run_simulation(cfg.to_flower(), num_supernodes=args.nodes, num_cpus=1,
                            on_line=progress_printer(start))
    print(f"run {result.run_id}: {result.status} in {result.seconds:.0f} s")
    if run_dir.is_dir():                 # the whole log, with Flower's own lines, for reading later
        (run_dir / "flwr.log").write_text(result.log, encoding="utf-8")
        print(f"full log: {run_dir / 'flwr.log'}")
    if not result.completed:
        print(result.details, file=sys.stderr)
        print(result.log[-4000:], file=sys.stderr)
        return 1
    claim = ("a smoke run, not an accuracy claim" if is_smoke(cfg.preset_name) else
             "fine-tuned from the trained bundle")
    print(f"\nLFW, centre-cropped, not aligned, trained on LFW only ({cfg.preset_name} preset: "
          f"{claim})\n" + final_summary(run_dir))
    print(f"\nreport:  {run_dir / 'report.md'}\nmetrics: {run_dir / 'metrics.jsonl'}")
    for name in PICTURES.values():
        if (run_dir / name).is_file():
            print(f"picture: {run_dir / name}")

    generator = run_dir / "final" / "generator.pt"
    trained_with = (f"the bundle's, preset {cfg.preset_name}" if bundle else
                    f"preset {cfg.preset_name}, {cfg.stage1_rounds} stage-1 rounds")
    print(f"faces next to their X_p: {face_grid(data, cfg.eval_fold, generator, out, trained_with)}")
    if is_smoke(cfg.preset_name):
        print("  (a g trained this briefly at this size can leave faces visible in X_p: the picture "
              "shows the mechanics, not the protection a trained MinusFace gives)")
    sample = out / "sample-faces"
    sample.mkdir(parents=True, exist_ok=True)
    people = sorted(p for p in (data / "images").iterdir() if p.is_dir())[:6]
    for person in people:
        for img in sorted(person.glob("*.jpg"))[:2]:
            target = sample / person.name / img.name
            target.parent.mkdir(exist_ok=True)
            if not target.exists():
                target.symlink_to(img)
    frontend = MinusFaceFrontend(generator=load_generator(generator))
    report = protect_directory(sample, out / "protected", frontend, progress=False,
                               overwrite=True)  # the demo's own folder: a rerun replaces it
    print(f"protected {len(report.written)} LFW faces with the federated g -> {out / 'protected'}")
    return recognise_step(run_dir / "final", data, cfg.eval_fold, is_smoke(cfg.preset_name))


def chosen_bundle(given: Path | None) -> Path | None:
    """--bundle, or the committed trained bundle when there is one; None: from scratch."""
    if given is not None:
        return None if str(given) == "none" else given.resolve()
    return DEFAULT_BUNDLE if (DEFAULT_BUNDLE / "card.json").is_file() else None


def start_from(bundle: Path) -> dict[str, object]:
    """Run-config keys that start the run from `bundle` with the architecture it holds."""
    from federation.init_bundle import run_config_for
    return {**run_config_for(bundle), "init-bundle": str(bundle)}


def starting_line(bundle: Path | None, preset: str) -> str:
    if bundle is None:
        return (f"Trains from scratch (no trained model is loaded; no bundle at {DEFAULT_BUNDLE}, "
                f"or pass --bundle DIR / make demo BUNDLE=DIR): the {preset} preset is small enough "
                "for a laptop CPU and shows the mechanics; expect accuracy near chance.")
    from task.bundle import read_card
    card = read_card(bundle)
    acc = (card.get("server-eval") or {}).get("server_accuracy")
    shown = f"{100 * acc:.2f} %" if isinstance(acc, float) else "not recorded"
    return (f"Starts from the trained bundle {bundle} (preset {preset}, its card's LFW accuracy "
            f"{shown}): no stage 1, its g frozen, f_p fine-tuned on the sites' faces.")


def recognise_step(final: Path, data: Path, fold: int, smoke: bool) -> int:
    """The run's bundle behind a real recognition service; 0, or 1 if the service failed."""
    from minusfed.demo_service import SERVICE_FAR, recognise, table

    if not (final / "server" / "server.json").is_file():
        print("no server half in the run's bundle (no server-side benchmark): skipping "
              "recognition")
        return 0
    print(f"\nRecognition through the service (minusfed serve on loopback, TLS, API token): "
          f"{SERVICE_PEOPLE} held-out people enrolled from one photo each, then another photo of "
          "each sent as X_p only:", flush=True)
    try:
        outcomes, threshold = recognise(final, data, fold, SERVICE_PEOPLE)
    except Exception as exc:   # noqa: BLE001 - the demo reports what failed and exits non-zero
        print(f"error: the recognition service step failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    print(table(outcomes, threshold, SERVICE_FAR))
    if smoke:
        print("  (a smoke bundle's f_p is near chance: these scores show the path a deployment "
              "takes, not a recognizer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
