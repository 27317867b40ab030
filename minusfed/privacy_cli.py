"""`minusfed privacy-eval`: run the privacy attacks and write a report.

  minusfed privacy-eval --weights GEN.pt --data LFW_ROOT --client-identities N \
      --aux-identities M --out DIR --preset PRIVACY_PRESET [--judge CKPT]
  minusfed privacy-eval --run RUN_DIR (--client K | --all-clients) --out DIR [...]

Data mode: identities with >= 2 images under LFW_ROOT are shuffled with --seed; the first N are the
evaluated client.  The attacker's auxiliary set is drawn from EVERY other identity, single-image
ones too (--aux-identities M limits it to M identities; 0 = as many as the preset's aux_images
cap needs).
Run mode: the generator is RUN_DIR/final/generator.pt; client K's identities are recomputed with
simulation.partition + clients.site.federation_identities from RUN_DIR/run_config.json (the
run's task.config.RunConfig plus "num-clients", so preset overrides count too), or, without that
file, from --data, --num-clients, --eval-fold, --partition-scheme, --partition-seed,
--max-identities and --fed-preset (defaults: the run config's).  The auxiliary set is M
identities from outside client K.  --preset names an attack budget
(privacy.report.PRIVACY_PRESETS), --fed-preset a training preset (minusface.presets.PRESETS).
The judge: without --judge, an unprotected recognizer (minusface.trainer "baseline" recipe) is
trained ONCE on --judge-identities identities (>= 2 images) disjoint from every client (in run
mode: from every client of the run, so --all-clients never reuses a judge that holds a client's
identities), and the report prints its own cross-image quality on each client.  A --judge
checkpoint does not record its identities: it needs --judge-disjoint, the caller's assertion
that it saw none of the evaluated identities (a run's baseline trained on the clients does not).
Update leakage (gradient inversion, privacy.gradient_inversion) runs with the preset's gi_images /
gi_steps (override: --gi-images, --gi-steps; --gi-images 0 disables it).  In run mode the attacked
recognizer is the run's final stage-2 f_p (RUN_DIR/final/models.pt) when present, else a fresh one;
--fp CKPT names f_p in either mode.  With f_p, the report's `f_p linkage` row scores it as the
attacker with zero training (every site and the server hold it).

`add_parser(subparsers)` registers the subcommand; everything heavy is imported lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from task.config import RunConfig


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("privacy-eval", help="attack protected images of a client and "
                                                   "write a privacy report")
    p.add_argument("--weights", metavar="GEN.pt", help="client generator g (minusfed .pt)")
    p.add_argument("--data", metavar="LFW_ROOT", help="face folder root/<identity>/<image>")
    p.add_argument("--client-identities", type=int, default=10, metavar="N")
    p.add_argument("--aux-identities", type=int, default=0, metavar="M",
                   help="attacker identities (0 = as many as the preset's aux_images needs)")
    p.add_argument("--judge-identities", type=int, default=100, metavar="J",
                   help="identities the judge is trained on when no --judge is given")
    p.add_argument("--judge-disjoint", action="store_true",
                   help="assert that the --judge checkpoint saw none of the evaluated identities")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--preset", metavar="NAME", help="attack budget, a privacy.report."
                   "PRIVACY_PRESETS name (default: the one for the run config's preset)")
    p.add_argument("--judge", metavar="CKPT", help="trainer checkpoint of an unprotected "
                                                   "recognizer (baseline recipe)")
    p.add_argument("--run", metavar="DIR", help="federated run dir (DIR/final/generator.pt)")
    p.add_argument("--fp", metavar="CKPT", help="the global stage-2 recognizer f_p: a run's "
                   "final/models.pt or a minusface.trainer stage2 checkpoint (default with "
                   "--run: RUN_DIR/final/models.pt)")
    p.add_argument("--client", type=int, metavar="K", help="client index in --run")
    p.add_argument("--all-clients", action="store_true", help="every client of --run")
    p.add_argument("--num-clients", type=int, help="clients of the run (if no run_config.json)")
    # the run's partition when it has no run_config.json (defaults: pyproject.toml's run config)
    p.add_argument("--eval-fold", type=int)
    p.add_argument("--partition-scheme")
    p.add_argument("--partition-seed", type=int)
    p.add_argument("--max-identities", type=int)
    p.add_argument("--fed-preset", metavar="NAME", help="training preset of the run "
                                                       "(minusface.presets.PRESETS)")
    p.add_argument("--width", type=int, default=4, help="generator w when no weights (test only)")
    p.add_argument("--gi-images", type=int, metavar="B", help="faces in the attacked client "
                                                                 "step (0 = no gradient inversion)")
    p.add_argument("--gi-steps", type=int, metavar="N", help="gradient-inversion steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacker-seeds", type=int, default=1, metavar="N",
                   help="train every attacker N times (seeds SEED..SEED+N-1) on the same images; "
                        "reports per seed in seed-K/ and seeds.md with mean, spread and the "
                        "verdicts that every seed agrees on (default 1)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_cli)
    return p


# --------------------------------------------------------------------------- data

def _identities(root: Path, min_images: int = 2) -> dict[str, list[str]]:
    from clients.data import scan_identity_folders
    if (root / "images").is_dir() and (root / "pairs.txt").is_file():
        root = root / "images"                     # an LFW root: faces are under images/
    return dict(scan_identity_folders(root, min_images_per_identity=min_images))


def _pick_images(ids: dict[str, list[str]], n_ids: int, cap_images: int, seed: int,
                 exclude: set[str]) -> list[str]:
    """Identities outside `exclude` in a seeded order: the first n_ids (0 = no limit), stopping
    once cap_images images are covered (0 = no cap)."""
    import numpy as np
    pool = sorted(set(ids) - set(exclude))
    chosen, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(pool)):
        if (n_ids and len(chosen) >= n_ids) or (cap_images and total >= cap_images):
            break
        chosen.append(pool[i])
        total += len(ids[pool[i]])
    return sorted(chosen)


def _pick(names: list[str], n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    import numpy as np
    pool = sorted(set(names) - set(exclude))
    order = np.random.default_rng(seed).permutation(len(pool))
    return sorted(pool[i] for i in order[:n])


def _load(ids: dict[str, list[str]], names: list[str], cap: int | None = None):
    """Faces of `names` (at most `cap` per identity, first by file name)."""
    from clients.data import load_faces
    ds = load_faces({n: sorted(ids[n])[:cap] if cap else ids[n] for n in names}, progress=False)
    return ds.images, ds.labels, list(ds.identities)


def run_settings(args) -> tuple[RunConfig, Path, int, str]:
    """(the run's config, data root, number of clients, where they came from)."""
    cfg_file = Path(args.run) / "run_config.json"
    saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    data = args.data or saved.get("data-path")
    if not data:
        raise SystemExit("error: --run without run_config.json needs --data and the partition "
                         "arguments")
    num = saved.get("num-clients", saved.get("num-supernodes", args.num_clients))
    if not num:
        raise SystemExit("error: number of clients unknown: pass --num-clients")
    from task.config import run_config
    given = {k: v for k, v in (("eval-fold", args.eval_fold),
                               ("partition-scheme", args.partition_scheme),
                               ("partition-seed", args.partition_seed),
                               ("max-identities", args.max_identities),
                               ("preset", args.fed_preset)) if v is not None}
    known = run_config({}).to_flower()       # keys of this version (older files may have others)
    try:
        cfg = run_config({k: v for k, v in saved.items() if k in known} if saved else given)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {cfg_file if saved else 'partition arguments'}: {exc}") from None
    source = str(cfg_file) if saved else "command-line partition arguments"
    return cfg, Path(data), int(num), source


def _client_sets(args) -> tuple[Path, list[tuple[str, list[str]]], dict[str, list[str]], str,
                                set[str]]:
    """(data root, [(client name, identity names)], all identities, description, identities the
    judge must not hold: every client's of the run, or the data-mode client's)."""
    if args.run:
        from clients.site import federation_identities
        from simulation.partition import partition_identities
        cfg, data, num_clients, source = run_settings(args)
        fed = federation_identities(data, cfg.eval_fold, cfg.preset(), cfg.max_identities)
        parts = partition_identities({k: len(v) for k, v in fed.items()}, num_clients,
                                     scheme=cfg.partition_scheme, seed=cfg.partition_seed)
        ks = range(num_clients) if args.all_clients else [args.client]
        if not args.all_clients and args.client is None:
            raise SystemExit("error: --run needs --client K or --all-clients")
        clients = [(f"client-{k}", parts[k]) for k in ks]
        every = {n for part in parts for n in part}
        return data, clients, _identities(data), f"run {args.run} ({source})", every
    if not args.data:
        raise SystemExit("error: pass --data LFW_ROOT (or --run DIR)")
    root = Path(args.data)
    ids = _identities(root)
    client = _pick(list(ids), args.client_identities, args.seed)
    return (root, [("client", client)], ids, f"{args.client_identities} identities of {root}",
            set(client))


def _frontend(args):
    import torch

    from minusface.frontend import MinusFaceFrontend
    from minusface.weights import load_generator
    path = args.weights or (str(Path(args.run) / "final" / "generator.pt") if args.run else None)
    if path:
        g = load_generator(path)
        return MinusFaceFrontend(generator=g), f"{path} (w = {g.width})"
    torch.manual_seed(args.seed)
    print("WARNING: no --weights: using a FRESHLY INITIALISED generator; the numbers do not "
          "describe a trained MinusFace", file=sys.stderr)
    return MinusFaceFrontend(width=args.width), f"untrained generator (w = {args.width})"


def run_recognizer(args):
    """(stage-2 recognizer f_p, description) from --fp or --run, or (None, "") when none."""
    path = Path(args.fp) if getattr(args, "fp", None) else (
        Path(args.run) / "final" / "models.pt" if args.run else None)
    if path is None:
        return None, ""
    if not path.is_file():
        if getattr(args, "fp", None):
            raise SystemExit(f"error: --fp {path}: file not found")
        return None, ""
    import torch

    from minusface.backbones import build_backbone
    from minusface.presets import Preset, get_preset
    from task.wire import unflatten
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ck, dict) and ck.get("recipe") == "stage2" and "models" in ck:
        preset = get_preset(str(ck.get("preset", "tiny")))
        state = ck["models"]["recognizer"]
        what = f"stage-2 recognizer f_p of trainer checkpoint {path} (preset {preset.name!r})"
    elif isinstance(ck, dict) and ck.get("stage2"):
        fields = ck.get("preset-fields")         # the run's preset with its overrides
        preset = Preset(**fields) if fields else get_preset(str(ck.get("preset", "tiny")))
        state = unflatten(ck["stage2"], "recognizer")
        what = f"the run's final stage-2 recognizer f_p ({path})"
    elif getattr(args, "fp", None):
        raise SystemExit(f"error: --fp {path}: neither a run's models.pt with stage-2 weights "
                         f"nor a minusface.trainer stage2 checkpoint")
    else:
        return None, ""
    net = build_backbone(preset.backbone, 3, width=preset.backbone_width)
    net.load_state_dict(state)
    return net.eval(), what


