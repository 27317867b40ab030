"""`minusfed deploy ...`: TLS certificates, SuperNode keys, app digests and a local deployment.

    minusfed deploy certs OUT [--hosts H ...] [--days D] [--overwrite]
    minusfed deploy node-keys OUT --n N [--prefix P] [--overwrite]
    minusfed deploy local --nodes N --out DIR [--run-config "k=v ..."] [--insecure]
                          [--timeout S] [--in-memory-state]
    minusfed deploy app-digest [APP_DIR | FILE.fab]     (the digest sites pin, on stdout)

Wire it with `add_parser(subparsers)`; each subcommand sets `func(args) -> exit code`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from .app_digest import AppDigestError, app_digest
from .keys import make_ca_and_server_cert, make_node_keys
from .local import commands_for_sites, deploy_local
from .plan import SITE_PORT_BASE, write_plan

# flwr.common.config.parse_config_args: key=value pairs, values TOML-typed (strings quoted)
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_run_config(entries: list[str] | None) -> dict[str, Any]:
    """Parse `--run-config` strings the way `flwr run` does: 'k=v k2="s"' (or one .toml file)."""
    if not entries:
        return {}
    if len(entries) == 1 and entries[0].endswith(".toml"):
        with Path(entries[0]).expanduser().open("rb") as f:
            return tomllib.load(f)
    config: dict[str, Any] = {}
    for line in entries:
        if not line:
            continue
        if line.endswith(".toml"):
            raise ValueError("a TOML file cannot be passed alongside key=value pairs")
        matches = _PAIR.findall(line)
        if not matches and line.strip():
            raise ValueError(f"no key=value pairs in run config {line!r}")
        try:
            config.update(tomllib.loads("\n".join(f"{k} = {v}" for k, v in matches)))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"invalid run config {line!r} (values must be TOML: "
                             f"key1=123 key2=false key3=\"string\"): {e}") from None
    return config


def _cmd_certs(args: argparse.Namespace) -> int:
    try:
        paths = make_ca_and_server_cert(args.out, args.hosts, days=args.days,
                                        overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"SANs: {', '.join(args.hosts)}; keep ca.key offline, give sites only ca.crt")
    return 0


def _cmd_node_keys(args: argparse.Namespace) -> int:
    try:
        pairs = make_node_keys(args.out, args.n, prefix=args.prefix, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for priv, pub in pairs:
        print(f"{priv} (private, to its site only)  {pub} (register: flwr supernode register)")
    return 0


def _cmd_local(args: argparse.Namespace) -> int:
    try:
        run_config = parse_run_config(args.run_config)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.nodes < 1:
        print("error: --nodes must be >= 1", file=sys.stderr)
        return 2
    print("# The same deployment on separate hosts:\n")
    print(commands_for_sites(args.nodes, run_config=run_config))
    print(f"# Now running it locally: 1 SuperLink + {args.nodes} SuperNodes in {args.out}"
          f"{' (INSECURE)' if args.insecure else ' (TLS + SuperNode authentication)'}\n",
          flush=True)
    try:
        result = deploy_local(args.out, nodes=args.nodes, run_config=run_config,
                              insecure=args.insecure, timeout=args.timeout,
                              in_memory_state=args.in_memory_state, echo=True)
    except Exception as e:                                    # noqa: BLE001  report, exit 1
        print(f"error: {e}", file=sys.stderr)
        print("status: failed")
        return 1
    print(f"run {result.run_id}: {result.status} ({result.seconds:.1f} s)"
          f"{': ' + result.details if result.details not in ('', 'N/A') else ''}")
    print(f"status: {'completed' if result.completed else 'failed'}")
    return 0 if result.completed else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    try:
        run_config = parse_run_config(args.run_config)
        made = write_plan(args.out, args.sites, args.host, args.port, args.app, run_config,
                          args.site_port_base)
    except (OSError, ValueError, AppDigestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = made["out"]
    print(f"wrote the deployment for {args.sites} site(s) to {out}:")
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"  {f.relative_to(out)}")
    print(f"who gets what: {out / 'HOSTS.md'}")
    return 0


def _cmd_app_digest(args: argparse.Namespace) -> int:
    try:
        digest = app_digest(Path(args.app))
    except AppDigestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(digest)
    print(f"# {args.app}: pin it at each site with `python -m federation.deploy.supernode "
          f"--pinned-app {digest} ...`", file=sys.stderr)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `deploy` (with certs / node-keys / local) on an argparse subparsers object."""
    deploy = subparsers.add_parser(
        "deploy", help="certificates, SuperNode keys and a local TLS + auth deployment",
        description=__doc__.splitlines()[0])
    sub = deploy.add_subparsers(dest="deploy_command", required=True)

    p = sub.add_parser("certs", help="CA + SuperLink certificate (ca.crt, server.pem, ...)")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1", "::1"],
                   help="SANs: every DNS name / IP the SuperNodes and CLI use for the SuperLink")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_certs)

    p = sub.add_parser("node-keys", help="SuperNode authentication key pairs (OpenSSH EC)")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--n", type=int, required=True, help="number of SuperNodes")
    p.add_argument("--prefix", default="supernode")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_node_keys)

    p = sub.add_parser("local", help="run the app once on a local TLS + auth deployment")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="keys, logs, state.db and (by default) the run's out-dir")
    p.add_argument("--run-config", action="append", metavar='"k=v ..."',
                   help="run config overrides as for flwr run (TOML-typed values)")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP, no node authentication (development only)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the run")
    p.add_argument("--in-memory-state", action="store_true",
                   help="SuperLink state in memory instead of DIR/state.db (avoids SQLite "
                        "'database is locked' errors on an overloaded machine)")
    p.set_defaults(func=_cmd_local)

    p = sub.add_parser("plan", help="write every file and script an operator hands out "
                       "(certificates, keys, digest, flwr connection, per-host scripts)")
    p.add_argument("out", metavar="OUT", help="a new or empty folder")
    p.add_argument("--sites", type=int, required=True)
    p.add_argument("--host", required=True, help="the SuperLink's name or IP as the sites see it")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--app", default=".", help="the minusfed release (app folder) to pin and run")
    p.add_argument("--site-port-base", type=int, default=SITE_PORT_BASE,
                   help="site i's local ClientApp port is this + i")
    p.add_argument("--run-config", action="append", metavar='"k=v ..."',
                   help="run config for run.sh (min-nodes defaults to --sites)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("app-digest", help="the content digest a site pins (only that app runs)",
                       description="Build the app's FAB in memory the way `flwr run` does (or "
                                   "read a .fab file) and print its content digest.")
    p.add_argument("app", nargs="?", default=".", metavar="APP_DIR|FILE.fab")
    p.set_defaults(func=_cmd_app_digest)
    return deploy
