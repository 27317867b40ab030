"""The operator's deployment as documented, rehearsed on loopback (slow): `minusfed deploy plan`
writes the certificates, keys, connection and per-host scripts, and this test runs those scripts
the way the README and HOSTS.md say (SuperLink, register, two sites with their own face folders
and names, run) and reads the final status from `run.sh`'s own output.

Processes are started in their own process groups and stopped by PID; FLWR_HOME is the plan's
private folder; every port is a free loopback port."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from federation.deploy.local import wait_healthy_tls
from simulation.launch import ROOT, free_port, stop
from tests.run_outcome import assert_honest_replies_accepted

pytestmark = pytest.mark.slow


def _site_folder(lfw_root: Path, dest: Path, names: list[str]) -> Path:
    """A site's own folder-per-identity tree (links to LFW images; nothing is copied)."""
    for name in names:
        (dest / name).mkdir(parents=True)
        for image in sorted((lfw_root / "images" / name).iterdir())[:6]:
            (dest / name / image.name).symlink_to(image)
    return dest


def _people(lfw_root: Path, n: int) -> list[str]:
    """Identities with at least 4 images, outside the server benchmark's fold is not needed:
    the sites' folders are theirs (a real site does not hold LFW's folds)."""
    out = []
    for folder in sorted((lfw_root / "images").iterdir()):
        if len(list(folder.iterdir())) >= 4:
            out.append(folder.name)
        if len(out) == n:
            return out
    raise AssertionError("not enough LFW identities with 4 images")


@pytest.mark.timeout(1800)
def test_the_documented_deployment_runs_on_loopback(lfw_root, tmp_path):
    plan = tmp_path / "plan"
    port, base = free_port(), free_port()
    out_dir = tmp_path / "run-out"
    run_config = (f'preset="tiny" stage1-rounds=1 stage2-rounds=1 server-eval-pairs=20 '
                  f'data-path="{lfw_root}" out-dir="{out_dir}"')
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "PYTHON": sys.executable}
    env.pop("FLWR_HOME", None)                       # the scripts use the plan's own
    made = subprocess.run([str(Path(bin_dir) / "minusfed"), "deploy", "plan", str(plan),
                           "--sites", "2", "--host", "localhost", "--port", str(port),
                           "--app", str(ROOT), "--site-port-base", str(base),
                           "--run-config", run_config],
                          env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    hosts = (plan / "HOSTS.md").read_text()
    assert "ca.key" in hosts and "site-1.sh" in hosts
    people = _people(lfw_root, 16)
    procs: list[subprocess.Popen] = []

    def start(script: str, log: str, **extra: str) -> subprocess.Popen:
        with open(tmp_path / log, "wb") as f:
            proc = subprocess.Popen(["bash", str(plan / script)], env={**env, **extra},
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        superlink = start("superlink.sh", "superlink.log")
        wait_healthy_tls(f"https://127.0.0.1:{port}/health", superlink, 120,
                         cafile=plan / "certs" / "ca.crt")
        reg = subprocess.run(["bash", str(plan / "register.sh")], env=env, capture_output=True,
                             text=True, timeout=300)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        for i, name in enumerate(("bank-a", "hospital-b")):
            data = _site_folder(lfw_root, tmp_path / f"site{i}-faces", people[8 * i:8 * i + 8])
            start(f"site-{i}.sh", f"site-{i}.log", SITE_DATA=str(data), SITE_NAME=name,
                  OMP_NUM_THREADS="1")
        time.sleep(5)
        run = subprocess.run(["bash", str(plan / "run.sh")], env=env, capture_output=True,
                             text=True, timeout=1500)
        starts = [m.start() for m in re.finditer(r"^\{$", run.stdout, re.M)]   # flwr ls JSON
        assert starts, run.stdout[-3000:] + run.stderr[-2000:]
        runs = json.loads(run.stdout[starts[-1]:])["runs"]
        status = runs[-1]["status"]
        logs = "".join((tmp_path / f).read_text(errors="replace")[-1500:]
                       for f in ("superlink.log", "site-0.log", "site-1.log"))
        assert status == "finished:completed", run.stdout[-3000:] + run.stderr[-2000:] + logs
    finally:
        for proc in reversed(procs):
            stop(proc)
    names = json.loads((out_dir / "sites.json").read_text())
    assert sorted(names.values()) == ["bank-a", "hospital-b"]
    assert_honest_replies_accepted(out_dir, every=True)
    assert "| bank-a |" in (out_dir / "report.md").read_text()
