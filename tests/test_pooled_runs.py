"""Pooled stage 2 end to end (slow): Ray Train surviving a killed worker and a killed job, and
a whole `flwr run` with four LFW sites that ship X_p and a server that trains f_p on Ray Train.
The fast tests of the upload, guard, screening and spool are in tests/test_pooled.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from minusface.presets import get_preset
from strategy.pooled_train import PROGRESS, RESULT, PooledJob, run_pooled_training
from strategy.spool import Spool, check_upload

pytestmark = pytest.mark.slow


def _spool(root: Path, per_chunk: int = 200) -> list[str]:
    """Two sites of synthetic X_p (mechanics only: no accuracy is read from them)."""
    spool = Spool(root / "spool")
    rng = np.random.default_rng(0)
    for site_token in (1, 2):
        for chunk in range(2):
            xp = rng.random((per_chunk, 3, 112, 112)).astype(np.float16)
            labels = (np.arange(per_chunk) % 4 + 10 * site_token + 1).astype(np.int64)
            said = {"chunk": chunk, "chunks": 2, "images": per_chunk, "copies": 1,
                    "identities": 4, "site-token": site_token}
            spool.put(check_upload(xp, labels, said, chunk=chunk, chunk_images=per_chunk,
                                   copies=1, max_images=10**6), node=site_token)
    return sorted(spool.sites())


def _epochs(folder: Path) -> list[int]:
    path = folder / PROGRESS
    if not path.exists():
        return []
    return [json.loads(x)["epoch"] for x in path.read_text().splitlines()]


def _wait_for_epoch(folder: Path, epoch: int, runner: threading.Thread, limit: float = 600) -> None:
    deadline = time.monotonic() + limit
    while epoch not in _epochs(folder):
        assert runner.is_alive(), f"the job ended before epoch {epoch}: {_epochs(folder)}"
        assert time.monotonic() < deadline, f"no epoch {epoch} after {limit} s"
        time.sleep(0.5)


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.timeout(1500)
def test_ray_train_resumes_after_a_killed_worker_and_a_killed_job(tmp_path):
    sites = _spool(tmp_path)
    job = PooledJob(spool=str(tmp_path / "spool"), sites=sites,
                    preset=get_preset("tiny").to_dict(), epochs=4, seed=1, workers=2,
                    gpus_per_worker=0.0, folder=str(tmp_path))
    outcome: dict[str, object] = {}

    def first_try() -> None:
        try:
            run_pooled_training(job, poll_seconds=0.5)
        except RuntimeError as e:
            outcome["error"] = str(e)

    runner = threading.Thread(target=first_try)
    runner.start()
    try:
        _wait_for_epoch(tmp_path, 1, runner)
        time.sleep(2)                                   # inside epoch 2
        workers = _pids("ray::RayTrainWorker")
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)             # one DDP worker dies
        _wait_for_epoch(tmp_path, 2, runner)            # Ray Train replaced it and went on
        assert "Error count: 1" in (tmp_path / "train.log").read_text(errors="replace")
        time.sleep(2)                                   # inside epoch 3
        assert len(_pids(f"strategy.pooled_train {tmp_path}/job.json")) == 1
        # a restarted ServerApp (the first one "killed" while its job runs on): it stops the
        # job left running, then Ray Train resumes from the last epoch's checkpoint
        state = run_pooled_training(job, poll_seconds=0.5)
    finally:
        runner.join(600)
    assert "error" in outcome and "pooled training failed" in str(outcome["error"])
    assert _epochs(tmp_path) == [1, 2, 3, 4]            # resumed at 3, no epoch repeated
    assert (tmp_path / RESULT).is_file() and state and all(k.count(".") for k in state)
    assert not any(k.startswith("head") for k in state)   # the server's head stays in its job


@pytest.mark.timeout(2400)
def test_flwr_run_pooled_stage2_four_lfw_sites_two_ray_train_workers(lfw_root, tmp_path):
    from simulation.launch import run_simulation
    from tests.test_federation import tiny_config
    out = tmp_path / "pooled-out"
    cfg = tiny_config(lfw_root, out, **{"min-nodes": 4, "max-identities": 16,
                                        "stage2-mode": "pooled", "pooled-workers": 2,
                                        "upload-chunk-images": 8})
    t0 = time.time()
    result = run_simulation(cfg, num_supernodes=4, num_cpus=1, timeout=1800)
    print(f"\nflwr run (pooled): {result.status} in {time.time() - t0:.1f} s")
    assert result.completed, result.details + result.log[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    uploads = [r for r in lines if r.get("stage") == "stage2-upload"]
    assert len(uploads) == 4 and all(u["complete"] and u["refused"] == 0 for u in uploads)
    assert len({u["site"] for u in uploads}) == 4
    assert all(u["xp_images"] == 3 * u["faces"] and u["spooled_bytes"] > 0 for u in uploads)
    rounds = [r for r in lines if "metrics" in r and "client" not in r]
    assert [(r["round"], r["stage"]) for r in rounds] == [(1, "stage1"), (2, "stage2")]
    pooled = rounds[-1]["metrics"]
    assert pooled["pooled_sites"] == 4 and pooled["clients_evaluate_replied"] == 4
    assert pooled["pooled_shared_tokens"] == 0
    assert np.isfinite(pooled["server_auc"])
    assert _epochs(out / "pooled") == [1]
    # what the server holds: X_p and random tokens, never a name of the sites' people
    spool = Spool(out / "pooled" / "spool")
    names = {p.name for p in (lfw_root / "images").iterdir()}
    tokens: list[set[int]] = []
    for site in spool.sites():
        for xp_file, label_file in spool.chunk_files(site):
            assert np.load(xp_file, allow_pickle=False).dtype == np.float16
            tokens.append(set(np.load(label_file, allow_pickle=False).tolist()))
    assert not {str(t) for s in tokens for t in s} & names
    files = " ".join(p.name for p in (out / "pooled").rglob("*"))
    assert not any(name in files for name in names if len(name) > 6)
    report = (out / "report.md").read_text()
    assert "what left each site" in report
    assert (out / "final" / "card.json").is_file()


class ServerKilled(BaseException):
    """Stands for the ServerApp process dying mid-upload (not an Exception: nothing catches it)."""


@pytest.mark.timeout(1500)
def test_a_restarted_serverapp_asks_only_for_the_chunks_it_lacks(lfw_root, tmp_path, monkeypatch):
    import simulation.inprocess as ip
    from clients.pseudonyms import forget_pseudonyms
    from tests.test_federation import tiny_config
    out = tmp_path / "run"
    cfg = tiny_config(lfw_root, out, **{"stage2-mode": "pooled", "pooled-workers": 2,
                                        "upload-chunk-images": 8})
    original = ip.InProcessGrid.send_and_receive
    asked: list[tuple[int, int]] = []
    budget = {"waves": 2}

    def send(self, messages, *, timeout=None):
        messages = list(messages)
        uploads = [m for m in messages if m.metadata.message_type == "query.pooled_upload"]
        if uploads and budget["waves"] == 0:
            raise ServerKilled
        if uploads:
            budget["waves"] -= 1
            asked.extend((m.metadata.dst_node_id, int(m.content["config"]["chunk"]))
                         for m in uploads)
        return original(self, messages, timeout=timeout)

    monkeypatch.setattr(ip.InProcessGrid, "send_and_receive", send)
    with pytest.raises(ServerKilled):
        ip.run_inprocess(cfg, 2)
    spool = Spool(out / "pooled" / "spool")
    before = {s: u.have for s, u in spool.sites().items()}
    assert sorted(len(h) for h in before.values()) == [2, 2]
    first = {s: (out / "pooled" / "spool" / s / "chunk-000001.xp.npy").read_bytes() for s in before}
    chunks = {s: u.chunks for s, u in spool.sites().items()}
    assert all(c > 2 for c in chunks.values())

    forget_pseudonyms()                             # the sites restart too: tokens from state-dir
    asked.clear()
    budget["waves"] = 10**6
    ip.run_inprocess(cfg, 2)
    after = spool.sites()
    assert set(after) == set(before) and all(u.complete for u in after.values())
    # chunk 0 again per site (to learn which site a node is), then only the missing ones
    assert len(asked) == 2 + sum(chunks[s] - 2 for s in chunks)
    assert all(c not in (1,) for _, c in asked)
    for s, data in first.items():                   # what was spooled stays as it was
        assert (out / "pooled" / "spool" / s / "chunk-000001.xp.npy").read_bytes() == data
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in lines if "metrics" in r and "client" not in r]
    assert [(r["round"], r["stage"]) for r in rounds] == [(1, "stage1"), (2, "stage2")]
    assert rounds[-1]["metrics"]["pooled_sites"] == 2
    # each site labelled every chunk with one token set: no identity split in two by a restart
    for s, u in after.items():
        tokens = set()
        for _, label_file in spool.chunk_files(s):
            tokens |= set(np.load(label_file, allow_pickle=False).tolist())
        assert len(tokens) == u.identities


@pytest.mark.timeout(1500)
def test_switching_a_federated_run_to_pooled_keeps_its_trained_generator(lfw_root, tmp_path,
                                                                        monkeypatch):
    """A run resumed from a federated stage-2 checkpoint with stage2-mode = "pooled": the sites
    protect with the run's stage-1 g (the checkpoint's frozen g), never a fresh one."""
    import torch

    import simulation.inprocess as ip
    from tests.test_federation import tiny_config
    out = tmp_path / "run"
    ip.run_inprocess(tiny_config(lfw_root, out), 2)                 # stage 1 + 1 federated round
    trained = {k: v for k, v in torch.load(out / "checkpoint.pt", weights_only=True)["arrays"]
               .items() if k.startswith("generator.")}
    sent: list[dict] = []
    original = ip.InProcessGrid.send_and_receive

    def record(self, messages, *, timeout=None):
        messages = list(messages)
        sent.extend(m.content["frozen-generator"].to_torch_state_dict() for m in messages
                    if m.metadata.message_type == "query.pooled_upload")
        return original(self, messages, timeout=timeout)

    monkeypatch.setattr(ip.InProcessGrid, "send_and_receive", record)
    ip.run_inprocess(tiny_config(lfw_root, out, **{"stage2-rounds": 2, "stage2-mode": "pooled",
                                                   "upload-chunk-images": 64}), 2)
    assert sent and all(set(g) == set(trained) and all(torch.equal(g[k], trained[k]) for k in g)
                        for g in sent)
    card = json.loads((out / "final" / "card.json").read_text())
    assert "pooled" in json.dumps(card)
