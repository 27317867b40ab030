"""`make demo`: a real federated MinusFace run on LFW, then faces next to their X_p.

Runs `flwr run .` (Flower simulation on Ray) with 4 virtual sites through a private SuperLink
(simulation/launch.py), with pyproject.toml's run config (tiny preset) and the rounds, data and
output given here.  While it trains it prints the ServerApp's progress line per round (stage,
round i/N, elapsed, ETA, server accuracy) and any warning; then the final table, the report and
its pictures, a grid of LFW faces of the held-out fold next to their protected images X_p
(protected with the run's final g), and a folder of protected sample faces.
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
    args = ap.parse_args(argv)

    from clients.protect_dir import protect_directory
    from federation.report import PICTURES, final_summary
    from minusface.frontend import MinusFaceFrontend
    from minusface.weights import load_generator
    from simulation.launch import run_simulation
    from task.config import run_config

    data = args.data.resolve()
    if not (data / "images").is_dir() or not (data / "pairs.txt").is_file():
        print(f"error: {data} is not an LFW folder: expected images/<person>/<person>_NNNN.jpg "
              "and pairs.txt (build one with `minusfed data prepare-lfw ARCHIVE OUT`, or pass "
              "DATA=/path/to/lfw_112_centercrop)", file=sys.stderr)
        return 2
    out = args.out.resolve()
    run_dir = out / f"federated-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        cfg = run_config({"stage1-rounds": args.stage1_rounds, "stage2-rounds": args.stage2_rounds,
                          "data-path": str(data), "out-dir": str(run_dir), "min-nodes": args.nodes})
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"federated MinusFace: {args.nodes} virtual sites, {cfg.stage1_rounds} + "
          f"{cfg.stage2_rounds} rounds, preset {cfg.preset_name}, LFW at {data}\n"
          f"Trains from scratch (no trained model is loaded): the {cfg.preset_name} preset is "
          "small enough for a laptop CPU and shows the mechanics; expect accuracy near chance.\n"
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
    print(f"\nLFW, centre-cropped, not aligned, trained on LFW only ({cfg.preset_name} preset: a "
          "smoke run, not an accuracy claim)\n" + final_summary(run_dir))
    print(f"\nreport:  {run_dir / 'report.md'}\nmetrics: {run_dir / 'metrics.jsonl'}")
    for name in PICTURES.values():
        if (run_dir / name).is_file():
            print(f"picture: {run_dir / name}")

    generator = run_dir / "final" / "generator.pt"
    trained_with = f"preset {cfg.preset_name}, {cfg.stage1_rounds} stage-1 rounds"
    print(f"faces next to their X_p: {face_grid(data, cfg.eval_fold, generator, out, trained_with)}")
    if cfg.preset_name == "tiny":
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
