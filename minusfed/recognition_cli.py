"""`minusfed bundle inspect|from-run|int8` and the site's `minusfed enroll|verify|identify`.

The site commands protect every face locally (fresh CSPRNG permutations) and send only X_p to
a recognition service started with `minusfed serve` (federation/service/).  Subject ids for
`enroll` and `verify` come from --subject, else from each face's folder name (LFW layout:
PERSON/PERSON_0001.jpg).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BANNER = "!" * 78


def _cmd_inspect(args: argparse.Namespace) -> int:
    from task.bundle import BundleError, card_markdown, read_card

    try:
        card = read_card(args.bundle)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(card, indent=2, sort_keys=True) if args.json else card_markdown(card))
    return 0


def _cmd_from_run(args: argparse.Namespace) -> int:
    from federation.service.run_bundle import write_run_bundle
    from task.bundle import BundleError, read_card, smoke_warning

    try:
        out = write_run_bundle(args.run_dir, out=args.out)
    except (BundleError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    card = read_card(out)
    print(f"bundle written: {out} (halves: {', '.join(card['halves'])})")
    warning = smoke_warning({"smoke": card.get("smoke"), "preset": card.get("preset"),
                             "rounds": card.get("rounds", {}).get("stage1-aggregated")}, "bundle")
    if warning:
        print(f"{BANNER}\nWARNING: {warning}\n{BANNER}", file=sys.stderr)
    return 0


def _count(least: int):
    """argparse type: an integer >= `least`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value
    return parse


