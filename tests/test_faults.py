"""Faults and bad input on a real loopback deployment (issue 6), each proven by a test.

Slow tests (a TLS + node-auth SuperLink and SuperNodes on 127.0.0.1, private FLWR_HOME, free
ports, every process stopped by PID; about 2-5 minutes each on a loaded 2-core machine):

1. a SuperNode killed (SIGKILL) mid-round: the round goes on with the replies that came, the
   run completes, and metrics.jsonl names the node that dropped;
2. the SuperLink (with its ServerApp) killed after round 1 and restarted on the same database:
   the resubmitted run resumes after the last checkpointed round, no round is done twice;
3. SuperNodes sending a NaN, an oversized (norm) and a malformed (extra key) update, through the
   test hook `clients/faults.py` (node config `fault`): each is rejected with its reason, the
   honest one is aggregated;
4. SuperNodes whose data folder is empty or holds only corrupt .jpg files: the server records
   the outbound guard's fixed error reply for each, the site's own log names the folder and what
   it must hold, and the others train;
5. hostile sites (over-weighted, inflated, leaking; a handler leak stopped by the guard).

The fast tests at the bottom check the same pieces without a deployment.

Every slow run uses a lean run config: client evaluation off (`fraction-evaluate=0`), 2
identities per site, 20 server pairs.  Run one at a time:
`.venv/bin/python -m pytest tests/test_faults.py -q -x -m slow -k NAME`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.deploy.local import (
    CONNECTION,
    NODE_KEY_PREFIX,
    _cli,
    _popen,
    _prepare_keys,
    _tail,
    register_node,
    site_thread_env,
    superlink_command,
    supernode_command,
    wait_healthy_tls,
    write_connection,
)
from simulation.launch import ROOT, flwr_bin, flwr_env, free_port, run_status, stop, submit_run
from tests.run_outcome import assert_honest_replies_accepted, assert_stage1_weights_moved
from tests.test_deploy_local import _group_gone
from tests.test_federation import tiny_config

COMPLETED = "finished:completed"


# ---------------------------------------------------------------- helpers

def lean_config(lfw_root: Path, out_dir: Path, nodes: int, **over) -> dict:
    """The cheapest run that still trains: train phase only, 2 identities per site."""
    return tiny_config(lfw_root, out_dir, **{
        "max-identities": 2 * nodes, "server-eval-pairs": 20, "fraction-evaluate": 0.0,
        "min-nodes": nodes, "stage1-rounds": 1, "stage2-rounds": 0, **over})


def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """(round lines, client lines) of out_dir/metrics.jsonl."""
    path = out_dir / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] \
        if path.exists() else []
    return [r for r in lines if "client" not in r], [r for r in lines if "client" in r]


def deploy_one_round(tmp_path: Path, capsys, label: str, cfg: dict,
                     node_configs: list[dict]) -> tuple:
    """One completed 1-round deployment (one SuperNode per node config, in-memory SuperLink
    state): (result, node ids in node-config order, round lines, client line by node id)."""
    from federation.deploy.local import deploy_local
    t0 = time.perf_counter()
    result = deploy_local(tmp_path / "deploy", nodes=len(node_configs), run_config=cfg,
                          timeout=900, node_configs=node_configs, in_memory_state=True)
    _print(capsys, f"{label}: {result.status} in {time.perf_counter() - t0:.0f} s")
    assert result.completed, f"{result.status}: {result.details}\n{result.log[-4000:]}"
    for pgid in result.pids:
        assert _group_gone(pgid), f"process group {pgid} still alive"
    logs = tmp_path / "deploy" / "logs"
    ids = [supernode_id(logs / f"supernode-{i}.log") for i in range(len(node_configs))]
    rounds, clients = read_metrics(Path(str(cfg["out-dir"])))
    assert [r["round"] for r in rounds] == [1]
    return result, ids, rounds, {c["client"]["node_id"]: c["client"] for c in clients}


def supernode_id(log_path: Path) -> int:
    """The node id a SuperNode logged at start ("SuperNode ID: N")."""
    found = re.findall(r"SuperNode ID: (\d+)", log_path.read_text(errors="replace"))
    assert found, f"no 'SuperNode ID' in {log_path}:\n{_tail(log_path)}"
    return int(found[-1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             poll: float = 0.5, abort: Callable[[], str] | None = None) -> float:
    """Poll until `predicate()`; return the seconds waited; fail with `what` on timeout."""
    t0 = time.monotonic()
    while not predicate():
        reason = abort() if abort else ""
        if reason:
            pytest.fail(f"while waiting for {what}: {reason}")
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - t0


class Federation:
    """A TLS + node-auth SuperLink and `nodes` SuperNodes on loopback, driven step by step
    (federation/deploy/local.py's building blocks; `deploy_local` runs the happy path in one
    call and stops the run when a SuperNode dies, which test 1 must not).  Use as a context
    manager: every process started is stopped by PID (its process group) on exit."""

    def __init__(self, base: Path, nodes: int, *, database: Path | None = None,
                 node_configs: list[Mapping[str, object]] | None = None) -> None:
        self.base, self.nodes = base, nodes
        self.keys, self.home, self.logs = base / "keys", base / "flwr-home", base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        _prepare_keys(self.keys, nodes)
        self.env = flwr_env(self.home)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.database = database            # None: Flower's in-memory state
        self.node_configs = node_configs or [{} for _ in range(nodes)]
        self.started: list[subprocess.Popen] = []
        self.superlink: subprocess.Popen | None = None
        self.superlink_logs: list[Path] = []
        self.supernodes: list[subprocess.Popen] = []
        self.node_ids: list[int] = []
        self.generation = 0                 # SuperNode starts (restarts get new log files)
        self.followers: dict[int, subprocess.Popen] = {}

    # -- lifecycle
    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self.started):       # followers, SuperNodes, SuperLink(s)
            stop(p)

    def start_superlink(self) -> float:
        """Start (or restart: same port, same database) the SuperLink; seconds to healthy."""
        t0 = time.monotonic()
        log = self.logs / f"superlink-{len(self.superlink_logs) + 1}.log"
        self.superlink = _popen(superlink_command(self.keys, self.port, self.database),
                                self.env, log, ROOT)
        self.started.append(self.superlink)
        self.superlink_logs.append(log)
        wait_healthy_tls(f"https://{self.address}/health", self.superlink, 180,
                         self.keys / "ca.crt")
        return time.monotonic() - t0

    def register(self) -> None:
        """Register every SuperNode's public key (the connection is written once)."""
        if not (self.home / "config.toml").exists():
            write_connection(self.home, self.env, self.address, self.keys / "ca.crt")
        self.node_ids = [register_node(self.keys / f"{NODE_KEY_PREFIX}-{i}.pub", self.env)
                         for i in range(self.nodes)]

    def start_supernodes(self) -> None:
        """Start (or, after `stop_supernodes`, restart) the SuperNodes; new log files."""
        self.generation += 1
        for i in range(self.nodes):
            cfg = {"partition-id": i, "num-partitions": self.nodes, **self.node_configs[i]}
            cmd = supernode_command(self.address, free_port(), cfg, ca_cert=self.keys / "ca.crt",
                                    private_key=self.keys / f"{NODE_KEY_PREFIX}-{i}")
            p = _popen(cmd, site_thread_env(self.env, self.nodes), self.supernode_log(i), ROOT)
            self.started.append(p)
            self.supernodes.append(p)

    def stop_supernodes(self) -> None:
        for p in self.supernodes:
            stop(p)
        self.supernodes = []

    def supernode_log(self, i: int) -> Path:
        suffix = "" if self.generation <= 1 else f"-{self.generation}"
        return self.logs / f"supernode-{i}{suffix}.log"

    def kill_group(self, proc: subprocess.Popen) -> None:
        """SIGKILL a process we started and its group (children: superexec, apps)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    # -- control API
    def online(self) -> set[int]:
        r = _cli(["supernode", "list", CONNECTION, "--format", "json"], self.env, timeout=60)
        try:
            return {int(n["node-id"]) for n in json.loads(r.stdout)["nodes"]
                    if n["status"] == "online"}
        except (ValueError, KeyError, TypeError):
            return set()

    def wait_online(self, count: int, timeout: float = 240) -> float:
        return wait_for(lambda: len(self.online()) >= count, timeout,
                        f"{count} SuperNodes online", poll=2, abort=self.dead_supernode)

    def dead_supernode(self) -> str:
        for i, p in enumerate(self.supernodes):
            if p.poll() is not None and p.returncode != -signal.SIGKILL:
                return f"SuperNode {i} exited ({p.returncode}):\n{_tail(self.supernode_log(i))}"
        return ""

    def submit(self, run_config: Mapping[str, object]) -> int:
        run_id = submit_run(ROOT, CONNECTION, self.env, run_config)
        self.follow(run_id)
        return run_id

    def follow(self, run_id: int) -> None:
        """(Re)start `flwr log RUN --stream`, appending to the run's log file."""
        with open(self.run_log(run_id), "ab") as out:
            follower = subprocess.Popen([flwr_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                                        env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.started.append(follower)
        self.followers[run_id] = follower

    def finished(self, run_id: int) -> str:
        """The run's final status, or "" while it runs.  Asks `flwr ls` only once the follower
        has exited; a follower that lost the stream while the run goes on (an HTTP 500 from a
        busy SuperLink) is restarted."""
        if self.followers[run_id].poll() is None:
            return ""
        status = self.status(run_id)
        if status.startswith("finished"):
            return status
        self.follow(run_id)
        return ""

    def run_log(self, run_id: int) -> Path:
        return self.logs / f"run-{run_id}.log"

    def status(self, run_id: int) -> str:
        try:
            run = run_status(run_id, CONNECTION, self.env)
        except RuntimeError as e:          # the SuperLink may be down on purpose
            return f"unknown ({str(e)[-600:]})"
        details = str(run.get("status-details") or "")
        if run.get("status") != COMPLETED and details not in ("", "N/A"):
            return f"{run.get('status')} ({details})"
        return str(run.get("status"))

    def wait_finished(self, run_id: int, timeout: float = 600) -> str:
        """Wait until the run is finished; its `flwr ls` status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reason = self.dead_supernode()
            if reason:
                pytest.fail(f"run {run_id}: {reason}")
            status = self.finished(run_id)
            if status:
                return status
            time.sleep(1)
        _cli(["stop", str(run_id), CONNECTION], self.env, timeout=60)
        pytest.fail(f"run {run_id} not finished after {timeout:.0f} s; status "
                    f"{self.status(run_id)}\n{_tail(self.run_log(run_id), 40)}")

    def pgids(self) -> list[int]:
        return [p.pid for p in self.started]


def _print(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


# ---------------------------------------------------------------- 1. a SuperNode dies mid-round

@pytest.mark.slow
@pytest.mark.timeout(1800)    # its own waits (up to 900 s per run) fail first, with a reason
def test_supernode_killed_mid_round_run_completes_and_names_the_dropped_node(
        lfw_root, tmp_path, capsys):
    out = tmp_path / "run-out"
    cfg = lean_config(lfw_root, out, 3, **{"min-nodes": 2, "stage2-rounds": 1,
                                           "round-timeout": 600.0})
    victim = 2
    t0 = time.monotonic()
    with Federation(tmp_path / "fed", 3) as fed:
        fed.start_superlink()
        fed.register()
        fed.start_supernodes()
        fed.wait_online(3)                 # all three sampled in round 1 (min-nodes is 2)
        run_id = fed.submit(cfg)
        victim_log = fed.supernode_log(victim)

        def got_train_message() -> bool:
            text = victim_log.read_text(errors="replace")
            at = text.find("Receiving: train message")
            return at >= 0 and "Received successfully" in text[at:]

        wait_for(got_train_message, 400, f"SuperNode {victim} to receive its round-1 message",
                 abort=fed.dead_supernode)
        time.sleep(2)                     # its ClientApp is now training
        killed_at = time.monotonic()
        fed.kill_group(fed.supernodes[victim])
        assert _group_gone(fed.supernodes[victim].pid)
        status = fed.wait_finished(run_id, 900)
        finished = time.monotonic()
        run_log = fed.run_log(run_id).read_text(errors="replace")
        node_ids = fed.node_ids
        pgids = fed.pgids()
    for pgid in pgids:
        assert _group_gone(pgid), f"process group {pgid} still alive"

    rounds, clients = read_metrics(out)
    _print(capsys, f"SuperNode killed mid-round: {status}; kill after {killed_at - t0:.0f} s, "
                   f"run finished {finished - killed_at:.0f} s later; round seconds "
                   f"{[round(r['metrics']['round_seconds']) for r in rounds]}; total "
                   f"{finished - t0:.0f} s")
    assert status == COMPLETED, f"{status}\n{run_log[-4000:]}"
    assert [r["round"] for r in rounds] == [1, 2]
    dead, alive = node_ids[victim], sorted(n for n in node_ids if n != node_ids[victim])

    first, second = rounds[0]["metrics"], rounds[1]["metrics"]
    assert first["nodes"]["train"]["sampled"] == sorted(node_ids)
    assert first["nodes"]["train"]["replied"] == alive
    assert first["nodes"]["train"]["dropped"] == [dead]
    assert first["dropped"] == [dead]
    assert second["nodes"]["train"]["sampled"] == alive and second["dropped"] == []

    # the dead node: the SuperLink answered for it (Node Unavailable, missed heartbeats), or,
    # had the round timeout come first, it is listed as silent
    dead_entries = [c["client"] for c in clients if c["client"]["node_id"] == dead]
    if first["nodes"]["train"]["silent"] != [dead]:
        assert len(dead_entries) == 1 and not dead_entries[0]["accepted"]
        assert "Node Unavailable" in " ".join(dead_entries[0]["problems"])
    assert all(c["client"]["accepted"] for c in clients if c["client"]["node_id"] != dead)
    assert_honest_replies_accepted(out, every=True, honest=set(alive))
    assert_stage1_weights_moved(out)
    assert sorted(c["client"]["node_id"] for c in clients if c["round"] == 2) == alive
    assert "sampled nodes dropped out" in run_log
    assert (out / "final" / "generator.pt").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["round"] == 2


# ---------------------------------------------------------------- 2. SuperLink restarted

@pytest.mark.slow
@pytest.mark.timeout(1800)    # its own waits (up to 900 s per run) fail first, with a reason
def test_superlink_restart_resumes_after_the_last_checkpointed_round(lfw_root, tmp_path, capsys):
    """Kill the SuperLink with its ServerApp after round 1 of 1 + 1; a fresh SuperLink on the
    same port (fresh in-memory state: the keys are registered again and the sites reconnect),
    the same run config resubmitted: the ServerApp resumes from out-dir's checkpoint.

    Not the same `--database` file: on this loaded 2-core machine the file database gave
    "database is locked" HTTP 500s (Flower's fixed 5 s SQLite busy_timeout), which failed the
    first run before round 1 twice, even with the file on tmpfs.  A fresh state also loses
    the SuperNodes' activation, so they are restarted too (stopped by PID first)."""
    out = tmp_path / "run-out"
    cfg = lean_config(lfw_root, out, 2, **{"stage2-rounds": 1})    # 1 + 1 rounds
    t0 = time.monotonic()
    with Federation(tmp_path / "fed", 2) as fed:
        fed.start_superlink()
        fed.register()
        fed.start_supernodes()
        fed.wait_online(2)
        first_run = fed.submit(cfg)

        def round_one_saved() -> bool:
            return [r["round"] for r in read_metrics(out)[0]] == [1]

        def ended_early() -> str:
            status = fed.finished(first_run)
            return f"run {first_run} ended ({status}) before round 1 was saved" \
                if status and not round_one_saved() else ""

        wait_for(round_one_saved, 600, "round 1's checkpoint", poll=0.2,
                 abort=lambda: fed.dead_supernode() or ended_early())
        killed_at = time.monotonic()
        old = fed.superlink
        fed.kill_group(old)                 # the SuperLink, its superexec and the ServerApp
        assert _group_gone(old.pid), "SuperLink / ServerApp still alive after SIGKILL"
        stop(fed.followers[first_run])
        fed.stop_supernodes()
        restart_seconds = fed.start_superlink()          # same port, fresh state
        fed.register()
        fed.start_supernodes()
        fed.wait_online(2)
        second_run = fed.submit(cfg)                      # same run config, same out-dir
        status = fed.wait_finished(second_run, 900)
        finished = time.monotonic()
        run_log = fed.run_log(second_run).read_text(errors="replace")
        pgids = fed.pgids()
    for pgid in pgids:
        assert _group_gone(pgid), f"process group {pgid} still alive"

    rounds, clients = read_metrics(out)
    _print(capsys, f"SuperLink restart: run {second_run} {status}; killed after "
                   f"{killed_at - t0:.0f} s, SuperLink back in {restart_seconds:.0f} s, resumed "
                   f"run done {finished - killed_at:.0f} s later; total {finished - t0:.0f} s")
    assert status == COMPLETED, f"{status}\n{run_log[-4000:]}"
    assert second_run != first_run
    assert "resuming after round 1" in run_log, run_log[-4000:]
    assert [(r["round"], r["stage"]) for r in rounds] == [(1, "stage1"), (2, "stage2")]
    assert sorted(c["round"] for c in clients) == [1, 1, 2, 2]       # nothing done twice
    assert all(c["client"]["accepted"] for c in clients)
    assert_honest_replies_accepted(out, every=True)
    assert_stage1_weights_moved(out)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 2
    assert (out / "final" / "generator.pt").exists()


# ---------------------------------------------------------------- 3. bad updates

@pytest.mark.slow
@pytest.mark.timeout(1800)    # its own waits (up to 900 s per run) fail first, with a reason
def test_nan_oversized_and_malformed_updates_are_rejected_round_goes_on(
        lfw_root, tmp_path, capsys):
    out = tmp_path / "run-out"
    faults = [None, "nan", "oversized", "extra-key"]
    cfg = lean_config(lfw_root, out, 4, **{"max-update-norm": 1e4})   # honest norms ~1e2
    result, ids, rounds, by_node = deploy_one_round(
        tmp_path, capsys, "bad updates", cfg, [{"fault": f} if f else {} for f in faults])
    assert set(by_node) == set(ids)
    honest = by_node[ids[0]]
    assert honest["accepted"] and honest["problems"] == []
    expected = {"nan": "non-finite value(s)", "oversized": "exceeds max_update_norm",
                "extra-key": "unexpected keys: 'fault.extra-key'"}
    for node_id, fault in zip(ids[1:], faults[1:]):
        entry = by_node[node_id]
        problems = " ".join(entry["problems"])
        assert not entry["accepted"] and expected[fault] in problems, (fault, entry)
        assert f"rejected reply from node {node_id}: " in result.log
    assert rounds[0]["metrics"]["dropped"] == []
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in ck["arrays"].values())
    assert "fault.extra-key" not in ck["arrays"]
    assert_honest_replies_accepted(out, every=True, honest={ids[0]})
    assert_stage1_weights_moved(out)
    # the deployed ServerApp (an HTTPS grid) retries a dropped TLS connection (runtime_link.py)
    assert "runtime link: a dropped TLS connection is retried" in result.log


# ---------------------------------------------------------------- 3b. hostile sites

@pytest.mark.slow
@pytest.mark.timeout(1800)    # its own waits (up to 900 s per run) fail first, with a reason
def test_hostile_sites_cannot_take_over_leak_or_stop_the_round(lfw_root, tmp_path, capsys):
    """Two honest sites and four hostile ones (clients/faults.py) on a TLS deployment: an
    over-weighted claim is rejected, an inflated one clipped, a 588 x 64-value metric leak
    rejected by the server, and a handler's leak stopped at its own site by the outbound guard,
    which sends only the fixed error reply.  The run completes and metrics.jsonl says why."""
    from clients.faults import LEAK_PREFIX
    out = tmp_path / "run-out"
    faults = [None, None, "overweight", "inflated", "leak-metrics", "handler-leak"]
    cfg = lean_config(lfw_root, out, len(faults))
    result, ids, rounds, by_node = deploy_one_round(
        tmp_path, capsys, "hostile sites", cfg, [{"fault": f} if f else {} for f in faults])
    assert set(by_node) == set(ids)
    honest = [by_node[i] for i in ids[:2]]
    assert all(e["accepted"] and e["problems"] == [] for e in honest), honest
    entry = dict(zip(faults[2:], (by_node[i] for i in ids[2:])))
    text = {k: " ".join(e["problems"] + e.get("notes", [])) for k, e in entry.items()}
    assert not entry["overweight"]["accepted"] and "exceeds max-num-examples" in text["overweight"]
    assert entry["inflated"]["accepted"] and "weight clipped from" in text["inflated"]
    median = sorted(e["weight"] for e in honest)
    assert entry["inflated"]["weight"] <= 4.0 * max(median) + 1e-9     # max-weight-ratio 4
    assert not entry["leak-metrics"]["accepted"] and "keys" in text["leak-metrics"]
    assert not entry["handler-leak"]["accepted"]
    assert "error reply (code 2): ClientApp failed; details are in the site's log" \
        in text["handler-leak"]
    logged = (out / "metrics.jsonl").read_text()
    assert logged.count(LEAK_PREFIX) <= 16 and len(logged) < 200_000   # the leak is not stored
    assert_honest_replies_accepted(out, every=True, honest=set(ids[:2]))
    assert_stage1_weights_moved(out)
    assert rounds[0]["metrics"]["dropped"] == []
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in ck["arrays"].values())


# ---------------------------------------------------------------- 4. bad site data

@pytest.mark.slow
@pytest.mark.timeout(1800)    # its own waits (up to 900 s per run) fail first, with a reason
def test_empty_and_corrupt_data_folders_fail_clearly_others_continue(lfw_root, tmp_path, capsys):
    """One deployment for both bad folders (each would cost a whole deployment alone)."""
    empty = tmp_path / "site-empty"
    empty.mkdir()
    corrupt = tmp_path / "site-corrupt"
    for person in ("Alice", "Bob"):
        (corrupt / person).mkdir(parents=True)
        for k in range(1, 4):
            (corrupt / person / f"{person}_{k:04d}.jpg").write_bytes(
                b"\xff\xd8\xff\xe0 not really a JPEG " + bytes(range(64)))
    out = tmp_path / "run-out"
    cfg = lean_config(lfw_root, out, 3)
    result, ids, rounds, by_node = deploy_one_round(
        tmp_path, capsys, "empty + corrupt data folders", cfg,
        [{}, {"data-path": str(empty)}, {"data-path": str(corrupt)}])
    logs = tmp_path / "deploy" / "logs"
    assert by_node[ids[0]]["accepted"]

    assert not by_node[ids[1]]["accepted"] and not by_node[ids[2]]["accepted"]
    # the server sees only the outbound guard's fixed error reply: a site's folder and file
    # names are its own; the full reason is in the site's log, where its operator reads it
    fixed = "error reply (code 2): ClientApp failed; details are in the site's log"
    for node in ids[1:]:
        assert by_node[node]["problems"] == [fixed]
        assert f"rejected reply from node {node}: {fixed}" in result.log
    assert str(empty) not in result.log and str(corrupt) not in result.log
    site_1 = (logs / "supernode-1.log").read_text(errors="replace")
    assert f"site data-path {empty} holds no face images (empty)" in site_1
    assert "expected one sub-folder per identity" in site_1
    site_2 = (logs / "supernode-2.log").read_text(errors="replace")
    assert f"images under {corrupt} could be decoded" in site_2
    assert "Alice_0001.jpg: corrupt or truncated image" in site_2
    assert rounds[0]["metrics"]["dropped"] == []       # they answered (with an error)
    assert_honest_replies_accepted(out, every=True, honest={ids[0]})
    assert_stage1_weights_moved(out)
    assert (out / "final" / "generator.pt").exists()


# ---------------------------------------------------------------- fast: the pieces

def _record(arrays: Mapping[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _tiny_arrays() -> dict[str, np.ndarray]:
    return {"generator.w": np.ones((2, 3), np.float32), "recognizer.b": np.zeros(3, np.float32),
            "recognizer.bn.num_batches_tracked": np.array(5, np.int64)}


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_fault_hook_corrupts_after_the_handler_only_from_node_config(task_identity):
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

    from clients.faults import EXTRA_KEY, inject_fault
    from strategy.validation import validate_update

    sent = _record(_tiny_arrays())
    calls = []

    def handler(msg: Message, context: Context) -> Message:
        calls.append(1)
        trained = {k: (v + 0.5 if v.dtype == np.float32 else v) for k, v in _tiny_arrays().items()}
        return Message(RecordDict({"arrays": _record(trained),
                                   "metrics": MetricRecord({"num-examples": 4})}), reply_to=msg)

    def run(node_config: dict, run_config: dict | None = None) -> Message:
        msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord({"lr": 0.1})}), 7,
                      "train", group_id="1")
        ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=run_config or {})
        return inject_fault(msg, ctx, handler)

    honest = run({"partition-id": 0})
    assert validate_update(honest.content["arrays"], sent, 10.0) == []
    # the run config (the server's side) cannot switch it on
    assert validate_update(run({}, {"fault": "nan"}).content["arrays"], sent, 10.0) == []

    expected = {"nan": "non-finite", "oversized": "exceeds max_update_norm",
                "extra-key": f"unexpected keys: '{EXTRA_KEY}'"}
    for fault, problem in expected.items():
        reply = run({"fault": fault})
        problems = validate_update(reply.content["arrays"], sent, 10.0)
        assert any(problem in p for p in problems), (fault, problems)
        counter = reply.content["arrays"]["recognizer.bn.num_batches_tracked"].numpy()
        assert counter == 5                          # integer buffers untouched
    before = len(calls)
    with pytest.raises(ValueError, match="fault='typo'"):
        run({"fault": "typo"})
    assert len(calls) == before                     # refused before training


