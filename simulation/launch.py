"""Scripted simulations through the real `flwr run` path (Ray), with a private SuperLink.

Flower's deprecated `run_simulation()` passes an empty run config; this entry point instead
starts its own `flower-superlink --simulation` on free loopback ports with a private
`FLWR_HOME`, submits the app with `flwr run APP CONN -c ... --federation-config ...`, follows the
log, reads the run's final status (`flwr run --stream` exits 0 even when the ServerApp fails)
and stops the SuperLink by PID.  Used by tests, benchmarks and `make demo`.

    from simulation.launch import run_simulation
    result = run_simulation({"preset": "tiny", "out-dir": "/abs/out"}, num_supernodes=4)
    assert result.status == "finished:completed"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "minusfed-sim"
# Ray's driver warns at start-up, as a FutureWarning whose text says "turn off this error
# message", that a future Ray will stop hiding GPUs from actors asked for none.  Nothing is
# wrong, and opting in (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0) would let CPU-only sites see the
# GPU, so the warning itself is filtered in the processes the SuperLink starts.
RAY_WARNING_FILTER = "ignore::FutureWarning:ray._private.worker"


@dataclass
class SimulationResult:
    run_id: int
    status: str
    details: str
    seconds: float
    log: str = field(repr=False)
    flwr_home: Path | None = None

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))            # a TOML basic string


def config_arg(config: Mapping[str, object]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def flwr_bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def flwr_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PYTHONUNBUFFERED": "1",
                "PYTHONWARNINGS": ",".join(w for w in (env.get("PYTHONWARNINGS"),
                                                       RAY_WARNING_FILTER) if w),
                # the SuperLink spawns flower-superexec by name: the venv's bin must be on PATH
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra or {})
    return env


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SuperLink exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"SuperLink not healthy at {url} after {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process we started, by its PID (and its process group: flower-superexec)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def submit_run(app_dir: Path, connection: str, env: Mapping[str, str],
               run_config: Mapping[str, object],
               federation_config: Mapping[str, object] | None = None,
               error: type[Exception] = RuntimeError) -> int:
    """`flwr run APP CONNECTION`; the run id, or `error` with what flwr printed."""
    cmd = [flwr_bin("flwr"), "run", str(app_dir), connection, "--format", "json",
           "--run-config", config_arg(run_config)]
    if federation_config:
        cmd += ["--federation-config", config_arg(federation_config)]
    submitted = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=300)
    try:
        return int(json.loads(submitted.stdout)["run-id"])
    except (ValueError, KeyError, TypeError):
        raise error(f"flwr run failed (exit {submitted.returncode}):\n"
                    f"{submitted.stdout}\n{submitted.stderr}") from None


def run_status(run_id: int, connection: str, env: Mapping[str, str],
               error: type[Exception] = RuntimeError) -> dict:
    """The run's `flwr ls --format json` entry (status, status-details, ...)."""
    listing = subprocess.run([flwr_bin("flwr"), "ls", connection, "--run-id", str(run_id),
                              "--format", "json"], env=dict(env), capture_output=True,
                             text=True, timeout=60)
    try:
        return dict(json.loads(listing.stdout)["runs"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        raise error(f"flwr ls failed (exit {listing.returncode}):\n"
                    f"{listing.stdout}\n{listing.stderr}") from None


def follow_log(cmd: list[str], env: Mapping[str, str], on_line: Callable[[str], None],
               timeout: float) -> str:
    """Run `flwr log --stream`, handing each line to `on_line` as it comes; the whole log."""
    lines: list[str] = []
    proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            on_line(line.rstrip("\n"))
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        stop(proc)
    return "".join(lines)


def run_simulation(run_config: Mapping[str, object], num_supernodes: int = 2, *,
                   app_dir: Path = ROOT, num_cpus: int = 1, num_gpus: float = 0.0,
                   federation_extra: Mapping[str, object] | None = None,
                   flwr_home: Path | None = None, timeout: float = 1800.0,
                   env: Mapping[str, str] | None = None, echo: bool = False,
                   on_line: Callable[[str], None] | None = None) -> SimulationResult:
    """Run the app once on a private simulation SuperLink; always stops what it started.
    `on_line` sees each line of the run's log as it arrives (make demo's progress)."""
    keep_home = flwr_home is not None
    home = Path(flwr_home or tempfile.mkdtemp(prefix="minusfed-flwr-"))
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    environment = flwr_env(home, env)
    log_path = home / "superlink.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log_file:
        superlink = subprocess.Popen(
            [flwr_bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(port), "--disable-runtime-dependency-installation",
             "--database", str(home / "state.db")],
            env=environment, cwd=str(app_dir), stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", superlink, 60)
        subprocess.run([flwr_bin("flwr"), "config", "list"], env=environment, check=True,
                       capture_output=True)
        with open(home / "config.toml", "a", encoding="utf-8") as f:
            f.write(f'\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        fed = {"num-supernodes": num_supernodes, "client-resources-num-cpus": num_cpus,
               "client-resources-num-gpus": num_gpus, **(federation_extra or {})}
        run_id = submit_run(app_dir, CONNECTION, environment, run_config, fed)
        log_cmd = [flwr_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"]
        if on_line is None:
            logs = subprocess.run(log_cmd, env=environment, capture_output=not echo, text=True,
                                  timeout=timeout)
            text = (logs.stdout or "") + (logs.stderr or "")
        else:
            text = follow_log(log_cmd, environment, on_line, timeout)
        run = run_status(run_id, CONNECTION, environment)
        return SimulationResult(run_id=run_id, status=str(run.get("status")),
                                details=str(run.get("status-details", "")),
                                seconds=time.perf_counter() - t0, log=text,
                                flwr_home=home if keep_home else None)
    finally:
        stop(superlink)
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m simulation.launch key=value ... [--nodes N]`: one run, exit 0 iff completed."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("config", nargs="*", help="run-config entries key=value (TOML values)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=1)
    ap.add_argument("--num-gpus", type=float, default=0.0)
    args = ap.parse_args(argv)
    cfg = tomllib.loads("\n".join(args.config)) if args.config else {}
    result = run_simulation(cfg, args.nodes, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                            echo=True)
    print(f"run {result.run_id}: {result.status} {result.details} ({result.seconds:.1f} s)")
    return 0 if result.completed else 1


if __name__ == "__main__":
    sys.exit(main())