def _cmd_int8(args: argparse.Namespace) -> int:
    from federation.service.int8_bundle import quantize_bundle
    from minusface.int8 import Int8Error
    from task.bundle import BundleError
    from task.config import resolve_data_path

    try:
        data = resolve_data_path(args.data or "")
        info = quantize_bundle(args.bundle, data, fold=args.fold, max_pairs=args.max_pairs,
                               calibration_faces=args.calibration_faces, overwrite=args.overwrite)
    except (BundleError, Int8Error, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ev, t = info["evaluation"], info["timing"]
    print(f"int8 f_p on {ev['pairs']} held-out pairs of fold {ev['eval-fold']} (same X_p for "
          "both):")
    for name in ("float32", "int8"):
        m = ev[name]
        print(f"  {name:7s} accuracy {100 * m['accuracy']:.2f} %  AUC {m['auc']:.4f}  "
              f"TAR@1e-2 {m['tar_at_far_1e-2']:.3f}")
    print(f"  accuracy drop {ev['accuracy-drop-points']:+.2f} points (limit "
          f"{info['max-drop-points']}); embedding cosine to float32: min "
          f"{ev['embedding-cosine']['min']:.4f}, median {ev['embedding-cosine']['median']:.4f}")
    for key in ("batch-1", "batch-32"):
        print(f"  {key}: float32 {t[key]['float32-ms-per-image']:.2f} ms/img, int8 "
              f"{t[key]['int8-ms-per-image']:.2f} ms/img ({t[key]['speed-up']:.2f}x, "
              f"{t['threads']} thread(s))")
    if info["accepted"]:
        print("accepted: `minusfed serve BUNDLE/server --int8` serves it")
        return 0
    print("NOT accepted: int8 lost more than the limit; serve float32", file=sys.stderr)
    return 1


def _subject(args: argparse.Namespace, face: Path) -> str:
    return args.subject or face.parent.name


def _cmd_site(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from clients.data import ImageError
    from clients.recognition_client import (
        NotProtectedError,
        RecognitionClient,
        ServiceError,
        face_files,
        read_token,
    )
    from task.bundle import BundleError, read_site, smoke_warning

    try:
        faces = face_files(args.faces)
        site = read_site(args.bundle)
    except (FileNotFoundError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = smoke_warning(site.info, "site bundle")
    if warning:
        print(f"{BANNER}\nWARNING: {warning}\n{BANNER}", file=sys.stderr)
    token = read_token(args.token_file)
    failures = 0
    with RecognitionClient(args.server, site, token, ca_cert=args.ca_cert, wire=args.wire,
                           views=1 if args.wire == "png" else 2) as client:
        for face in tqdm(faces, desc=args.command, unit="face",
                         disable=args.quiet or len(faces) < 2, file=sys.stderr):
            try:
                if args.command == "enroll":
                    n = client.enroll(_subject(args, face), face)
                    line = f"{face}: enrolled as {_subject(args, face)} ({n} template(s))"
                elif args.command == "verify":
                    v = client.verify(_subject(args, face), face)
                    line = (f"{face}: {v.subject} score {v.score:.4f} "
                            f"{'MATCH' if v.match else 'no match'}")
                else:
                    found = client.identify(face, k=args.k)
                    line = f"{face}: " + (", ".join(
                        f"{c.subject} {c.score:.4f}{' MATCH' if c.match else ''}" for c in found)
                        or "gallery is empty")
            except (ImageError, ServiceError, NotProtectedError) as e:
                failures += 1
                line = f"{face}: error: {e}"
            except Exception as e:             # noqa: BLE001 - network errors: name and stop
                print(f"error: {args.server}: {type(e).__name__}: {e}", file=sys.stderr)
                return 2
            tqdm.write(line, file=sys.stdout)
    return 1 if failures else 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from clients.data import FaceDataset
    from clients.recognition_client import face_files
    from task.bundle import BundleError, read_server, read_site
    from task.export import ExportError, export_bundle

    bundle = Path(args.bundle)
    try:
        site = read_site(bundle) if (bundle / "site.json").exists() or (bundle / "site").is_dir() \
            else None
        server = read_server(bundle) if (bundle / "server.json").exists() \
            or (bundle / "server").is_dir() else None
        if site is None and server is None:
            raise BundleError(f"{bundle}: neither a bundle nor one of its halves (expected "
                              "site/site.json or server/server.json)")
        if args.faces:
            files = face_files([args.faces])[:args.check_faces]
            faces = torch.cat(list(FaceDataset([(f, 0) for f in files], skip_errors=False,
                                               progress=False).batches(64)))
            source = f"{len(files)} face(s) from {args.faces}"
        else:
            faces = torch.rand(args.check_faces, 3, 112, 112, generator=torch.Generator().manual_seed(0))
            faces = faces * 2 - 1
            source = f"{args.check_faces} uniform-noise image(s) (no --faces given)"
        manifest = export_bundle(args.out, site, server, faces, source, overwrite=args.overwrite,
                                 progress=lambda line: print(line, file=sys.stderr))
    except (BundleError, ExportError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e}; install the export extra: pip install 'minusfed[export]'", file=sys.stderr)
        return 2
    for name, meta in manifest["files"].items():
        print(f"{Path(args.out) / name}  {meta['bytes']:,} bytes  sha256 {meta['sha256'][:16]}...")
    check = {k: v for k, v in manifest["check"].items() if isinstance(v, float)}
    print("checked against PyTorch on " + manifest["check"]["faces_source"] + ": "
          + ", ".join(f"{k} {v:.7f}" if "cosine" in k else f"{k} {v:.3g}" for k, v in check.items()))
    return 0


def add_parsers(sub) -> None:
    b = sub.add_parser("bundle", help="model bundles: inspect one, or make one from a run")
    bsub = b.add_subparsers(dest="bundle_command", required=True)
    p = bsub.add_parser("inspect", help="print a bundle's model card")
    p.add_argument("bundle", metavar="DIR", help="a bundle (a run's final/) or one of its halves")
    p.add_argument("--json", action="store_true", help="card.json instead of CARD.md")
    p.set_defaults(func=_cmd_inspect)
    p = bsub.add_parser("from-run", help="bundle a run made before bundles existed")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's out-dir (holds final/models.pt)")
    p.add_argument("--out", metavar="DIR", help="where to write it (default RUN_DIR/final)")
    p.set_defaults(func=_cmd_from_run)
    p = bsub.add_parser("int8", help="quantize f_p to int8 for the service and measure its "
                                     "accuracy on the run's held-out LFW pairs")
    p.add_argument("bundle", metavar="DIR", help="a bundle with both halves (a run's final/)")
    p.add_argument("--data", metavar="LFW", help="LFW folder (default $MINUSFED_DATA)")
    p.add_argument("--fold", type=int, choices=range(10), metavar="K",
                   help="held-out View 2 fold (default: the one the bundle's thresholds used)")
    p.add_argument("--max-pairs", type=_count(0), default=0, metavar="N",
                   help="score at most N of its pairs (default all 600)")
    p.add_argument("--calibration-faces", type=_count(1), default=256, metavar="N",
                   help="faces from the other folds whose X_p set int8's ranges (default 256)")
    p.add_argument("--overwrite", action="store_true", help="measure again and replace int8.json")
    p.set_defaults(func=_cmd_int8)

    p = sub.add_parser("export", help="ONNX graphs of a bundle (g's residue, decode, f_p), "
                                      "checked with onnxruntime")
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle (a run's final/) or one of its halves")
    p.add_argument("out", metavar="OUT", help="folder for site/*.onnx, server/*.onnx, export.json")
    p.add_argument("--faces", metavar="DIR", help="real faces to check the graphs on (recommended)")
    p.add_argument("--check-faces", type=int, default=8, metavar="N",
                   help="how many faces the check uses (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    p.set_defaults(func=_cmd_export)

    for name, what in (("enroll", "enroll faces (protected here, only X_p sent)"),
                       ("verify", "verify faces against their subject (only X_p sent)"),
                       ("identify", "find the closest enrolled subjects (only X_p sent)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("faces", nargs="+", metavar="FACES", help="face images or folders")
        p.add_argument("--server", required=True, metavar="URL", help="https://host:port")
        p.add_argument("--bundle", required=True, metavar="BUNDLE/site",
                       help="a bundle's site/ folder (g)")
        p.add_argument("--token-file", metavar="FILE",
                       help="the site's API token (default $MINUSFED_SERVICE_TOKEN)")
        p.add_argument("--ca-cert", metavar="PEM", help="CA that signed the service's cert")
        p.add_argument("--wire", choices=("float16", "float32", "png"), default="float16",
                       help="X_p encoding (default float16 .npy, face and mirror)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name != "identify":
            p.add_argument("--subject", help="subject id (default: each face's folder name)")
        else:
            p.add_argument("-k", type=int, default=5, help="candidates per face (default 5)")
        p.set_defaults(func=_cmd_site)
