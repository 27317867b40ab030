"""A real Flower 1.42 deployment on this machine: TLS SuperLink, authenticated SuperNodes.

`deploy_local()` rehearses on loopback exactly what a multi-site federation runs (docs/flower.md,
"Deployment: SuperLink and SuperNodes"): it writes a CA, a SuperLink certificate (SANs
localhost/127.0.0.1/::1) and one authentication key pair per SuperNode under `OUT/keys`, starts

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
        --enable-supernode-auth --host 127.0.0.1 --port P --database OUT/state.db
        --disable-runtime-dependency-installation

(as `python -m federation.deploy.superlink ...`: the same command with Flower's 5 s SQLite busy
timeout raised, so a CPU-starved loopback rehearsal does not fail on "database is locked", and
the Control/Runtime APIs answering loopback only),
writes a private `FLWR_HOME` (`OUT/flwr-home/config.toml`) whose connection trusts `ca.crt`,
registers every SuperNode's public key with `flwr supernode register` *before* starting the
SuperNodes (each `python -m federation.deploy.supernode --pinned-app DIGEST --root-certificates
ca.crt --auth-supernode-private-key KEY --superlink 127.0.0.1:P --port FREE --node-config
'partition-id=i num-partitions=N'`: `flower-supernode` that runs only the app whose digest was
computed from `app_dir` before anything started, docs/deploy-security.md), submits the app
with `flwr run`, follows `flwr log --stream` and reads the final status with `flwr ls` (`flwr run
--stream` exits 0 even when the ServerApp fails).  Every process is started in its own process
group and stopped by PID in a `finally` block (SuperNodes spawn flower-superexec and
flwr-clientapp children; the SuperLink spawns flower-superexec).

Layout of OUT: keys/ (0700 dir, private keys 0600), logs/{superlink,supernode-i,run}.log,
flwr-home/, state.db (recreated on every call), run/ (the app's out-dir unless run_config sets one).

`commands_for_sites()` prints the same deployment for separate hosts.
"""

from __future__ import annotations

import json
import os
import shlex
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from simulation.launch import ROOT, config_arg, flwr_bin, flwr_env, free_port, run_status, stop, submit_run

from .app_digest import AppDigestError, app_digest
from .keys import make_ca_and_server_cert, make_node_keys
from .superlink import CONTROL_FROM_FLAG, ENV_BUSY_TIMEOUT
from .supernode import PIN_FLAG, REFUSAL_LOG

CONNECTION = "minusfed-local"
NODE_KEY_PREFIX = "supernode"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
BANNER = "!" * 78
COMPLETED = "finished:completed"


@dataclass
class DeployResult:
    status: str                      # `flwr ls` status, e.g. finished:completed / finished:failed
    run_id: int | None
    seconds: float                   # wall time from first process start to final status
    log: str = field(repr=False)     # `flwr log --stream` output
    details: str = ""                # `flwr ls` status-details, or why the deployment aborted
    out_dir: Path | None = None
    pids: list[int] = field(default_factory=list, repr=False)  # process-group leaders started
    app_digest: str = ""             # the app the SuperNodes were pinned to

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED


class DeployError(RuntimeError):
    """A step before or around the run failed (SuperLink start, key registration, submission)."""


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_healthy_tls(url: str, proc: subprocess.Popen, timeout: float,
                     cafile: Path | None = None) -> None:
    """Poll the SuperLink's /health (HTTPS verified against `cafile`, or plain HTTP)."""
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"SuperLink exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"SuperLink not healthy at {url} after {timeout:.0f} s")


