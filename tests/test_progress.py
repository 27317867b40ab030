"""Live progress: one line per round from the ServerApp, Flower's per-round blocks kept out."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from flwr.common.logger import log
from flwr.supercore.task_identity import TaskIdentity

from federation.progress import RoundClock, duration, quiet_strategy
from simulation.launch import flwr_env
from tests.flower_log import FlowerLog

LINE = re.compile(r"minusfed: round (\d+)/(\d+) \| (stage[12]) (\d+)/(\d+) \| .+ elapsed \| "
                  r"(ETA .+|done) \| server accuracy \d+\.\d\d % \(AUC [0-9.]+, \d+ pairs\) \| "
                  r"sites (\d+)/(\d+) replied")


@pytest.fixture
def flower_log():
    handler = FlowerLog()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_quiet_strategy_drops_flowers_round_chatter_but_not_warnings(flower_log):
    with quiet_strategy():
        log(logging.INFO, "[ROUND %s/%s]", 1, 1)
        log(logging.INFO, "Final results:")
        log(logging.WARNING, "node 7 dropped")
        log(logging.INFO, "DP: released round, epsilon %.4f", 1.5)
    log(logging.INFO, "minusfed: after the round")
    assert flower_log.lines == ["node 7 dropped", "DP: released round, epsilon 1.5000",
                                "minusfed: after the round"]


def test_quiet_strategy_leaves_other_threads_alone(flower_log):
    """In a simulation the engine logs from its own threads (e.g. the actor pool it builds
    during round 1): those lines are not round chatter."""
    import threading

    with quiet_strategy():
        engine = threading.Thread(target=log, args=(logging.DEBUG, "Constructed ActorPool with: 2 actors"))
        engine.start()
        engine.join()
        log(logging.INFO, "[ROUND 1/1]")
    assert flower_log.lines == ["Constructed ActorPool with: 2 actors"]


def test_quiet_strategy_removes_its_filter_even_when_the_round_fails(flower_log):
    with pytest.raises(RuntimeError), quiet_strategy():
        raise RuntimeError("round failed")
    log(logging.INFO, "[ROUND 2/2]")
    assert flower_log.lines == ["[ROUND 2/2]"]


def test_eta_prices_each_remaining_round_at_its_own_stages_mean():
    plan = [("stage1", 1), ("stage1", 2), ("stage1", 3), ("stage2", 1), ("stage2", 2)]
    clock = RoundClock(plan)
    assert clock.eta(1) is None                    # nothing timed yet
    clock.record("stage1", 100.0)
    assert clock.eta(1) == pytest.approx(400.0)    # stage 2 not seen yet: the overall mean
    clock.record("stage1", 80.0)
    clock.record("stage1", 90.0)
    clock.record("stage2", 10.0)
    assert clock.eta(4) == pytest.approx(10.0)     # one stage-2 round left, at stage 2's mean
    line = clock.line(4, "stage2", 1, {"server_accuracy": 0.615, "server_auc": 0.66,
                                       "server_eval_pairs": 600,
                                       "nodes": {"train": {"sampled": [1, 2, 3],
                                                           "replied": [1, 3]}}})
    assert "round 4/5 | stage2 1/2 |" in line and "ETA 10 s" in line
    assert "server accuracy 61.50 % (AUC 0.660, 600 pairs) | sites 2/3 replied" in line
    assert "| done |" in clock.line(5, "stage2", 2, {"server_accuracy": float("nan")})


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]


@pytest.mark.slow
def test_federated_run_prints_one_progress_line_per_round_and_no_flower_blocks(
        lfw_root, tmp_path, flower_log, monkeypatch):
    from simulation.inprocess import run_inprocess

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    out = tmp_path / "run"
    run_inprocess({"preset": "tiny", "stage1-rounds": 1, "stage2-rounds": 1,
                   "data-path": str(lfw_root), "out-dir": str(out), "min-nodes": 2,
                   "max-identities": 8, "server-eval-pairs": 20, "fraction-evaluate": 0.0}, 2)
    progress = [m for m in map(LINE.search, flower_log.lines) if m]
    assert [(m[1], m[2], m[3]) for m in progress] == [("1", "2", "stage1"), ("2", "2", "stage2")]
    assert progress[0][6].startswith("ETA ") and progress[1][6] == "done"
    assert all(m[7] == m[8] == "2" for m in progress)
    text = "\n".join(flower_log.lines)
    for chatter in ("[ROUND", "Final results", "Starting", "configure_train", "aggregate_train"):
        assert chatter not in text
    # the report the run wrote embeds its pictures, and they exist
    report = (out / "report.md").read_text()
    for name in ("report-accuracy.png", "report-site-loss.png", "report-roc.png"):
        assert f"]({name})" in report and (out / name).stat().st_size > 5000


def test_demo_shows_progress_lines_and_warnings_but_not_flowers_chatter(capsys):
    from minusfed.demo import progress_printer

    show = progress_printer(0.0)
    for line in ["\x1b[92mINFO \x1b[0m:      minusfed: round 1/4 | stage1 1/2 | 42 s elapsed",
                 "\x1b[92mINFO \x1b[0m:      [ROUND 1/1]",
                 "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 4 nodes (out of 4)",
                 "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed "
                 "from 10 to 2.",
                 "\x1b[93mWARNING \x1b[0m:   node 3 dropped", "plain text from Ray"]:
        show(line)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].endswith("] minusfed: round 1/4 | stage1 1/2 | 42 s elapsed")
    assert out[1].endswith("] WARNING: node 3 dropped")


def test_demo_grid_people_come_from_the_held_out_fold(lfw_root):
    from clients.data import read_pairs
    from minusfed.demo import held_out_faces

    fold0 = {name for p in read_pairs(lfw_root / "pairs.txt") if p.fold == 0
             for name in (p.path_a, p.path_b)}
    faces = held_out_faces(lfw_root, 0, 6)
    assert len({f.parent.name for f in faces}) == 6
    assert all(str(f) in fold0 for f in faces)


@pytest.mark.slow
def test_ray_start_up_warning_is_silenced_in_the_simulations_environment(tmp_path):
    """Ray's driver warns at start-up with a FutureWarning whose text says "error message";
    the environment simulation.launch gives the SuperLink (and so the simulation) filters it."""
    ray_dir = tempfile.mkdtemp(prefix="mf-ray-", dir="/tmp")   # Ray's socket paths must be short
    script = ("import ray; ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, "
              f"_temp_dir={ray_dir!r}); ray.shutdown()")
    plain = {k: v for k, v in flwr_env(tmp_path).items() if k != "PYTHONWARNINGS"}
    said = {}
    try:
        for name, env in (("plain", plain), ("ours", flwr_env(tmp_path))):
            done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            said[name] = done.stdout + done.stderr
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert "turn off this error message" in said["plain"]      # the warning this is about
    assert "turn off this error message" not in said["ours"]
