"""No party can run its own code on the sites (docs/deploy-security.md).

Fast: the app digest (stable, content-based, one changed file changes it), the pins parser,
the SuperNode's pinned pull step driven with real Flower Message/Fab/Run objects and a real
in-memory NodeState/ObjectStore, fail-closed starts of both wrappers, and the real SuperLink
wrapper answering 403 to Control requests from outside `--control-from`.
Slow: a loopback TLS + node-auth deployment where a FOREIGN app is submitted with `flwr run`:
two pinned sites refuse it (error replies, no marker file, their folder never listed), while a
control site that pinned the foreign app runs it, which shows the app would have leaked.

Every process a test starts runs in its own process group and is stopped by PID.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import importlib
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from federation.deploy import cli as deploy_cli
from federation.deploy import superlink as sl
from federation.deploy import supernode as sn
from federation.deploy.app_digest import (
    AppDigestError,
    app_digest,
    build_fab,
    fab_digest,
    load_pins,
    parse_digest,
    parse_pins,
)
from simulation.launch import flwr_bin, flwr_env, free_port, stop

FOREIGN_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "foreignapp"
version = "1.0.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "someone-else"

[tool.flwr.app.components]
serverapp = "foreign_app:server"
clientapp = "foreign_app:client"

[tool.flwr.app.config]
marker-dir = ""
result-file = ""
expected-nodes = 3
"""

# What a hostile party submits: every site that runs it drops a marker file and sends home the
# names in its private data folder; the ServerApp records what came back.
FOREIGN_CODE = '''\
import json, os, time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def steal(msg: Message, context: Context) -> Message:
    Path(str(context.run_config["marker-dir"]), f"pwned-{context.node_id}").write_text("ran")
    names = sorted(os.listdir(str(context.node_config["data-path"])))
    return Message(RecordDict({"loot": ConfigRecord({"names": names})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["expected-nodes"])
    deadline = time.time() + 120
    nodes = list(grid.get_node_ids())
    while len(nodes) < want and time.time() < deadline:
        time.sleep(1)
        nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n,
                    message_type="query") for n in nodes]
    out = []
    for reply in grid.send_and_receive(msgs, timeout=150):
        entry = {"node": reply.metadata.src_node_id, "error": None, "names": None}
        if reply.has_error():
            entry["error"] = [reply.error.code, reply.error.reason]
        else:
            entry["names"] = list(reply.content["loot"]["names"])
        out.append(entry)
    Path(str(context.run_config["result-file"])).write_text(json.dumps(out))
'''


def write_app(root: Path, code: str = FOREIGN_CODE) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
    (root / "foreign_app.py").write_text(code)
    return root