def _popen(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([flwr_bin("flwr"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def site_thread_env(env: Mapping[str, str], nodes: int) -> dict[str, str]:
    """All sites share this machine's cores: give each SuperNode (and the ClientApps it spawns)
    an equal share of threads, so N PyTorch trainers do not each start one thread per core and
    starve the SuperLink.  A thread count the user already set is kept."""
    out = dict(env)
    if "OMP_NUM_THREADS" not in out:
        out["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, nodes)))
    return out


def superlink_command(keys: Path | None, port: int, database: Path | None,
                      host: str = "127.0.0.1", auth: bool = True,
                      control_from: Sequence[str] = ()) -> list[str]:
    """`flower-superlink` argv (through `federation.deploy.superlink`, which raises Flower's 5 s
    SQLite busy timeout and serves Control/Runtime only to `control_from`, default loopback):
    TLS (+ node auth) with `keys`, `--insecure` when keys is None; database None: Flower's
    in-memory state (no `--database`)."""
    cmd = [sys.executable, "-m", "federation.deploy.superlink"]
    if keys is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(keys / "ca.crt"), "--ssl-certfile", str(keys / "server.pem"),
                "--ssl-keyfile", str(keys / "server.key")]
        if auth:
            cmd.append("--enable-supernode-auth")
    cmd += ["--host", host, "--port", str(port)]
    if database is not None:
        cmd += ["--database", str(database)]
    for network in control_from:
        cmd += [CONTROL_FROM_FLAG, network]
    return cmd + ["--disable-runtime-dependency-installation"]


def supernode_command(superlink: str, port: int, node_config: Mapping[str, object], *,
                      ca_cert: Path | None = None, private_key: Path | None = None,
                      insecure: bool = False, pinned_apps: Sequence[str] = ()) -> list[str]:
    """`flower-supernode` argv; `ca_cert`/`private_key` omitted when None (tests use that).
    With `pinned_apps` (app digests) it is `python -m federation.deploy.supernode`, which
    refuses to run any other app; without, plain `flower-supernode` runs whatever it is sent."""
    cmd = [flwr_bin("flower-supernode")]
    if pinned_apps:
        cmd = [sys.executable, "-m", "federation.deploy.supernode"]
        for digest in pinned_apps:
            cmd += [PIN_FLAG, digest]
    if insecure:
        cmd.append("--insecure")
    if ca_cert is not None:
        cmd += ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    cmd += ["--superlink", superlink, "--port", str(port)]
    if node_config:
        cmd += ["--node-config", config_arg(node_config)]
    return cmd


def write_connection(flwr_home: Path, env: dict[str, str], address: str,
                     ca_cert: Path | None, name: str = CONNECTION) -> None:
    """Create `$FLWR_HOME/config.toml` (via `flwr config list`) and append a connection."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    _cli(["config", "list"], env, timeout=60)
    trust = (f"root-certificates = {json.dumps(str(Path(ca_cert).resolve()))}\n" if ca_cert
             else "insecure = true\n")
    with open(flwr_home / "config.toml", "a", encoding="utf-8") as f:
        f.write(f"\n[superlink.{name}]\naddress = {json.dumps(address)}\n{trust}")


def register_node(public_key: Path, env: dict[str, str], connection: str = CONNECTION) -> int:
    """`flwr supernode register PUB CONN`; returns the node id the SuperLink assigned."""
    r = _cli(["supernode", "register", str(public_key), connection, "--format", "json"], env)
    try:
        reply = json.loads(r.stdout)
        if reply.get("success"):
            return int(reply["node-id"])
    except (ValueError, KeyError, TypeError):
        pass
    raise DeployError(f"flwr supernode register {public_key} failed (exit {r.returncode}):\n"
                      f"{r.stdout}\n{r.stderr}")


def _prepare_keys(keys: Path, nodes: int) -> None:
    """Reuse a complete key set from an earlier call, else (re)create CA, server cert and keys."""
    tls = [keys / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")]
    if not all(p.exists() for p in tls):
        make_ca_and_server_cert(keys, LOCAL_HOSTS, overwrite=True)
    node_files = [keys / f"{NODE_KEY_PREFIX}-{i}{s}" for i in range(nodes) for s in ("", ".pub")]
    if not all(p.exists() for p in node_files):
        make_node_keys(keys, nodes, NODE_KEY_PREFIX, overwrite=True)


def _pinned_digest(app_dir: Path) -> str:
    """The digest of the app `flwr run` is about to build from `app_dir` (DeployError if none)."""
    try:
        return app_digest(app_dir)
    except AppDigestError as e:
        raise DeployError(f"cannot pin the app: {e}") from None


def _refusals(app_dir: Path, digest: str, logs: Sequence[Path]) -> str:
    """Why a pinned SuperNode refused the run, for a failed run's details ('' if none did)."""
    refused = [str(p) for p in logs if REFUSAL_LOG in _tail(p, 100_000)]
    if not refused:
        return ""
    try:
        now = app_digest(app_dir)
    except AppDigestError:
        now = "unknown"
    changed = (f"; {app_dir} changed after it was pinned ({digest} -> {now})"
               if now != digest else "")
    return f"SuperNodes refused the run's app as unpinned (see {', '.join(refused)}){changed}"


def _alive_check(supernodes: Sequence[subprocess.Popen], logs: Sequence[Path]) -> str:
    for i, (p, log_path) in enumerate(zip(supernodes, logs)):
        if p.poll() is not None:
            return (f"SuperNode {i} exited with code {p.returncode} before the run finished; "
                    f"last lines of {log_path}:\n{_tail(log_path, 12)}")
    return ""


def deploy_local(out_dir: str | os.PathLike, nodes: int = 3,
                 run_config: Mapping[str, object] | None = None, insecure: bool = False,
                 node_configs: Sequence[Mapping[str, object]] | None = None,
                 timeout: float = 1800.0, *, app_dir: Path = ROOT,
                 in_memory_state: bool = False, echo: bool = False) -> DeployResult:
    """Deploy the app with one SuperLink and `nodes` SuperNodes on loopback; run it once.

    run_config: `flwr run --run-config` overrides; `min-nodes` defaults to `nodes` and `out-dir` to
    OUT/run.  node_configs[i] is merged over SuperNode i's `partition-id=i num-partitions=N` (e.g.
    {"data-path": "/site/faces"}).  insecure=True: plain HTTP and no node authentication (a loud
    warning; loopback development only).  timeout bounds the run itself (then `flwr stop`).
    A SuperNode that dies mid-run stops the run.  in_memory_state=True starts the SuperLink
    without `--database` (Flower's in-memory SQLite: no state.db; its one shared connection never
    sees "database is locked").  The file database runs with a 120 s busy timeout instead of
    Flower's 5 s (federation/deploy/superlink.py).
    Every SuperNode runs only the app built from `app_dir` (its content digest, computed before
    any process starts, is pinned); `result.app_digest` is that digest.
    Always stops every process it started."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if node_configs is not None and len(node_configs) != nodes:
        raise ValueError(f"node_configs has {len(node_configs)} entries for {nodes} nodes")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs_dir, home = out / "logs", out / "flwr-home"
    logs_dir.mkdir(exist_ok=True)
    database = out / "state.db"
    for suffix in ("", "-wal", "-shm", "-journal"):   # registered keys from a previous call
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    cfg = {"min-nodes": nodes, "out-dir": str(out / "run"), **dict(run_config or {})}

    keys: Path | None = None
    if insecure:
        print(f"{BANNER}\nWARNING: INSECURE deployment: plain HTTP, NO TLS and NO SuperNode "
              f"authentication.\nAnyone who reaches the port can join the federation or read "
              f"its traffic.\nUse only on loopback for development.\n{BANNER}", file=sys.stderr)
    else:
        keys = out / "keys"
        _prepare_keys(keys, nodes)
    ca_cert = keys / "ca.crt" if keys else None
    digest = _pinned_digest(Path(app_dir))

    env = flwr_env(home)
    port = free_port()
    address = f"127.0.0.1:{port}"
    started: list[subprocess.Popen] = []
    supernodes: list[subprocess.Popen] = []
    sn_logs = [logs_dir / f"supernode-{i}.log" for i in range(nodes)]
    sl_log = logs_dir / "superlink.log"
    run_id: int | None = None
    lines: list[str] = []
    run_log = None
    t0 = time.perf_counter()
    try:
        superlink = _popen(superlink_command(keys, port, None if in_memory_state else database),
                           env, sl_log, app_dir)
        started.append(superlink)
        scheme = "http" if insecure else "https"
        try:
            wait_healthy_tls(f"{scheme}://{address}/health", superlink, 120, ca_cert)
        except DeployError as e:
            raise DeployError(f"{e}\n{_tail(sl_log)}") from None
        write_connection(home, env, address, ca_cert)
        if not insecure:
            for i in range(nodes):                 # BEFORE the SuperNodes start
                register_node(keys / f"{NODE_KEY_PREFIX}-{i}.pub", env)

        node_env = site_thread_env(env, nodes)
        for i in range(nodes):
            node_cfg = {"partition-id": i, "num-partitions": nodes,
                        **(dict(node_configs[i]) if node_configs else {})}
            cmd = supernode_command(
                address, free_port(), node_cfg, ca_cert=ca_cert, insecure=insecure,
                private_key=None if insecure else keys / f"{NODE_KEY_PREFIX}-{i}",
                pinned_apps=[digest])
            p = _popen(cmd, node_env, sn_logs[i], app_dir)
            started.append(p)
            supernodes.append(p)

        run_id = submit_run(app_dir, CONNECTION, env, cfg, error=DeployError)

        follower = subprocess.Popen([flwr_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
        started.append(follower)
        run_log = open(logs_dir / "run.log", "w", encoding="utf-8")  # noqa: SIM115 (closed in finally)

        def pump() -> None:
            for line in follower.stdout:           # type: ignore[union-attr]
                lines.append(line)
                run_log.write(line)
                run_log.flush()
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        abort = ""
        deadline = time.monotonic() + timeout
        while follower.poll() is None:
            abort = _alive_check(supernodes, sn_logs)
            if not abort and time.monotonic() > deadline:
                abort = f"run {run_id} did not finish within {timeout:.0f} s"
            if abort:
                _cli(["stop", str(run_id), CONNECTION], env, timeout=60)
                break
            time.sleep(0.5)
        stop(follower, timeout=5)
        reader.join(5)

        run = run_status(run_id, CONNECTION, env, error=DeployError)
        details = str(run.get("status-details", "") or "")
        if run.get("status") != COMPLETED and "database is locked" in _tail(sl_log, 100_000):
            details += ("\nSuperLink log: 'sqlite3.OperationalError: database is locked' (a writer "
                        f"waited longer than the SQLite busy timeout, ${ENV_BUSY_TIMEOUT}); "
                        "raise it, retry, or use in_memory_state")
        if run.get("status") != COMPLETED:          # the ServerApp's traceback lands here
            refusals = _refusals(Path(app_dir), digest, sn_logs)
            details += f"\n{refusals}" if refusals else ""
            details += f"\nlast lines of {sl_log}:\n{_tail(sl_log, 40)}"
        return DeployResult(status=str(run.get("status")), run_id=run_id,
                            seconds=time.perf_counter() - t0, log="".join(lines),
                            details=f"{abort}\n{details}".strip() if abort else details,
                            out_dir=out, pids=[p.pid for p in started], app_digest=digest)
    finally:
        for p in reversed(started):               # follower, SuperNodes, then the SuperLink
            stop(p)
        if run_log is not None:
            run_log.close()


def commands_for_sites(nodes: int = 3, *, host: str = "superlink.example.org", port: int = 8000,
                       keys_dir: str = "certs", connection: str = "minusfed",
                       run_config: Mapping[str, object] | None = None, app: str = ".",
                       data_path: str = "/path/to/site/faces", app_digest: str | None = None) -> str:
    """The commands a user runs for the same deployment on separate hosts (TLS + node auth,
    Control API on the SuperLink host only, every SuperNode pinned to the app's digest)."""
    k = keys_dir.rstrip("/")
    q = shlex.quote
    run_cfg = f" --run-config {q(config_arg(run_config))}" if run_config else ""
    site_cfg = q(f"data-path={json.dumps(data_path)}")
    pin = q(app_digest) if app_digest else '"$APP_DIGEST"'
    out = [
        "# 0. Operator, once: keys (SANs: the name the sites use AND 127.0.0.1 for the operator's "
        "flwr),",
        f"minusfed deploy certs {q(k)} --hosts {q(host)} localhost 127.0.0.1",
        f"minusfed deploy node-keys {q(k)} --n {nodes}",
        "#    and the digest of the release every site will run (sites recompute and compare it):",
        f"minusfed deploy app-digest {q(app)}",
        "",
        f"# 1. SuperLink host ({host}; open TCP {port} to the sites: they get only the Fleet API",
        f"#    and /health; Control and Runtime answer only {CONTROL_FROM_FLAG} networks, "
        "default this host):",
        shlex.join([
            "python", "-m", "federation.deploy.superlink", "--ssl-ca-certfile", f"{k}/ca.crt",
            "--ssl-certfile", f"{k}/server.pem", "--ssl-keyfile", f"{k}/server.key",
            "--enable-supernode-auth", "--host", "0.0.0.0", "--port", str(port),
            "--database", "state.db", "--disable-runtime-dependency-installation",
            CONTROL_FROM_FLAG, "127.0.0.1"]),
        f"#    (flower-superlink with Flower's 5 s SQLite busy timeout raised to "
        f"${ENV_BUSY_TIMEOUT}, default 120 s,",
        "#    and a 403 for Control/Runtime requests from elsewhere: docs/deploy-security.md)",
        "",
        f"# 2. Operator, ON THE SUPERLINK HOST (or through `ssh -N -L {port}:127.0.0.1:{port} "
        f"{host}`):",
        "#    add to $FLWR_HOME/config.toml (absolute path to ca.crt)",
        f"#    [superlink.{connection}]",
        f'#    address = "127.0.0.1:{port}"',
        f'#    root-certificates = "/abs/path/{k}/ca.crt"',
        "#    then register every site's PUBLIC key before its SuperNode starts:",
    ]
    out += [f"flwr supernode register {q(f'{k}/{NODE_KEY_PREFIX}-{i}.pub')} {q(connection)}"
            for i in range(nodes)]
    out += ["", "# 3. Site hosts: each gets ca.crt and ONLY its own private key (never ca.key),",
            "#    installs the same minusfed release and pins it: only that app ever runs there",
            "#    (or --pinned-apps FILE: one digest per line). Check it equals the operator's:"]
    if not app_digest:
        out.append("APP_DIGEST=$(minusfed deploy app-digest /path/to/the/minusfed/release)")
    for i in range(nodes):
        out.append(f"#    site {i}:")
        out.append(f"python -m federation.deploy.supernode {PIN_FLAG} {pin} --root-certificates "
                   f"ca.crt --auth-supernode-private-key {NODE_KEY_PREFIX}-{i} --superlink "
                   f"{host}:{port} --port 9094 --node-config {site_cfg}")
    out += ["", "# 4. Operator, on the SuperLink host: submit and follow the run",
            f"flwr run {q(app)} {q(connection)}{run_cfg} --stream",
            f"flwr ls {q(connection)}   # finished:completed = success (flwr run exits 0 on failure)"]
    return "\n".join(out) + "\n"
