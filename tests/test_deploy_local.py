"""Local deployment: TLS + SuperNode authentication end to end (slow), refusal of an unregistered
SuperNode key and of a SuperNode without the CA (slow), CLI parsing and site commands (fast).

Every process a test starts runs in its own process group and is stopped by PID; each test has a
private FLWR_HOME and free loopback ports."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from federation.deploy import cli as deploy_cli
from federation.deploy.local import (
    CONNECTION,
    commands_for_sites,
    register_node,
    superlink_command,
    supernode_command,
    wait_healthy_tls,
    write_connection,
)
from tests.run_outcome import assert_honest_replies_accepted, assert_stage1_weights_moved

REFUSAL_TIMEOUT = 90.0   # a SuperNode start-up takes ~5-12 s on a busy 2-core machine


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minusfed")
    deploy_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _group_gone(pgid: int, wait: float = 10.0) -> bool:
    """True once no process of group `pgid` is left (children may take a moment to exit)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


# ---------------------------------------------------------------- fast: CLI and site commands

def test_parse_run_config_is_toml_typed_like_flwr():
    cfg = deploy_cli.parse_run_config(
        ['preset="tiny" stage1-rounds=1 fraction-train=0.5 data-path="/a b/c"',
         "use-dp=false max-identities=9"])
    assert cfg == {"preset": "tiny", "stage1-rounds": 1, "fraction-train": 0.5,
                   "data-path": "/a b/c", "use-dp": False, "max-identities": 9}
    assert isinstance(cfg["stage1-rounds"], int) and isinstance(cfg["fraction-train"], float)
    assert deploy_cli.parse_run_config(None) == {} and deploy_cli.parse_run_config([""]) == {}
    with pytest.raises(ValueError):
        deploy_cli.parse_run_config(["preset=tiny"])        # unquoted string: invalid TOML
    with pytest.raises(ValueError):
        deploy_cli.parse_run_config(["just-words"])


def test_parse_run_config_toml_file(tmp_path):
    f = tmp_path / "cfg.toml"
    f.write_text('preset = "tiny"\nstage2-rounds = 2\n')
    assert deploy_cli.parse_run_config([str(f)]) == {"preset": "tiny", "stage2-rounds": 2}


def test_cli_subcommands_parse():
    p = _parser()
    a = p.parse_args(["deploy", "local", "--nodes", "3", "--out", "/tmp/x",
                      "--run-config", 'preset="tiny" stage1-rounds=1', "--insecure"])
    assert (a.command, a.deploy_command, a.nodes, a.out, a.insecure) == \
        ("deploy", "local", 3, "/tmp/x", True)
    assert deploy_cli.parse_run_config(a.run_config) == {"preset": "tiny", "stage1-rounds": 1}
    assert a.func is deploy_cli._cmd_local
    a = p.parse_args(["deploy", "local", "--out", "d"])
    assert a.nodes == 3 and not a.insecure and a.run_config is None and not a.in_memory_state
    assert p.parse_args(["deploy", "local", "--out", "d", "--in-memory-state"]).in_memory_state
    a = p.parse_args(["deploy", "certs", "OUT", "--hosts", "sl.example.org", "10.0.0.5"])
    assert a.hosts == ["sl.example.org", "10.0.0.5"] and not a.overwrite and a.func is deploy_cli._cmd_certs
    a = p.parse_args(["deploy", "node-keys", "OUT", "--n", "4", "--overwrite"])
    assert (a.n, a.overwrite, a.prefix) == (4, True, "supernode")
    with pytest.raises(SystemExit):
        p.parse_args(["deploy", "local", "--nodes", "2"])     # --out is required
    with pytest.raises(SystemExit):
        p.parse_args(["deploy", "node-keys", "OUT"])          # --n is required
    with pytest.raises(SystemExit):
        p.parse_args(["deploy"])                              # a sub-subcommand is required


