"""A throw-away multi-node Ray cluster on one machine: a head and one worker node on loopback.

`flwr run` attaches its Ray backend to an existing cluster when `RAY_ADDRESS` is set in the
environment of the SuperLink that starts the run (see README, "Past one machine").  This helper
starts such a cluster with the real `ray start` CLI, the way an operator does on several
machines, so that tests can prove the simulation really spreads its ClientApp actors over
more than one Ray node:

    from simulation.launch import run_simulation
    from simulation.ray_cluster import LocalRayCluster

    with LocalRayCluster(num_cpus_head=1, num_cpus_worker=1) as cluster:
        result = run_simulation(cfg, num_supernodes=2, num_cpus=1, env=cluster.env())
        actors = cluster.actors("ClientAppActor")      # which Ray node ran which actor

Processes and clean-up.  Each `ray start` runs in a session of its own, and every process it
leaves behind (GCS, raylet, agents, log monitor, the ClientApp actors the raylet forks) stays
in that process group; each node also gets its own directory under a private temporary
directory.  On exit the helper ends exactly those processes, by PID (SIGTERM, then SIGKILL
after a grace period), and removes the temporary directory, also when the body raised.  It
does **not** run `ray stop`: that command ends every Ray process of the current user on the
machine, other clusters and other people's simulations included.  Pass
`ray_stop_all=True` to run `ray stop --force` as well (a CI machine that runs alone).

Ray quirks met on the way (Ray 2.55):
  * `--node-ip-address 127.0.0.1` is rewritten to the machine's routable address
    (`resolve_ip_for_localhost`); the GCS listens on all interfaces, so `127.0.0.1:PORT` still
    connects and both nodes report the same, routable, IP.
  * `--temp-dir` is accepted per node; short paths matter (Unix sockets live below it).  With a
    private one, `ray_current_cluster` is written there rather than in /tmp/ray, so other
    jobs' `ray.init()` on this machine do not auto-join this cluster (only `RAY_ADDRESS` does).
  * Two nodes on one machine would both default to the dashboard agent's fixed port 52365 and
    both count the machine's GPUs: the agent port is set to 0 (pick a free one) and the GPUs
    per node default to 0 here.
  * GCS and raylets often outlive SIGTERM by several seconds; after `stop_grace` they get
    SIGKILL (stopping takes about 5 s).
  * The state API (`ray list actors`, `ray.util.state`) needs the full dashboard, which
    `ray` without the `[default]` extra (what `flwr[simulation]` installs) lacks; `actors()`
    reads the GCS actor table through a short-lived driver instead.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
_MARK = "RAY_CLUSTER_JSON:"

# Runs in a separate interpreter: attaching a driver to the cluster from the caller's process
# would leave Ray initialised there (and could swallow its signal handlers).
_QUERY = r"""
import json, logging, sys, warnings
warnings.filterwarnings("ignore")
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
nodes = [{"node_id": n["NodeID"], "alive": bool(n["Alive"]), "ip": n["NodeManagerAddress"],
          "cpus": n.get("Resources", {}).get("CPU", 0.0),
          "gpus": n.get("Resources", {}).get("GPU", 0.0),
          "head": "node:__internal_head__" in n.get("Resources", {})} for n in ray.nodes()]
actors = None
if sys.argv[2] == "1":
    # ray.util.state (the public API) needs the dashboard; this reads the GCS actor table.
    from ray._private.state import actors as actor_table
    actors = [{"actor_id": k, "class_name": a.get("ActorClassName"), "state": a.get("State"),
               "node_id": (a.get("Address") or {}).get("NodeID"), "pid": a.get("Pid"),
               "job_id": a.get("JobID")} for k, a in actor_table().items()]