def rezip(fab: bytes, compression: int = zipfile.ZIP_STORED) -> bytes:
    """The same entries in a zip with different bytes (another compression)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(buf, "w", compression) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return buf.getvalue()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minusfed")
    deploy_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


# ---------------------------------------------------------------- fast: the digest and pins

def test_digest_is_stable_content_based_and_changes_with_one_file(tmp_path):
    app = write_app(tmp_path / "app")
    first = app_digest(app)
    assert app_digest(app) == first and len(first) == 64
    fab = build_fab(app)
    (tmp_path / "app.fab").write_bytes(fab)
    assert app_digest(tmp_path / "app.fab") == first                 # .fab == its source dir
    stored = rezip(fab)                                              # other zip bytes ...
    assert hashlib.sha256(stored).digest() != hashlib.sha256(fab).digest()
    assert fab_digest(stored) == first                               # ... same content digest
    (app / "foreign_app.py").write_text(FOREIGN_CODE + "\n# one more line\n")
    assert app_digest(app) != first
    (app / "foreign_app.py").write_text(FOREIGN_CODE)
    assert app_digest(app) == first
    (app / "extra.py").write_text("")                                # an added (empty) file
    assert app_digest(app) != first


def test_digest_refuses_what_is_not_a_clean_fab(tmp_path):
    fab = build_fab(write_app(tmp_path / "app"))
    with pytest.raises(AppDigestError, match="not a readable FAB"):
        fab_digest(b"#!/bin/sh\necho not a zip\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", "a")
        z.writestr("pyproject.toml", "b")                            # which one runs?
    with pytest.raises(AppDigestError, match="two entries named 'pyproject.toml'"):
        fab_digest(buf.getvalue())
    stored = bytearray(rezip(fab))
    at = stored.index(b"foreign_app") + len("foreign_app.py") + 10   # inside the stored data
    stored[at] ^= 0xFF                                                # CRC no longer matches
    with pytest.raises(AppDigestError, match="not a readable FAB"):
        fab_digest(bytes(stored))
    with pytest.raises(AppDigestError, match="no pyproject.toml"):
        app_digest(tmp_path)
    with pytest.raises(AppDigestError, match="no such app directory"):
        app_digest(tmp_path / "missing")


def test_pins_parser_names_the_bad_line(tmp_path):
    good = "ab" * 32
    assert parse_digest(good.upper()) == good
    assert parse_pins(["# release 1.2\n", f"{good}  # minusfed 0.1.0", "", good], "p") == \
        [good, good]
    for bad in ("ab" * 31, "zz" * 32, good + "0", "sha256:" + good):
        with pytest.raises(ValueError, match=r"pins:3: expected a 64-hex-digit app digest"):
            parse_pins(["# ok", good, bad], "pins")
    f = tmp_path / "pins"
    f.write_text(f"{good}\nnot-a-digest\n")
    with pytest.raises(ValueError, match=rf"{f}:2: expected a 64-hex-digit.*'not-a-digest'"):
        load_pins(f)
    f.write_text("# nothing pinned yet\n\n")
    with pytest.raises(ValueError, match="no app digest in it"):
        load_pins(f)
    with pytest.raises(ValueError, match="cannot read it"):
        load_pins(tmp_path / "absent")


def test_split_pin_args_keeps_flower_args(tmp_path):
    a, b = "a" * 64, "b" * 64
    pins_file = tmp_path / "pins"
    pins_file.write_text(f"{b}\n")
    pins, rest = sn.split_pin_args(["--superlink", "h:1", sn.PIN_FLAG, a, f"{sn.PINS_FILE_FLAG}="
                                    f"{pins_file}", "--node-config", "x=1", f"{sn.PIN_FLAG}={a}"])
    assert pins == [a, b] and rest == ["--superlink", "h:1", "--node-config", "x=1"]
    with pytest.raises(ValueError, match="needs a value"):
        sn.split_pin_args(["--insecure", sn.PIN_FLAG])
    with pytest.raises(ValueError, match="--pinned-app: expected a 64-hex-digit"):
        sn.split_pin_args([sn.PIN_FLAG, "latest"])


def test_cli_app_digest(tmp_path, capsys):
    app = write_app(tmp_path / "app")
    a = _parser().parse_args(["deploy", "app-digest", str(app)])
    assert a.func(a) == 0
    out = capsys.readouterr()
    assert out.out.strip() == app_digest(app)                      # stdout: only the digest
    assert "--pinned-app" in out.err
    a = _parser().parse_args(["deploy", "app-digest", str(tmp_path / "nope.fab")])
    assert a.func(a) == 2
    assert "nope.fab: no such app directory or .fab file" in capsys.readouterr().err
    assert _parser().parse_args(["deploy", "app-digest"]).app == "."


def test_local_deployment_commands_pin_and_restrict():
    from federation.deploy.local import commands_for_sites, superlink_command, supernode_command
    d = "c" * 64
    cmd = supernode_command("127.0.0.1:1", 9, {"partition-id": 0}, ca_cert=Path("/k/ca.crt"),
                            pinned_apps=[d])
    assert cmd[:5] == [sys.executable, "-m", "federation.deploy.supernode", sn.PIN_FLAG, d]
    assert cmd[5:7] == ["--root-certificates", "/k/ca.crt"]
    cmd = superlink_command(Path("/k"), 1, None, control_from=["10.0.0.7"])
    assert cmd[cmd.index(sl.CONTROL_FROM_FLAG) + 1] == "10.0.0.7"
    text = commands_for_sites(2, host="sl.example.org", port=8443, app_digest=d)
    lines = text.splitlines()
    assert "minusfed deploy app-digest ." in lines
    link = [ln for ln in lines if ln.startswith("python -m federation.deploy.superlink ")]
    assert len(link) == 1 and f"{sl.CONTROL_FROM_FLAG} 127.0.0.1" in link[0]
    sites = [ln for ln in lines if ln.startswith("python -m federation.deploy.supernode ")]
    assert len(sites) == 2 and all(f"{sn.PIN_FLAG} {d} " in ln for ln in sites)
    assert '#    address = "127.0.0.1:8443"' in lines                # flwr runs on the host
    assert "flower-superlink " not in text.replace("(flower-superlink", "")
    assert not any(ln.startswith("flower-supernode") for ln in lines)
    assert '--pinned-app "$APP_DIGEST"' in commands_for_sites(1)  # placeholder + how to get it
    assert "APP_DIGEST=$(minusfed deploy app-digest" in commands_for_sites(1)


# ---------------------------------------------------------------- fast: the pinned SuperNode

@pytest.fixture
def pinned_loop(monkeypatch):
    """Flower's SuperNode loop module with the pull step restored after the test."""
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(loop, "_pull_and_store_message", loop._pull_and_store_message)
    return loop


