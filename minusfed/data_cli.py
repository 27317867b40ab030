"""`minusfed data ...`: bring face data into the layouts minusfed reads.

    minusfed data prepare-lfw lfw.tgz OUT --pairs pairs.txt [--pairs pairsDevTrain.txt ...]
    minusfed data from-bin lfw.bin OUT      # insightface verification set -> LFW-style folder
    minusfed data from-rec train.rec OUT    # insightface training set -> folder per identity
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PREPARE_HELP = """\
Build the 112x112 centre-crop LFW folder minusfed reads (images/<Name>/<Name>_NNNN.jpg, the pair
files, SHA256SUMS) from the official LFW archive (lfw.tgz: 13,233 images of 5,749 people,
250x250) and the official pair files (pairs.txt is required: the server-side
benchmark's View 2 folds).  Recipe: RGB, centre crop (50, 50, 200, 200), Pillow LANCZOS to
112x112, JPEG quality 90 with optimize; about 52 MB of images.  OUT must not exist."""


def _cmd_prepare_lfw(args: argparse.Namespace) -> int:
    from clients.formats import prepare_lfw

    try:
        result = prepare_lfw(args.archive, args.out, args.pairs, progress=not args.quiet)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.ignored:
        shown = ", ".join(result.ignored[:5]) + (" ..." if len(result.ignored) > 5 else "")
        print(f"ignored {len(result.ignored)} archive member(s) that are not LFW images: {shown}",
              file=sys.stderr)
    for name in result.unofficial:
        print(f"warning: {name} is not the official LFW file (its md5 differs): numbers on it "
              "are not comparable with published LFW results", file=sys.stderr)
    print(f"wrote {result.images} images of {result.identities} people and "
          f"{', '.join(result.pair_files)} -> {result.out} (check: cd {result.out} && "
          "sha256sum -c SHA256SUMS)")
    return 0


def _cmd_from_bin(args: argparse.Namespace) -> int:
    from clients.formats import verification_to_folder

    try:
        out = verification_to_folder(args.bin, args.out, progress=not args.quiet)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} (images/ and a one-fold pairs.txt): use it as data-path with eval-fold=0")
    return 0


def _cmd_from_rec(args: argparse.Namespace) -> int:
    from clients.formats import rec_to_folders

    try:
        images, people = rec_to_folders(args.rec, args.out, args.idx, progress=not args.quiet)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {images} faces of {people} identities -> {args.out} (one folder per identity: "
          "a site's data-path)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="bring face data into the layouts minusfed reads",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = data.add_subparsers(dest="data_command", required=True)

    p = steps.add_parser("prepare-lfw", help="official lfw.tgz + pair files -> 112x112 LFW folder",
                         description=PREPARE_HELP)
    p.add_argument("archive", type=Path, metavar="ARCHIVE", help="lfw.tgz (the original release)")
    p.add_argument("out", type=Path, metavar="OUT", help="new folder to create")
    p.add_argument("--pairs", type=Path, action="append", default=[], metavar="FILE",
                   help="an official pair file (pairs.txt, pairsDevTrain.txt, pairsDevTest.txt); "
                        "repeat for each; pairs.txt is required")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare_lfw)

    p = steps.add_parser("from-bin", help="insightface .bin verification set -> LFW-style folder",
                         description="Read an insightface verification set (lfw.bin, cfp_fp.bin, "
                         "agedb_30.bin) without running code from it and write an LFW-style "
                         "folder (images/, pairs.txt) the server-side benchmark reads.")
    p.add_argument("bin", type=Path, metavar="BIN")
    p.add_argument("out", type=Path, metavar="OUT", help="new folder to create")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_from_bin)

    p = steps.add_parser("from-rec", help="insightface .rec/.idx training set -> identity folders",
                         description="Read an insightface training set (MXNet RecordIO .rec + "
                         ".idx, e.g. MS1MV2; no MXNet needed) and write one folder per identity.")
    p.add_argument("rec", type=Path, metavar="REC")
    p.add_argument("out", type=Path, metavar="OUT", help="new folder to create")
    p.add_argument("--idx", type=Path, default=None, help="index file (default: REC with .idx)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_from_rec)