print("RAY_CLUSTER_JSON:" + json.dumps({"nodes": nodes, "actors": actors}), flush=True)
ray.shutdown()
"""


class RayClusterError(RuntimeError):
    """The local Ray cluster could not be started (the message includes the CLI's output)."""


def ray_cli() -> str | None:
    """The `ray` executable of this environment (next to the interpreter), else on PATH."""
    local = Path(sys.executable).parent / "ray"
    if local.exists():
        return str(local)
    return shutil.which("ray")


def free_port() -> int:
    """A TCP port free on all interfaces (the GCS binds 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _psutil():
    """psutil, which Ray vendors (ray/thirdparty_files) when it is not installed itself."""
    try:
        import psutil
    except ImportError:
        try:
            # ray first: importing it puts ray/thirdparty_files on sys.path (a function call,
            # so import sorting cannot move it after the psutil import)
            importlib.import_module("ray")
            import psutil
        except ImportError:
            return None
    return psutil


def still_running(pids: Sequence[int]) -> list[int]:
    """Those of `pids` that are running (zombies waiting to be reaped do not count)."""
    psutil = _psutil()
    if psutil is None:
        return [p for p in pids if os.path.exists(f"/proc/{p}")]
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            continue
    return out


class LocalRayCluster:
    """`ray start --head` plus one `ray start --address` worker, both on this machine.

    Use as a context manager.  `address` is "127.0.0.1:PORT"; `env()` is the environment to
    give the process that starts the SuperLink (`RAY_ADDRESS`).  Every step is bounded:
    `start_timeout` for each `ray start` and for the wait until both nodes are alive,
    `stop_grace` before SIGKILL on exit.  `port=None` picks a free port; `temp_dir=None` makes
    a private directory below /tmp that `stop()` removes (a given `temp_dir` is kept, with the
    nodes' logs under `head/` and `worker/`).  `stop()` also runs at interpreter exit if the
    caller forgot it (not when the process is killed by a signal).
    """

    def __init__(self, num_cpus_head: int = 1, num_cpus_worker: int = 1,
                 port: int | None = None, temp_dir: str | os.PathLike | None = None, *,
                 num_gpus_head: int = 0, num_gpus_worker: int = 0,
                 start_timeout: float = 120.0, stop_grace: float = 5.0,
                 ray_stop_all: bool = False,
                 head_args: Sequence[str] = (), worker_args: Sequence[str] = ()) -> None:
        self.num_cpus = (int(num_cpus_head), int(num_cpus_worker))
        self.num_gpus = (int(num_gpus_head), int(num_gpus_worker))
        self.port = int(port) if port else None
        self._own_temp = temp_dir is None
        self._temp_arg = temp_dir
        self.temp_dir: Path | None = None
        self.start_timeout = float(start_timeout)
        self.stop_grace = float(stop_grace)
        self.ray_stop_all = bool(ray_stop_all)
        self.head_args, self.worker_args = list(head_args), list(worker_args)
        self._groups: list[int] = []          # process groups created by our `ray start`s
        self._tracked: dict[int, object] = {}  # pid -> psutil.Process seen while running
        self._started = False
        self.start_seconds = 0.0

    # ------------------------------------------------------------------ public API
    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("cluster not started")
        return f"{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment additions that make `ray.init()` (Flower's Ray backend) attach here."""
        return {"RAY_ADDRESS": self.address}

    def nodes(self, timeout: float = 60.0) -> list[dict]:
        """All nodes the GCS knows: node_id, alive, ip, cpus, gpus, head."""
        return self._query(actors=False, timeout=timeout)["nodes"]

    def alive_nodes(self, timeout: float = 60.0) -> list[dict]:
        return [n for n in self.nodes(timeout) if n["alive"]]

    def actors(self, class_name: str | None = None, timeout: float = 60.0) -> list[dict]:
        """Actors of this cluster, dead ones included (the GCS keeps them): actor_id,
        class_name, state, node_id, pid, job_id; optionally only one class."""
        found = self._query(actors=True, timeout=timeout)["actors"] or []
        return [a for a in found if class_name is None or a["class_name"] == class_name]

    def state(self, timeout: float = 60.0) -> dict:
        """One snapshot through a single short-lived driver: {"nodes": [...], "actors": [...]}."""
        return self._query(actors=True, timeout=timeout)

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        if self._started:
            raise RuntimeError("cluster already started")
        ray = ray_cli()
        if ray is None:
            raise RayClusterError("the `ray` CLI was not found (pip install 'flwr[simulation]')")
        self._started = True
        atexit.register(self.stop)
        t0 = time.monotonic()
        try:
            if self._own_temp:
                # short (Ray puts Unix sockets below it; 108-byte limit): /tmp, not $TMPDIR
                short = "/tmp" if os.path.isdir("/tmp") else None
                self.temp_dir = Path(tempfile.mkdtemp(prefix="mfray-", dir=short))
            else:
                self.temp_dir = Path(self._temp_arg)
                self.temp_dir.mkdir(parents=True, exist_ok=True)
            self.port = self.port or free_port()
            common = ["--node-ip-address", LOOPBACK, "--disable-usage-stats",
                      "--dashboard-agent-listen-port", "0"]
            self._ray_start("head", [
                ray, "start", "--head", "--port", str(self.port),
                "--num-cpus", str(self.num_cpus[0]), "--num-gpus", str(self.num_gpus[0]),
                "--temp-dir", str(self.temp_dir / "head"), "--include-dashboard", "false",
                "--dashboard-port", str(free_port()),
                "--ray-client-server-port", str(free_port()), *common, *self.head_args])
            self._ray_start("worker", [
                ray, "start", "--address", self.address,
                "--num-cpus", str(self.num_cpus[1]), "--num-gpus", str(self.num_gpus[1]),
                "--temp-dir", str(self.temp_dir / "worker"), *common, *self.worker_args])
            self._wait_for_nodes(2, sum(self.num_cpus), t0 + self.start_timeout)
            self._track()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def _start_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    def _ray_start(self, role: str, cmd: list[str]) -> None:
        assert self.temp_dir is not None
        log = self.temp_dir / f"ray-start-{role}.log"
        with open(log, "wb") as out:
            # a new session: everything this `ray start` daemonises stays in its group
            proc = subprocess.Popen(cmd, env=self._start_env(), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self._groups.append(proc.pid)
        try:
            code = proc.wait(self.start_timeout)
        except subprocess.TimeoutExpired:
            raise RayClusterError(f"`ray start` ({role}) did not return within "
                                  f"{self.start_timeout:.0f} s:\n{_tail(log)}") from None
        finally:
            self._track()
        if code != 0:
            raise RayClusterError(f"`ray start` ({role}) failed with exit code {code}:\n"
                                  f"{_tail(log)}")

    def _wait_for_nodes(self, count: int, cpus: float, deadline: float) -> None:
        last: object = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RayClusterError(f"Ray cluster at {self.address} did not show {count} "
                                      f"alive nodes with {cpus} CPUs in time; last: {last}")
            try:
                alive = self.alive_nodes(timeout=max(5.0, min(60.0, remaining)))
                last = alive
                if len(alive) >= count and sum(n["cpus"] for n in alive) >= cpus:
                    return
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                last = err
            time.sleep(1.0)

    def _query(self, actors: bool, timeout: float) -> dict:
        proc = subprocess.run([sys.executable, "-c", _QUERY, self.address, "1" if actors else "0"],
                              env=self._start_env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        for line in proc.stdout.splitlines():
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK):])
        raise RuntimeError(f"Ray cluster query failed (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-2000:]}")

    # ------------------------------------------------------------------ stop
    def _ours(self) -> dict[int, object]:
        """Processes of this cluster: members of our process groups, anything whose command
        line names our temp dir, and all their descendants."""
        psutil = _psutil()
        if psutil is None:
            return {}
        me = os.getpid()
        # this cluster's session directories only (never a bare, possibly shared, temp dir)
        markers = ([f"{self.temp_dir / role}{os.sep}session_" for role in ("head", "worker")]
                   if self.temp_dir else [])
        found: dict[int, object] = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid == me:
                    continue
                in_group = os.getpgid(p.pid) in self._groups
                named = any(m in a for a in (p.info["cmdline"] or []) for m in markers)
                if in_group or named:
                    found[p.pid] = p
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        for p in list(found.values()):
            try:
                for c in p.children(recursive=True):
                    if c.pid != me:
                        found.setdefault(c.pid, c)
            except psutil.Error:
                continue
        return found

    def _track(self) -> None:
        self._tracked.update(self._ours())

    def pids(self) -> list[int]:
        """PIDs of this cluster's processes that are running now."""
        return sorted(p.pid for p in self._alive(self._ours().values()))

    @staticmethod
    def _alive(procs) -> list:
        psutil = _psutil()
        out = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def stop(self) -> None:
        """End this cluster's processes by PID and remove the private temp dir (idempotent)."""
        if not self._started:
            return
        self._started = False
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001 - interpreter shutting down
            pass
        psutil = _psutil()
        if psutil is not None:
            procs = {**self._tracked, **self._ours()}
            procs.pop(os.getpid(), None)
            for sig, wait in ((signal.SIGTERM, self.stop_grace), (signal.SIGKILL, 5.0)):
                living = self._alive(procs.values())
                if not living:
                    break
                for p in living:
                    try:
                        p.send_signal(sig)           # psutil refuses a reused PID
                    except psutil.Error:
                        pass
                deadline = time.monotonic() + wait
                while self._alive(living) and time.monotonic() < deadline:
                    time.sleep(0.2)
        else:                                        # no psutil: our process groups only
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for g in self._groups:
                    try:
                        os.killpg(g, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
                time.sleep(self.stop_grace if sig == signal.SIGTERM else 1.0)
        if self.ray_stop_all and ray_cli():
            # ends EVERY Ray process of this user on this machine, not only this cluster's
            subprocess.run([ray_cli(), "stop", "--force"], capture_output=True, timeout=60,
                           env=self._start_env())
        self._groups.clear()
        self._tracked.clear()
        if self._own_temp and self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no output)"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m simulation.ray_cluster [--head-cpus N --worker-cpus M]`: start a loopback
    head + worker, print the address and nodes, wait for Ctrl-C or SIGTERM, then stop them."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--head-cpus", type=int, default=1)
    ap.add_argument("--worker-cpus", type=int, default=1)
    args = ap.parse_args(argv)

    def interrupt(signum, frame):               # SIGTERM, and SIGINT even where inherited
        raise KeyboardInterrupt                 # as ignored (background jobs): clean up

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    with LocalRayCluster(args.head_cpus, args.worker_cpus) as cluster:
        print(f"RAY_ADDRESS={cluster.address}")
        print(json.dumps(cluster.alive_nodes(), indent=1))
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