class _Site:
    """A real in-memory NodeState/ObjectStore and Flower's own pull step fed by fake transport
    callables that serve real Message, Run and Fab objects."""

    def __init__(self, loop) -> None:
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.supernode.nodestate import NodeStateFactory
        factory = ObjectStoreFactory()
        self.loop = loop
        self.state = NodeStateFactory(factory).state()
        self.store = factory.store()
        self.state.set_node_id(5)
        self.fab_downloads = 0

    def deliver(self, run_id: int, fab: bytes):
        from flwr.app import ConfigRecord, Message, RecordDict
        from flwr.app.metadata import Metadata
        from flwr.supercore.fab import Fab
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
        from flwr.supercore.run import Run
        msg = Message(metadata=Metadata(run_id=run_id, message_id="", src_node_id=1,
                                        dst_node_id=5, reply_to_message_id="", group_id="1",
                                        created_at=time.time(), ttl=600, message_type="query"),
                      content=RecordDict({"q": ConfigRecord({"x": 1})}))
        msg.metadata.__dict__["_message_id"] = msg.object_id
        objects = {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}
        queue = [(msg, get_object_tree(msg))]
        fab_hash = hashlib.sha256(fab).hexdigest()
        run = Run.create_empty(run_id)
        run.fab_hash, run.primary_task_type = fab_hash, "client-app"

        def get_fab(h: str, rid: int) -> Fab:
            self.fab_downloads += 1
            return Fab(h, fab, {})

        returned = self.loop._pull_and_store_message(
            state=self.state, object_store=self.store, node_config={"data-path": "/site"},
            receive=lambda: queue.pop() if queue else None, get_run=lambda rid: run,
            get_fab=get_fab, pull_object=lambda rid, oid: objects[oid],
            confirm_message_received=lambda rid, mid: None, trusted_entities=None)
        return returned, fab_hash, msg


def test_pinned_supernode_refuses_an_unpinned_fab_and_stores_nothing(tmp_path, pinned_loop,
                                                                     caplog):
    honest = build_fab(write_app(tmp_path / "honest", FOREIGN_CODE.replace("steal", "work")))
    foreign = build_fab(write_app(tmp_path / "foreign"))
    patched = sn.install_pinning([fab_digest(honest)])
    assert pinned_loop._pull_and_store_message is patched
    site = _Site(pinned_loop)

    returned, fab_hash, msg = site.deliver(11, foreign)
    assert returned == 11                                # the push stage sends the error reply
    assert site.state.get_run(11) is None and site.state.get_fab(fab_hash) is None
    assert list(site.state.get_tasks(run_ids=[11])) == []  # nothing a ClientApp could pick up
    replies = site.state.get_messages_legacy(is_reply=True)
    assert len(replies) == 1
    reply = replies[0]
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert (reply.error.code, reply.error.reason) == (7, sn.REFUSAL_REASON)   # INVALID_FAB
    assert fab_digest(foreign) not in reply.error.reason
    site.state.delete_messages(message_ids=[reply.metadata.message_id])

    # a second message of the refused run: refused again without downloading the FAB again
    returned, _, _ = site.deliver(11, foreign)
    assert returned == 11 and site.fab_downloads == 1
    assert len(site.state.get_messages_legacy(is_reply=True)) == 1
    assert site.state.get_run(11) is None

    # the pinned app goes through Flower's normal path: run, FAB and a task stored
    returned, fab_hash, _ = site.deliver(12, honest)
    assert returned == 12
    assert site.state.get_run(12) is not None
    assert site.state.get_fab(fab_hash).content == honest
    assert len(site.state.get_tasks(run_ids=[12])) == 1

    # a FAB that is not even a zip is refused the same way, never parsed by Flower
    returned, fab_hash, _ = site.deliver(13, b"not a zip")
    assert returned == 13 and site.state.get_run(13) is None