# --------------------------------------------------------------------------- command

def run_cli(args: argparse.Namespace) -> int:
    from minusface.presets import get_preset
    from privacy.attacks import judge_embed_fn
    from privacy.judge import load_judge, train_judge
    from privacy.report import (
        evaluate_client,
        get_privacy_config,
        privacy_preset_for,
        write_report,
        write_seed_summary,
        write_summary,
    )
    from task.config import run_config

    try:
        config = get_privacy_config(args.preset or privacy_preset_for(run_config({}).preset_name))
    except ValueError as exc:
        raise SystemExit(f"error: --preset: {exc}") from None
    if args.attacker_seeds < 1:
        raise SystemExit(f"error: --attacker-seeds: expected an integer >= 1, got "
                         f"{args.attacker_seeds}")
    if args.judge and not args.judge_disjoint:
        raise SystemExit("error: --judge CKPT: a trainer checkpoint does not record which "
                         "identities it was trained on; pass --judge-disjoint to assert it saw "
                         "none of the evaluated clients' identities (a run's baseline "
                         "recognizer trained on the clients does not qualify), or leave out "
                         "--judge to train one on disjoint identities")
    overrides = {k: v for k, v in (("gi_images", args.gi_images), ("gi_steps", args.gi_steps))
                 if v is not None}
    config = config.with_(**overrides)
    out = Path(args.out)
    progress = not args.quiet
    frontend, g_info = _frontend(args)
    root, clients, ids, source, judge_exclude = _client_sets(args)
    print(f"generator: {g_info}\nclients: {source}")
    gi_net, gi_info = run_recognizer(args)
    cap = get_preset(config.judge_preset).max_images_per_identity
    all_ids = _identities(root, min_images=1)       # the attacker uses single-image people too

    if args.judge:
        judge = load_judge(args.judge)
        judge_info = (f"checkpoint {args.judge}; the caller asserts (--judge-disjoint) that it "
                      f"saw none of the evaluated identities")
    else:
        judge_ids = _pick(list(ids), args.judge_identities, args.seed + 2, exclude=judge_exclude)
        if len(judge_ids) < 2:
            raise SystemExit("error: fewer than 2 identities outside the clients to train the "
                             "judge on")
        j_img, j_lab, _ = _load(ids, judge_ids, cap)
        print(f"training the judge ({config.judge_preset} preset, {config.judge_epochs} "
              f"epoch(s)) on {len(judge_ids)} identities disjoint from every client")
        judge = train_judge(j_img, j_lab, config, out / "judge", args.seed, progress)
        judge_info = (f"trained here: unprotected {config.judge_preset} baseline recognizer, "
                      f"{config.judge_epochs} epoch(s) on {len(j_lab)} images of "
                      f"{len(judge_ids)} identities disjoint from every client"
                      + (" of the run" if args.run else "") + f"; weights in {out / 'judge'}")
        del j_img
    results = {}
    for name, client_ids in clients:
        aux_ids = _pick_images(all_ids, args.aux_identities, config.aux_images, args.seed + 1,
                               exclude=set(client_ids))
        c_img, c_lab, _ = _load(ids, client_ids, cap)
        a_img, _, _ = _load(all_ids, aux_ids, cap)
        client_dir = out / name if len(clients) > 1 else out
        by_seed = {}
        for k in range(args.attacker_seeds):
            result = evaluate_client(frontend, c_img, c_lab, a_img, judge_embed_fn(judge), config,
                                     seed=args.seed, attacker_seed=args.seed + k,
                                     progress=progress, client_identities=client_ids,
                                     aux_identities=aux_ids, judge_info=judge_info,
                                     client_name=name, gi_recognizer=gi_net,
                                     gi_recognizer_info=gi_info, judge_model=judge)
            result["generator"] = g_info
            result["source"] = source
            seed_dir = client_dir / f"seed-{args.seed + k}" if args.attacker_seeds > 1 else client_dir
            report = write_report(result, seed_dir)
            by_seed[args.seed + k] = result
            print(f"{name}: report {report.resolve()}")
            print(f"  gate: {result['pixel_gate']['reason']}\n  judge: "
                  f"{result['judge_gate']['reason']}")
        if args.attacker_seeds > 1:
            print(f"{name}: {args.attacker_seeds} attacker seeds: "
                  f"{write_seed_summary(by_seed, client_dir).resolve()}")
        results[name] = by_seed[args.seed]
    if len(results) > 1:
        print(f"summary: {write_summary(results, out).resolve()}")
    return 0
