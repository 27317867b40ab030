"""`minusfed` command line: one subcommand per job a site runs.

Subcommands import what they need lazily, so `minusfed protect` never imports Flower.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minusface.frontend import MinusFaceFrontend

BANNER = "!" * 78


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size or width of 0 or -1 is a mistake)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def untrained_warning(meta: dict) -> str | None:
    """Why a generator file will not protect faces (its run recorded no aggregated stage-1
    round, or a smoke preset), or None.  Files written before runs recorded this say nothing."""
    if meta.get("stage1-rounds-aggregated") == 0:
        return ("this generator is UNTRAINED: its run aggregated no stage-1 round. Its X_p do not "
                "give MinusFace's protection; train one and pass its final/generator.pt.")
    if meta.get("preset") == "tiny":
        return ("this generator comes from the smoke preset 'tiny' "
                f"({meta.get('stage1-rounds-aggregated', '?')} stage-1 round(s)): faces can stay "
                "visible in its X_p. Use a generator trained with a real preset.")
    return None


def _frontend(args: argparse.Namespace) -> tuple[MinusFaceFrontend | None, str | None]:
    """(frontend, None) or (None, error message) for --weights / --width."""
    import torch

    from minusface.frontend import MinusFaceFrontend
    from minusface.weights import WeightsError, generator_metadata, load_generator

    if args.weights and Path(args.weights).is_dir():          # a bundle or its site/ half
        from task.bundle import BundleError, read_site, smoke_warning
        try:
            site = read_site(args.weights)
        except BundleError as e:
            return None, str(e)
        print(f"generator: {site.path} (w = {site.generator.width})")
        warning = smoke_warning(site.info, "site bundle")
        if warning:
            print(f"{BANNER}\nWARNING: {warning}\n{BANNER}", file=sys.stderr)
        return MinusFaceFrontend(generator=site.generator).eval(), None
    if args.weights:
        try:
            generator = load_generator(args.weights)
            meta = generator_metadata(args.weights)
        except WeightsError as e:
            return None, str(e)
        print(f"generator: {args.weights} (w = {generator.width})")
        warning = untrained_warning(meta)
        if warning:
            print(f"{BANNER}\nWARNING: {warning}\n{BANNER}", file=sys.stderr)
        return MinusFaceFrontend(generator=generator).eval(), None
    torch.manual_seed(args.seed)
    print(f"{BANNER}\nWARNING: no --weights given: using a FRESHLY INITIALISED generator "
          f"(w = {args.width}).\nIts X_p are shuffled DCT images of an untrained subtraction: "
          f"they are NOT the\nprotection a trained MinusFace gives. Train one (make demo / "
          f"flwr run .) and pass --weights.\n{BANNER}", file=sys.stderr)
    return MinusFaceFrontend(width=args.width).eval(), None


def _cmd_protect(args: argparse.Namespace) -> int:
    from clients.protect_dir import ProtectError, describe_ignored, plan_protection, run_plan

    try:                                   # every path check before a model is built
        plan = plan_protection(Path(args.in_dir), Path(args.out_dir), overwrite=args.overwrite)
    except (ProtectError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if plan.ignored:
        print(describe_ignored(plan.ignored, plan.in_dir), file=sys.stderr)
    frontend, problem = _frontend(args)
    if frontend is None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        report = run_plan(plan, frontend, batch_size=args.batch_size, resize=args.resize,
                          progress=not args.quiet)
    except ProtectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path, reason in report.skipped:
        print(f"skipped: {reason}" if str(path) in reason else f"skipped: {path}: {reason}",
              file=sys.stderr)
    print(f"protected {len(report.written)} image(s) -> {plan.out_dir}"
          f"{f'; skipped {len(report.skipped)}' if report.skipped else ''}")
    return 1 if report.skipped and not report.written else 0


PROTECT_HELP = """\
Protect every face image under IN_DIR (any depth) and write X_p as PNG under OUT_DIR.

Output names: the input's path relative to IN_DIR with the suffix replaced by .png
(bob/face.jpg -> OUT_DIR/bob/face.png).  Inputs that would share an output name (face.jpg and
face.png in one folder; compared case-insensitively) refuse the run and are listed.

Nothing you have is overwritten: OUT_DIR must not be IN_DIR, inside it, or contain it (after
resolving links); existing files at output paths refuse the run unless --overwrite; symbolic
links at output paths or inside OUT_DIR are never written through.  Each PNG is written to a
temp file and moved into place, so an interrupted run leaves only whole PNGs.

Inputs are files ending in .jpg .jpeg .png .bmp .ppm .pgm .tif .tiff .webp; other files,
hidden entries, symlinked folders (not followed) and broken links are listed as ignored.
Unreadable, corrupt or wrongly sized images are skipped and named once each.  Exit status: 0
done, 1 nothing protected or a write/X_p check failed, 2 bad arguments or paths."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minusfed", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("protect", help="protect every face image under IN_DIR (X_p as PNG)",
                       description=PROTECT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_dir", metavar="IN_DIR", help="folder of face images (read only)")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="folder for the X_p PNGs (created; must not overlap IN_DIR)")
    p.add_argument("--weights", metavar="CKPT|BUNDLE",
                   help="trained generator: a bundle's site/ folder or a .pt written by minusfed")
    p.add_argument("--width", type=_positive_int, default=64,
                   help="generator width w >= 1 without --weights (default 64)")
    p.add_argument("--seed", type=int, default=0, help="init seed without --weights")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="images per batch, >= 1 (default 32)")
    p.add_argument("--resize", action="store_true",
                   help="resize faces that are not 112x112 (bicubic) instead of skipping them")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files already at output paths (never symbolic links)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_protect)

    # Subcommands that live with their packages; their heavy imports happen when they run.
    from federation.deploy.cli import add_parser as add_deploy
    from minusfed.data_cli import add_parser as add_data
    from minusfed.privacy_cli import add_parser as add_privacy
    add_privacy(sub)
    add_data(sub)
    add_deploy(sub)
    from federation.service.serve import add_parsers as add_service
    from minusfed.recognition_cli import add_parsers as add_recognition
    add_service(sub)            # serve, tokens
    add_recognition(sub)        # bundle, enroll, verify, identify
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from minusface.runtime import tune_allocator
    tune_allocator()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