def test_install_pinning_fails_closed_when_flower_moved(pinned_loop, monkeypatch):
    def pull_without_fab(state, object_store, receive, get_run):   # a different Flower
        return None
    monkeypatch.setattr(pinned_loop, "_pull_and_store_message", pull_without_fab)
    with pytest.raises(sn.PinningUnavailable, match="lost parameter"):
        sn.install_pinning(["a" * 64])
    monkeypatch.delattr(pinned_loop, "_pull_and_store_message")
    with pytest.raises(sn.PinningUnavailable):
        sn.install_pinning(["a" * 64])
    with pytest.raises(SystemExit, match="refusing to start: cannot pin apps"):
        sn.main([sn.PIN_FLAG, "a" * 64, "--insecure", "--superlink", "127.0.0.1:1"])


def test_supernode_wrapper_refuses_to_start_unpinned():
    """A real process: no pin, no SuperNode (it exits before connecting anywhere)."""
    out = subprocess.run([sys.executable, "-m", "federation.deploy.supernode", "--insecure",
                          "--superlink", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "refusing to start without a pinned app" in out.stderr
    assert "Starting Flower SuperNode" not in out.stdout + out.stderr


# ---------------------------------------------------------------- fast: the SuperLink allow-list

def test_allow_list_paths_and_addresses():
    assert sl.is_public_path("/health") and sl.is_public_path("/v1/fleet/pull-messages")
    for path in ("/v1/control/start-run", "/v1/runtime/pull-messages", "/docs", "/openapi.json",
                 "/v1/fleet/../control/start-run", "/v1/fleet//x", "/v1/fleet", "/", "/x"):
        assert not sl.is_public_path(path), path
    control, runtime = sl.access_networks([], ["--host", "0.0.0.0"])
    assert control == sl.LOOPBACK and runtime == sl.LOOPBACK
    control, runtime = sl.access_networks([], ["--host=10.1.2.3"])
    assert [str(n) for n in control] == ["127.0.0.0/8", "::1/128", "10.1.2.3/32"]
    control, runtime = sl.access_networks([sl.parse_network("10.9.0.0/16")], ["--host", "h.org"])
    assert [str(n) for n in control] == ["10.9.0.0/16"]
    assert [str(n) for n in runtime] == ["127.0.0.0/8", "::1/128", "10.9.0.0/16"]
    guard = sl.ControlAllowList(None, control, runtime)
    assert guard.allowed("/v1/control/list-runs", {"client": ("10.9.3.4", 1)})
    assert guard.allowed("/v1/control/list-runs", {"client": ("::ffff:10.9.3.4", 1)})
    assert not guard.allowed("/v1/control/list-runs", {"client": ("127.0.0.1", 1)})
    assert guard.allowed("/v1/runtime/acquire-task", {"client": ("127.0.0.1", 1)})
    assert not guard.allowed("/v1/runtime/acquire-task", {"client": ("10.8.0.1", 1)})
    assert not guard.allowed("/v1/control/list-runs", {"client": None})
    assert guard.allowed("/v1/fleet/get-fab", {"client": ("203.0.113.9", 1)})
    networks, rest = sl.split_control_args(["--insecure", "--control-from", "10.0.0.5",
                                            "--control-from=::1", "--port", "1"])
    assert [str(n) for n in networks] == ["10.0.0.5/32", "::1/128"]
    assert rest == ["--insecure", "--port", "1"]
    with pytest.raises(ValueError, match="--control-from 'everyone': expected an IP address"):
        sl.split_control_args(["--control-from", "everyone"])
    with pytest.raises(ValueError, match="needs a value"):
        sl.split_control_args(["--control-from"])


def test_control_guard_fails_closed(monkeypatch):
    main = importlib.import_module("flwr.superlink.main")
    with pytest.raises(sl.ControlGuardUnavailable, match="FLWR_INTERNAL_GRPC_CONTROL_API"):
        sl.install_control_allow_list(sl.LOOPBACK, sl.LOOPBACK,
                                      {"FLWR_INTERNAL_GRPC_CONTROL_API": "1"})
    with pytest.raises(sl.ControlGuardUnavailable, match="FORWARDED_ALLOW_IPS"):
        sl.install_control_allow_list(sl.LOOPBACK, sl.LOOPBACK, {"FORWARDED_ALLOW_IPS": "*"})
    monkeypatch.delattr(main, "_get_middleware")
    with pytest.raises(sl.ControlGuardUnavailable, match="_get_middleware"):
        sl.install_control_allow_list(sl.LOOPBACK, sl.LOOPBACK, {})
    with pytest.raises(SystemExit, match="refusing to start with an open Control API"):
        sl.main(["--insecure", "--port", str(free_port())])


def _start_superlink(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, int, dict]:
    from federation.deploy.local import superlink_command
    from simulation.launch import wait_healthy
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = flwr_env(home)
    port = free_port()
    cmd = superlink_command(None, port, None) + list(extra)
    with open(tmp_path / "superlink.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, 120)
        subprocess.run([flwr_bin("flwr"), "config", "list"], env=env, capture_output=True,
                       timeout=60, check=True)
        with open(home / "config.toml", "a", encoding="utf-8") as f:
            f.write(f'\n[superlink.guarded]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    except BaseException:
        stop(proc)
        raise
    return proc, port, env


def _post(port: int, path: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _flwr_ls(env: dict) -> dict:
    r = subprocess.run([flwr_bin("flwr"), "ls", "guarded", "--format", "json"], env=env,
                       capture_output=True, text=True, timeout=120)
    return json.loads(r.stdout)


def test_superlink_control_api_only_from_control_from(tmp_path):
    proc, port, env = _start_superlink(tmp_path, "--control-from", "127.0.0.2/32")
    try:
        reply = _flwr_ls(env)                                         # from 127.0.0.1
        assert reply["success"] is False
        assert "only to the operator's host" in reply["error-message"]
        status, body = _post(port, "/v1/control/start-run")
        assert status == 403 and json.loads(body) == {"detail": sl.FORBIDDEN_DETAIL}
        assert _post(port, "/v1/fleet/../control/start-run")[0] == 403
        status, _ = _post(port, "/v1/control/list-runs", source="127.0.0.2")
        assert status != 403                                          # the allowed address
        assert _post(port, "/v1/fleet/get-run")[0] != 403             # sites' API stays open
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        stop(proc)
    log = (tmp_path / "superlink.log").read_text(errors="replace")
    assert "Control API only from 127.0.0.2/32" in log
    assert "refused /v1/control/start-run from 127.0.0.1" in log


def test_superlink_default_allows_the_operator_on_its_host(tmp_path):
    proc, port, env = _start_superlink(tmp_path)
    try:
        reply = _flwr_ls(env)
        assert reply["success"] is True and reply["runs"] == []
        assert _post(port, "/v1/control/list-runs", source="127.0.0.2")[0] != 403   # loopback
    finally:
        stop(proc)
    assert "Control API only from 127.0.0.0/8, ::1/128, 127.0.0.1/32" in \
        (tmp_path / "superlink.log").read_text(errors="replace")


# ---------------------------------------------------------------- slow: a foreign app, end to end

def _wait_finished(run_id: int, env: dict, timeout: float) -> dict:
    from federation.deploy.local import CONNECTION
    from simulation.launch import run_status
    deadline = time.monotonic() + timeout
    run: dict = {}
    while time.monotonic() < deadline:
        run = run_status(run_id, CONNECTION, env)
        if str(run.get("status", "")).startswith("finished"):
            return run
        time.sleep(2)
    return run


@pytest.mark.slow
def test_foreign_app_is_refused_by_every_pinned_site(tmp_path, capsys):
    from federation.deploy.keys import make_ca_and_server_cert, make_node_keys
    from federation.deploy.local import (
        CONNECTION,
        ROOT,
        _popen,
        register_node,
        site_thread_env,
        superlink_command,
        supernode_command,
        wait_healthy_tls,
        write_connection,
    )
    from simulation.launch import submit_run

    t0 = time.monotonic()
    keys = tmp_path / "keys"
    make_ca_and_server_cert(keys)
    make_node_keys(keys, 3)
    honest = app_digest(ROOT)                       # what the sites agreed to run
    foreign_dir = write_app(tmp_path / "foreignapp")
    foreign = app_digest(foreign_dir)
    assert foreign != honest
    markers = tmp_path / "markers"
    markers.mkdir()
    result_file = tmp_path / "loot.json"
    sites = []
    for i in range(3):
        faces = tmp_path / f"site-{i}" / "faces"
        (faces / f"Private_Person_{i}").mkdir(parents=True)
        sites.append(faces)

    home = tmp_path / "flwr-home"
    env = flwr_env(home)
    port = free_port()
    address = f"127.0.0.1:{port}"
    started: list[subprocess.Popen] = []
    logs = [tmp_path / f"supernode-{i}.log" for i in range(3)]
    try:
        superlink = _popen(superlink_command(keys, port, tmp_path / "state.db"), env,
                           tmp_path / "superlink.log", tmp_path)
        started.append(superlink)
        wait_healthy_tls(f"https://{address}/health", superlink, 120, keys / "ca.crt")
        write_connection(home, env, address, keys / "ca.crt")
        for i in range(3):
            register_node(keys / f"supernode-{i}.pub", env)
        # sites 0 and 1 pin the honest app only; site 2 is the control: it pinned the foreign
        # app too, so it shows what the app does wherever it is allowed to run
        pins = [[honest], [honest], [honest, foreign]]
        for i in range(3):
            cmd = supernode_command(address, free_port(), {"data-path": str(sites[i])},
                                    ca_cert=keys / "ca.crt", private_key=keys / f"supernode-{i}",
                                    pinned_apps=pins[i])
            assert cmd[1:3] == ["-m", "federation.deploy.supernode"]
            started.append(_popen(cmd, site_thread_env(env, 3), logs[i], tmp_path))
        run_id = submit_run(foreign_dir, CONNECTION, env,
                            {"marker-dir": str(markers), "result-file": str(result_file),
                             "expected-nodes": 3})
        run = _wait_finished(run_id, env, 240)
        for i, p in enumerate(started[1:]):
            assert p.poll() is None, f"SuperNode {i} died:\n{logs[i].read_text()[-3000:]}"
    finally:
        for p in reversed(started):
            stop(p)
    seconds = time.monotonic() - t0
    with capsys.disabled():
        print(f"\nforeign app vs 2 pinned + 1 control SuperNode: {run.get('status')} in "
              f"{seconds:.1f} s")
    sl_log = (tmp_path / "superlink.log").read_text(errors="replace")
    assert run.get("status") == "finished:completed", f"{run}\n{sl_log[-4000:]}"
    loot = json.loads(result_file.read_text())
    errors = [r for r in loot if r["error"]]
    answered = [r for r in loot if not r["error"]]
    assert len(loot) == 3, loot
    assert [e["error"] for e in errors] == [[7, sn.REFUSAL_REASON]] * 2
    assert [a["names"] for a in answered] == [["Private_Person_2"]]    # the control site leaked
    assert sorted(p.name for p in markers.iterdir()) == [f"pwned-{answered[0]['node']}"]
    for i in (0, 1):
        text = logs[i].read_text(errors="replace")
        assert f"{sn.REFUSAL_LOG} run {run_id}: its app (digest {foreign})" in text, text[-3000:]
        assert "Received successfully" not in text                   # nothing stored / run
    control = logs[2].read_text(errors="replace")
    assert f"runs pinned app {foreign}" in control and sn.REFUSAL_LOG not in control