def test_metric_faults_are_rejected_or_bounded_by_the_server(task_identity):
    """The hostile-site metric faults against the server's real reply checks and weighting."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

    from clients.faults import LEAK_KEYS, inject_fault, inject_handler_bug
    from strategy.validation import validate_reply_content

    sent = _record(_tiny_arrays())

    def handler(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": _record(_tiny_arrays()),
                                   "metrics": MetricRecord({"num-examples": 4})}), reply_to=msg)

    def run(mod, fault: str) -> Message:
        msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord({"lr": 0.1})}), 7,
                      "train", group_id="1")
        ctx = Context(run_id=1, node_id=7, node_config={"fault": fault}, state=RecordDict(),
                      run_config={})
        return mod(msg, ctx, handler)

    over = run(inject_fault, "overweight").content
    assert any("exceeds max-num-examples" in p
               for p in validate_reply_content(over, max_num_examples=1_000_000))
    inflated = run(inject_fault, "inflated").content["metrics"]["num-examples"]
    assert inflated == 4000 and validate_reply_content(run(inject_fault, "inflated").content) == []
    leak = run(inject_fault, "leak-metrics").content
    assert len(leak["metrics"]) == LEAK_KEYS + 1
    assert validate_reply_content(leak) != []
    # each hook ignores the other's faults: the outer one never plays a handler bug
    assert len(run(inject_fault, "handler-leak").content["metrics"]) == 1
    assert run(inject_handler_bug, "overweight").content["metrics"]["num-examples"] == 4
    assert len(run(inject_handler_bug, "handler-leak").content["metrics"]) == LEAK_KEYS + 1


def test_fault_is_not_a_run_config_key_and_round_timeout_is_checked():
    """Only a site's own node config switches the fault hook on (where it sits in the ClientApp
    is checked by behaviour in tests/test_clientapp_leaks.py)."""
    import tomllib

    from task.config import run_config
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert "fault" not in declared                                      # flwr run rejects it
    with pytest.raises(ValueError, match="run config 'fault': unknown key"):
        run_config({"fault": "overweight"})
    assert declared["round-timeout"] == run_config({}).round_timeout == 3600.0
    assert run_config({"round-timeout": 30}).round_timeout == 30.0
    with pytest.raises(ValueError, match="round-timeout"):
        run_config({"round-timeout": 0.0})


def test_dropped_and_silent_nodes_are_recorded_per_round(task_identity):
    """Node 2 dies (the SuperLink answers Node Unavailable for it), node 3 never answers."""
    from flwr.app import Error, Message, Metadata, MetricRecord, RecordDict
    from flwr.app.message.message import make_message
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
    from flwr.serverapp import Grid

    from strategy import make_strategy

    class Grid3(Grid):
        def set_run(self, run):
            raise NotImplementedError

        @property
        def run(self):
            raise NotImplementedError

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

        def get_node_ids(self):
            return [1001, 1002, 1003]

        def push_messages(self, messages):
            raise NotImplementedError

        def pull_messages(self, message_ids):
            raise NotImplementedError

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = msg.object_id    # as the real push does
                node = msg.metadata.dst_node_id
                if node == 1001:
                    arrays = _record({k: v.numpy() + 1 for k, v in msg.content["arrays"].items()})
                    replies.append(Message(RecordDict({
                        "arrays": arrays, "metrics": MetricRecord({"num-examples": 2})}),
                        reply_to=msg))
                elif node == 1002:
                    md = Metadata(run_id=1, message_id="x", src_node_id=SUPERLINK_NODE_ID,
                                  dst_node_id=SUPERLINK_NODE_ID,
                                  reply_to_message_id=msg.metadata.message_id, group_id="1",
                                  created_at=time.time(), ttl=10,
                                  message_type=msg.metadata.message_type)
                    replies.append(make_message(md, error=Error(
                        code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable")))
            return replies

    strategy = make_strategy(min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0)
    result = strategy.start(grid=Grid3(), initial_arrays=_record({"w": np.zeros(2, np.float32)}),
                            num_rounds=1, timeout=5)
    np.testing.assert_allclose(result.arrays["w"].numpy(), [1.0, 1.0])
    summary = result.report.node_summary()
    assert summary == {"nodes": {"train": {"sampled": [1001, 1002, 1003], "replied": [1001],
                                           "dropped": [1002, 1003], "silent": [1003]}},
                       "dropped": [1002, 1003]}
    assert strategy.take_report().nodes == []       # returned: the next round starts empty
    logged = {e["node_id"]: e for e in result.report.replies}
    assert logged[1002]["accepted"] is False and "Node Unavailable" in logged[1002]["problems"][0]
    assert SUPERLINK_NODE_ID not in logged               # mapped back to the node it was for
