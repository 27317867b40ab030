"""`minusfed deploy plan OUT`: every file an operator hands out for a deployment on separate hosts.

It writes, under OUT (nothing existing is overwritten):

  certs/ca.crt, certs/ca.key             the private CA (ca.key stays with the operator, offline)
  certs/server.pem, certs/server.key     the SuperLink certificate (SANs: --host, localhost,
                                         127.0.0.1) -> the SuperLink host
  certs/supernode-<i>, .pub              site i's authentication key pair -> site i only
  app-digest.txt                         the digest of the release every site pins
  flwr-home/config.toml                  the operator's Flower connection "minusfed" (TLS,
                                         address 127.0.0.1:PORT: flwr runs on the SuperLink host)
  superlink.sh                           SuperLink host: the hardened SuperLink
  register.sh                            SuperLink host: register every site's public key
  site-<i>.sh                            site i: its pinned SuperNode (SITE_DATA = its faces)
  run.sh                                 SuperLink host: submit, follow, print the final status
  HOSTS.md                               which file goes to which host

Every script changes to its own folder first, so the folder can be copied as it is; each host
needs minusfed and its dependencies installed (`python` and `flwr` on PATH, or $PYTHON /
$FLWR).  The commands are those of `commands_for_sites` (README "Deploy across sites");
`tests/test_deploy_rehearsal.py` runs these scripts on loopback.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path

from simulation.launch import config_arg

from .app_digest import app_digest
from .keys import make_ca_and_server_cert, make_node_keys
from .local import NODE_KEY_PREFIX
from .superlink import CONTROL_FROM_FLAG
from .supernode import PIN_FLAG

CONNECTION = "minusfed"
SITE_PORT_BASE = 9094
HEADER = '#!/usr/bin/env bash\nset -euo pipefail\ncd "$(dirname "$0")"\n'
FLWR_HOME = 'export FLWR_HOME="${FLWR_HOME:-$PWD/flwr-home}"\n'


def _script(path: Path, body: str) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; not replaced")
    path.write_text(HEADER + body, encoding="utf-8")
    os.chmod(path, 0o755)


def write_plan(out: str | os.PathLike, sites: int, host: str, port: int = 8000,
               app: str | os.PathLike = ".", run_config: Mapping[str, object] | None = None,
               site_port_base: int = SITE_PORT_BASE) -> dict[str, Path]:
    """Write the files above; returns name -> path."""
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    certs = out / "certs"
    hosts = list(dict.fromkeys([host, "localhost", "127.0.0.1"]))
    made = make_ca_and_server_cert(certs, hosts)
    make_node_keys(certs, sites, prefix=NODE_KEY_PREFIX)
    digest = app_digest(Path(app))
    (out / "app-digest.txt").write_text(digest + "\n", encoding="utf-8")
    home = out / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = '
        f'{json.dumps(str(certs / "ca.crt"))}\n', encoding="utf-8")
    q = shlex.quote
    py = '"${PYTHON:-python}"'
    flwr = '"${FLWR:-flwr}"'
    _script(out / "superlink.sh", (
        f"exec {py} -m federation.deploy.superlink --ssl-ca-certfile certs/ca.crt "
        "--ssl-certfile certs/server.pem --ssl-keyfile certs/server.key --enable-supernode-auth "
        f"--host 0.0.0.0 --port {port} --database state.db "
        f"--disable-runtime-dependency-installation {CONTROL_FROM_FLAG} 127.0.0.1\n"))
    _script(out / "register.sh", FLWR_HOME + "".join(
        f"{flwr} supernode register certs/{NODE_KEY_PREFIX}-{i}.pub {CONNECTION}\n"
        for i in range(sites)))
    for i in range(sites):
        _script(out / f"site-{i}.sh", (
            ': "${SITE_DATA:?set SITE_DATA to the folder-per-identity faces of this site}"\n'
            f'SITE_NAME="${{SITE_NAME:-site-{i}}}"\n'
            f"exec {py} -m federation.deploy.supernode {PIN_FLAG} {digest} "
            f"--root-certificates certs/ca.crt --auth-supernode-private-key "
            f"certs/{NODE_KEY_PREFIX}-{i} --superlink {q(f'{host}:{port}')} "
            f"--port {site_port_base + i} "
            f'--node-config "data-path=\\"$SITE_DATA\\" partition-id={i} '
            f'site-name=\\"$SITE_NAME\\""\n'))
    cfg = {"min-nodes": sites, **dict(run_config or {})}
    _script(out / "run.sh", FLWR_HOME + (
        f"{flwr} run {q(str(Path(app).resolve()))} {CONNECTION} --stream "
        f"-c {q(config_arg(cfg))} \"$@\"\n"
        f"{flwr} ls {CONNECTION} --format json\n"))
    (out / "HOSTS.md").write_text(_hosts(sites, host, port), encoding="utf-8")
    return {"out": out, **made, "digest": out / "app-digest.txt"}


def _hosts(sites: int, host: str, port: int) -> str:
    lines = [f"# Who gets what (SuperLink {host}:{port})", "",
             "- **Operator, offline:** `certs/ca.key` (signs certificates; never copy it).",
             "- **SuperLink host:** `certs/ca.crt`, `certs/server.pem`, `certs/server.key`, "
             "`certs/supernode-*.pub`, `superlink.sh`, `register.sh`, `run.sh`, `flwr-home/`. "
             f"Open TCP {port} to the sites; start `superlink.sh`, then `register.sh` (before "
             "any site starts), then `run.sh` once every site runs.",
             ]
    for i in range(sites):
        lines.append(f"- **Site {i}:** `certs/ca.crt`, `certs/{NODE_KEY_PREFIX}-{i}` (its private "
                     f"key only), `site-{i}.sh`; run `SITE_DATA=/path/to/faces "
                     f"SITE_NAME=name ./site-{i}.sh`.")
    lines += ["", "Every host installs the same minusfed release (the sites pin its digest, "
              "`app-digest.txt`: any other app is refused). `run.sh` prints the final status as "
              'JSON: `"status": "finished:completed"` is success.', ""]
    return "\n".join(lines)