def test_cli_certs_and_node_keys_write_files(tmp_path, capsys):
    p = _parser()
    out = tmp_path / "certs"
    a = p.parse_args(["deploy", "certs", str(out), "--hosts", "localhost", "127.0.0.1"])
    assert a.func(a) == 0
    assert {f.name for f in out.iterdir()} == {"ca.crt", "ca.key", "server.pem", "server.key"}
    assert a.func(a) == 2                                    # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    a = p.parse_args(["deploy", "node-keys", str(out), "--n", "2"])
    assert a.func(a) == 0
    assert (out / "supernode-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct((out / "supernode-1").stat().st_mode & 0o777) == "0o600"


def test_cli_local_rejects_a_bad_run_config(capsys):
    p = _parser()
    a = p.parse_args(["deploy", "local", "--out", "/nonexistent/x", "--run-config", "preset=tiny"])
    assert a.func(a) == 2
    assert "invalid run config" in capsys.readouterr().err


def test_commands_for_sites_content():
    text = commands_for_sites(3, host="sl.example.org", port=8443, keys_dir="certs",
                              connection="prod", run_config={"preset": "tiny", "stage1-rounds": 2})
    lines = text.splitlines()
    superlink = [ln for ln in lines if ln.startswith("python -m federation.deploy.superlink ")]
    assert len(superlink) == 1
    sl = shlex.split(superlink[0])
    for flag, value in [("--ssl-ca-certfile", "certs/ca.crt"), ("--ssl-certfile", "certs/server.pem"),
                        ("--ssl-keyfile", "certs/server.key"), ("--host", "0.0.0.0"),
                        ("--port", "8443")]:
        assert sl[sl.index(flag) + 1] == value
    assert "--enable-supernode-auth" in sl and "--insecure" not in sl

    register = [ln for ln in lines if ln.startswith("flwr supernode register ")]
    assert register == [f"flwr supernode register certs/supernode-{i}.pub prod" for i in range(3)]
    nodes = [shlex.split(ln) for ln in lines
             if ln.startswith("python -m federation.deploy.supernode ")]
    assert len(nodes) == 3
    for i, sn in enumerate(nodes):
        assert sn[sn.index("--auth-supernode-private-key") + 1] == f"supernode-{i}"
        assert sn[sn.index("--root-certificates") + 1] == "ca.crt"
        assert sn[sn.index("--superlink") + 1] == "sl.example.org:8443"
        assert sn[sn.index("--node-config") + 1] == 'data-path="/path/to/site/faces"'
        assert "--insecure" not in sn
    # every register line comes before the first SuperNode
    assert max(lines.index(r) for r in register) < lines.index(next(
        ln for ln in lines if ln.startswith("python -m federation.deploy.supernode ")))
    run = [shlex.split(ln) for ln in lines if ln.startswith("flwr run ")]
    assert len(run) == 1 and run[0][2:4] == [".", "prod"]
    assert deploy_cli.parse_run_config([run[0][run[0].index("--run-config") + 1]]) == \
        {"preset": "tiny", "stage1-rounds": 2}
    assert 'root-certificates = "' in text and "ca.key" in text     # warns never to ship ca.key


def test_deploy_commands_match_flower_flags():
    from pathlib import Path as P
    sl = superlink_command(P("/k"), 9999, P("/o/state.db"))
    assert sl[:3] == [sys.executable, "-m", "federation.deploy.superlink"]
    assert sl[3:] == ["--ssl-ca-certfile", "/k/ca.crt", "--ssl-certfile", "/k/server.pem",
                      "--ssl-keyfile", "/k/server.key", "--enable-supernode-auth",
                      "--host", "127.0.0.1", "--port", "9999", "--database", "/o/state.db",
                      "--disable-runtime-dependency-installation"]
    insecure = superlink_command(None, 1, P("s.db"))
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert "--database" not in superlink_command(P("/k"), 1, None)      # in-memory state
    sn = supernode_command("127.0.0.1:9999", 9100, {"partition-id": 1, "num-partitions": 3},
                           ca_cert=P("/k/ca.crt"), private_key=P("/k/supernode-1"))
    assert sn[1:] == ["--root-certificates", "/k/ca.crt", "--auth-supernode-private-key",
                      "/k/supernode-1", "--superlink", "127.0.0.1:9999", "--port", "9100",
                      "--node-config", "partition-id=1 num-partitions=3"]


# ---------------------------------------------------------------- slow: a real deployment

@pytest.mark.slow
@pytest.mark.timeout(1800)    # its own waits (up to 900 s per run) fail first, with a reason
def test_deploy_local_tls_auth_three_nodes_end_to_end(lfw_root, tmp_path, capsys):
    from federation.deploy.local import deploy_local
    from tests.test_federation import tiny_config

    run_out = tmp_path / "run-out"
    cfg = tiny_config(lfw_root, run_out, **{"max-identities": 9, "server-eval-pairs": 20,
                                            "min-nodes": 3})
    t0 = time.perf_counter()
    result = deploy_local(tmp_path / "deploy", nodes=3, run_config=cfg, timeout=900)
    wall = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\ndeploy_local TLS+auth, 3 SuperNodes, 1+1 rounds: {result.status} in {wall:.1f} s "
              f"(deploy_local reports {result.seconds:.1f} s)")
    assert result.completed, f"{result.status}: {result.details}\n{result.log[-3000:]}"
    assert result.run_id is not None

    lines = [json.loads(x) for x in (run_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines if "client" not in r] == [1, 2]
    assert len({r["client"]["node_id"] for r in lines if "client" in r}) == 3
    assert (run_out / "final" / "generator.pt").exists()
    assert_honest_replies_accepted(run_out, every=True)
    assert_stage1_weights_moved(run_out)

    deploy = tmp_path / "deploy"
    keys = deploy / "keys"
    for name in ("ca.key", "server.key", "supernode-0", "supernode-1", "supernode-2"):
        assert oct((keys / name).stat().st_mode & 0o777) == "0o600", name
    sl_log = (deploy / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1:" in sl_log                           # TLS, loopback
    assert sl_log.count("[Fleet.ActivateNode] Activated node_id=") >= 3   # authenticated nodes
    assert "SQLite busy_timeout 120000 ms" in sl_log                # the patched SuperLink ran
    conn = (deploy / "flwr-home" / "config.toml").read_text()
    assert f'root-certificates = "{keys / "ca.crt"}"' in conn
    for pgid in result.pids:                                        # everything stopped
        assert _group_gone(pgid), f"process group {pgid} still alive"


# ---------------------------------------------------------------- slow: refusals

@pytest.fixture(scope="module")
def auth_superlink(tmp_path_factory):
    """One TLS + auth SuperLink with only supernode-0's key registered."""
    from federation.deploy.keys import make_ca_and_server_cert, make_node_keys
    from simulation.launch import flwr_env, free_port, stop

    base = tmp_path_factory.mktemp("auth")
    keys = base / "keys"
    make_ca_and_server_cert(keys)
    make_node_keys(keys, 2)
    home = base / "flwr-home"
    env = flwr_env(home)
    port = free_port()
    address = f"127.0.0.1:{port}"
    with open(base / "superlink.log", "wb") as log:
        proc = subprocess.Popen(superlink_command(keys, port, base / "state.db"), env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy_tls(f"https://{address}/health", proc, 120, keys / "ca.crt")
        write_connection(home, env, address, keys / "ca.crt")
        register_node(keys / "supernode-0.pub", env)
        yield {"keys": keys, "env": env, "address": address, "base": base, "proc": proc}
    finally:
        stop(proc)
        assert _group_gone(proc.pid)


def _start_supernode(ctx, name: str, **kw) -> tuple[subprocess.Popen, Path]:
    from simulation.launch import free_port
    log_path = ctx["base"] / f"{name}.log"
    cmd = supernode_command(ctx["address"], free_port(), {"partition-id": 0, "num-partitions": 1},
                            **kw)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=ctx["env"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log_path


def _wait_exit(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    t0 = time.monotonic()
    try:
        return proc.wait(timeout), time.monotonic() - t0
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - t0


def _online_nodes(ctx) -> list[dict]:
    from federation.deploy.local import _cli
    r = _cli(["supernode", "list", CONNECTION, "--format", "json"], ctx["env"], timeout=60)
    return [n for n in json.loads(r.stdout)["nodes"] if n["status"] == "online"]


@pytest.mark.slow
def test_unregistered_supernode_key_is_refused(auth_superlink, capsys):
    from simulation.launch import stop
    ctx, keys = auth_superlink, auth_superlink["keys"]
    good, good_log = _start_supernode(ctx, "registered", ca_cert=keys / "ca.crt",
                                      private_key=keys / "supernode-0")
    bad, bad_log = _start_supernode(ctx, "unregistered", ca_cert=keys / "ca.crt",
                                    private_key=keys / "supernode-1")
    try:
        code, seconds = _wait_exit(bad, REFUSAL_TIMEOUT)
        text = bad_log.read_text(errors="replace")
        with capsys.disabled():
            print(f"\nunregistered key: exit {code} after {seconds:.1f} s")
        assert code is not None, f"unregistered SuperNode still running:\n{text}"
        assert code != 0
        assert "Exit Code: 305" in text and "[code: 2004] Failed to activate SuperNode." in text
        assert "SuperNode ID:" not in text
        # the positive control: the registered key on the same SuperLink comes online
        deadline = time.monotonic() + REFUSAL_TIMEOUT
        while not _online_nodes(ctx) and time.monotonic() < deadline:
            assert good.poll() is None, good_log.read_text(errors="replace")
            time.sleep(1)
        assert len(_online_nodes(ctx)) == 1, good_log.read_text(errors="replace")
        assert good.poll() is None
        sl_log = (ctx["base"] / "superlink.log").read_text(errors="replace")
        assert "No SuperNode found with the given public key" in sl_log
    finally:
        stop(good)
        stop(bad)
    assert _group_gone(good.pid) and _group_gone(bad.pid)


@pytest.mark.slow
def test_supernode_without_the_ca_certificate_cannot_connect(auth_superlink, capsys):
    from simulation.launch import stop
    ctx, keys = auth_superlink, auth_superlink["keys"]
    # a registered key, but no --root-certificates: system CAs do not trust our private CA
    proc, log_path = _start_supernode(ctx, "no-ca", private_key=keys / "supernode-0")
    try:
        code, seconds = _wait_exit(proc, REFUSAL_TIMEOUT)
        text = log_path.read_text(errors="replace")
        with capsys.disabled():
            print(f"\nmissing CA: exit {code} after {seconds:.1f} s")
        assert code is not None, f"SuperNode without the CA still running:\n{text}"
        assert code != 0
        assert "CERTIFICATE_VERIFY_FAILED" in text and "Exit Code: 305" in text
        assert "Using system certificates for TLS connection" in text
    finally:
        stop(proc)
    assert _group_gone(proc.pid)


def test_local_keys_are_private_and_reused(tmp_path):
    from federation.deploy.local import _prepare_keys
    keys = tmp_path / "keys"
    _prepare_keys(keys, 2)
    assert oct(keys.stat().st_mode & 0o777) == "0o700"
    for name in ("ca.key", "server.key", "supernode-0", "supernode-1"):
        assert oct((keys / name).stat().st_mode & 0o777) == "0o600", name
    ca, pub = (keys / "ca.crt").read_bytes(), (keys / "supernode-1.pub").read_bytes()
    _prepare_keys(keys, 2)                               # a complete set is reused as is
    assert (keys / "ca.crt").read_bytes() == ca and (keys / "supernode-1.pub").read_bytes() == pub
    _prepare_keys(keys, 3)                               # more nodes: node keys recreated
    assert (keys / "supernode-2.pub").exists() and (keys / "ca.crt").read_bytes() == ca


def test_sites_on_one_machine_share_its_cores(monkeypatch):
    from federation.deploy.local import site_thread_env
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert site_thread_env({}, 3)["OMP_NUM_THREADS"] == "2"
    assert site_thread_env({}, 20)["OMP_NUM_THREADS"] == "1"
    assert site_thread_env({"OMP_NUM_THREADS": "4"}, 3)["OMP_NUM_THREADS"] == "4"   # user's choice
