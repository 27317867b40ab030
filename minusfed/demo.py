"""`make demo`: a real federated MinusFace run on LFW, then protect a sample with its g.

Runs `flwr run .` (Flower simulation on Ray) with 4 virtual sites through a private SuperLink
(simulation/launch.py), with pyproject.toml's run config (tiny preset) and the rounds, data and
output given here, prints the final table and where the report is, then writes protected
images of a few LFW people with the federated generator.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="LFW folder (images/, pairs.txt)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--stage1-rounds", type=int, default=2)
    ap.add_argument("--stage2-rounds", type=int, default=2)
    args = ap.parse_args(argv)

    from clients.protect_dir import protect_directory
    from federation.report import final_summary
    from minusface.frontend import MinusFaceFrontend
    from minusface.weights import load_generator
    from simulation.launch import run_simulation
    from task.config import run_config

    data = args.data.resolve()
    if not (data / "images").is_dir():
        print(f"error: {data} has no images/ folder (pass DATA=/path/to/lfw_112_centercrop)",
              file=sys.stderr)
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
          f"(equivalent: flwr run . --stream -c 'out-dir=\"{run_dir}\" ...' "
          f"--federation-config 'num-supernodes={args.nodes}')")
    result = run_simulation(cfg.to_flower(), num_supernodes=args.nodes, num_cpus=1, echo=False)
    print(f"run {result.run_id}: {result.status} in {result.seconds:.0f} s")
    if not result.completed:
        print(result.details, file=sys.stderr)
        print(result.log[-4000:], file=sys.stderr)
        return 1
    print(f"\nLFW, centre-cropped, not aligned, trained on LFW only ({cfg.preset_name} preset: a "
          "smoke run, not an accuracy claim)\n" + final_summary(run_dir))
    print(f"\nreport:  {run_dir / 'report.md'}\nmetrics: {run_dir / 'metrics.jsonl'}")

    sample = out / "sample-faces"
    sample.mkdir(parents=True, exist_ok=True)
    people = sorted(p for p in (data / "images").iterdir() if p.is_dir())[:6]
    for person in people:
        for img in sorted(person.glob("*.jpg"))[:2]:
            target = sample / person.name / img.name
            target.parent.mkdir(exist_ok=True)
            if not target.exists():
                target.symlink_to(img)
    frontend = MinusFaceFrontend(generator=load_generator(run_dir / "final" / "generator.pt"))
    report = protect_directory(sample, out / "protected", frontend, progress=False,
                               overwrite=True)  # the demo's own folder: a rerun replaces it
    print(f"protected {len(report.written)} LFW faces with the federated g -> {out / 'protected'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
