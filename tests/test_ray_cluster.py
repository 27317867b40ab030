"""Past one machine: the real `flwr run` simulation on a two-node Ray cluster (loopback).

The test starts `ray start --head` (1 CPU) and one `ray start --address` worker (1 CPU) with
`simulation.ray_cluster.LocalRayCluster`, then runs the app through a private SuperLink whose
environment carries `RAY_ADDRESS`, so Flower's Ray backend attaches to that cluster instead of
starting its own.  With one CPU per node and one CPU per ClientApp, Flower's actor pool holds
exactly one actor per node; the GCS actor table then shows where each `ClientAppActor` ran.
"""
from __future__ import annotations

import json
import re
import threading
import time

import pytest

from simulation.ray_cluster import LocalRayCluster, ray_cli, still_running
from tests.run_outcome import assert_honest_replies_accepted, assert_stage1_weights_moved

ACTOR = "ClientAppActor"            # flwr.simulation.ray_transport.ray_actor.ClientAppActor


def _sample_while(cluster: LocalRayCluster, done: threading.Event, seen: list[dict],
                  every: float = 4.0) -> None:
    """Until `done` (or ClientApp actors are seen alive on two nodes): snapshot the cluster."""
    while not done.wait(every):
        try:
            snap = cluster.state(timeout=60)
        except Exception:  # noqa: BLE001 - a missed sample is not a failure of the run
            continue
        alive_nodes = {n["node_id"] for n in snap["nodes"] if n["alive"]}
        live = {a["node_id"] for a in snap["actors"] or []
                if a["class_name"] == ACTOR and a["state"] == "ALIVE"}
        seen.append({"alive_nodes": alive_nodes, "actor_nodes": live})
        if len(live) >= 2:
            return


@pytest.mark.slow
@pytest.mark.timeout(1800)    # its own waits (up to 900 s per run) fail first, with a reason
def test_flwr_run_on_a_two_node_ray_cluster(lfw_root, tmp_path):
    if ray_cli() is None:
        pytest.skip("the `ray` CLI is not installed (pip install 'flwr[simulation]')")
    from simulation.launch import run_simulation
    from tests.test_federation import tiny_config

    out = tmp_path / "out"
    t0 = time.time()
    with LocalRayCluster(num_cpus_head=1, num_cpus_worker=1) as cluster:
        started = time.time() - t0
        nodes = cluster.alive_nodes()
        assert len(nodes) == 2 and len({n["node_id"] for n in nodes}) == 2, nodes
        assert sorted(n["head"] for n in nodes) == [False, True], nodes
        assert sum(n["cpus"] for n in nodes) == 2, nodes
        node_ids = {n["node_id"] for n in nodes}

        done, seen = threading.Event(), []
        sampler = threading.Thread(target=_sample_while, args=(cluster, done, seen), daemon=True)
        sampler.start()
        try:
            result = run_simulation(
                tiny_config(lfw_root, out, **{"min-nodes": 2, "max-identities": 8}),
                num_supernodes=2, num_cpus=1, env=cluster.env(),
                federation_extra={"verbose": True}, timeout=900)
        finally:
            done.set()
            sampler.join(90)
        ran = time.time() - t0 - started
        after = cluster.state()
        pids = cluster.pids()
    print(f"\ncluster up in {started:.1f} s; flwr run {result.status} in {ran:.1f} s; "
          f"total {time.time() - t0:.1f} s; {len(seen)} samples, last {seen[-1:]}")

    assert result.completed, result.details + result.log[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines if "client" not in r] == [1, 2]
    assert len({r["client"]["node_id"] for r in lines if "client" in r}) == 2
    assert_honest_replies_accepted(out, every=True)
    assert_stage1_weights_moved(out)

    # Flower sized its actor pool from the cluster: 1 CPU per ClientApp, 2 CPUs over 2 nodes
    # (logged at DEBUG, shown because of `verbose=true`).
    pool = re.findall(r"Constructed ActorPool with: (\d+) actors", result.log)
    assert pool == ["2"], result.log[-3000:]

    # During the run both nodes were alive and each hosted a live ClientApp actor.
    assert any(s["actor_nodes"] == node_ids and s["alive_nodes"] == node_ids for s in seen), seen
    # Afterwards the GCS actor table (dead actors are kept) shows the same thing, and both
    # nodes are still alive: the run attached to this cluster and did not start its own Ray.
    actors = [a for a in after["actors"] if a["class_name"] == ACTOR]
    assert {a["node_id"] for a in actors} == node_ids, actors
    assert {n["node_id"] for n in after["nodes"] if n["alive"]} == node_ids, after["nodes"]
    assert pids                                       # the cluster's processes were tracked
    # ... and stopping the cluster left none of them behind.
    assert not still_running(pids) and not cluster.temp_dir.exists()


def test_a_missing_ray_cli_is_a_clear_error_and_starts_nothing(monkeypatch):
    import simulation.ray_cluster as rc
    monkeypatch.setattr(rc, "ray_cli", lambda: None)
    cluster = rc.LocalRayCluster()
    with pytest.raises(rc.RayClusterError, match="`ray` CLI was not found"), cluster:
        pass
    assert cluster.temp_dir is None
