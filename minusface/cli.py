"""`minusfed` command line: one subcommand per job a site runs.

Subcommands import what they need lazily, so `minusfed protect` never imports Flower.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

BANNER = "!" * 78


def _cmd_protect(args: argparse.Namespace) -> int:
    import torch

    from .frontend import MinusFaceFrontend
    from .protect_dir import protect_directory
    from .weights import WeightsError, load_generator

    if args.weights:
        try:
            generator = load_generator(args.weights)
        except WeightsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        frontend = MinusFaceFrontend(generator=generator)
        print(f"generator: {args.weights} (w = {generator.width})")
    else:
        torch.manual_seed(args.seed)
        frontend = MinusFaceFrontend(width=args.width)
        print(f"{BANNER}\nWARNING: no --weights given: using a FRESHLY INITIALISED generator "
              f"(w = {args.width}).\nIts X_p are shuffled DCT images of an untrained subtraction: "
              f"they are NOT the\nprotection a trained MinusFace gives. Train one (make demo / "
              f"flwr run .) and pass --weights.\n{BANNER}", file=sys.stderr)
    frontend.eval()
    try:
        report = protect_directory(Path(args.in_dir), Path(args.out_dir), frontend,
                                   batch_size=args.batch_size, resize=args.resize,
                                   progress=not args.quiet)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, reason in report.skipped:
        print(f"skipped: {reason}" if str(path) in reason else f"skipped: {path}: {reason}",
              file=sys.stderr)
    print(f"protected {len(report.written)} image(s) -> {Path(args.out_dir).resolve()}"
          f"{f'; skipped {len(report.skipped)}' if report.skipped else ''}")
    return 1 if report.skipped and not report.written else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minusfed", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("protect", help="protect every face image under IN_DIR (X_p as PNG)")
    p.add_argument("in_dir", metavar="IN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--weights", metavar="CKPT", help="trained generator (.pt written by minusfed)")
    p.add_argument("--width", type=int, default=64, help="generator width w without --weights")
    p.add_argument("--seed", type=int, default=0, help="init seed without --weights")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resize", action="store_true",
                   help="resize faces that are not 112x112 (bicubic) instead of skipping them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_protect)

    # Subcommands that live with their packages; their heavy imports happen when they run.
    from federation.deploy.cli import add_parser as add_deploy
    from privacy.cli import add_parser as add_privacy
    add_privacy(sub)
    add_deploy(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime import tune_allocator
    tune_allocator()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
