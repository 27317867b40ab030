"""Federated MinusFace: ClientApp handlers called directly, a whole in-process federation
(both stages, checkpoints, resume, a rejected update), and one real `flwr run` (slow)."""
from __future__ import annotations

import json
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federation.server_app import initial_arrays
from minusface.presets import get_preset
from task.records import FROZEN_GENERATOR, STAGE1, STAGE2
from task.wire import from_wire, stays_float32, to_wire, unflatten
from tests.run_outcome import (
    assert_honest_replies_accepted,
    assert_moved,
    assert_stage1_weights_moved,
    capture_train_messages,
    round_numbers,
)


def tiny_config(lfw_root, out_dir, **over) -> dict:
    cfg = {"preset": "tiny", "stage1-rounds": 1, "stage2-rounds": 1, "local-epochs": 1,
           "fraction-train": 1.0, "data-path": str(lfw_root), "out-dir": str(out_dir),
           "min-nodes": 2, "max-identities": 12, "server-eval-pairs": 20}
    cfg.update(over)
    return cfg


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _message(content: RecordDict, kind: str = "train", node: int = 7) -> Message:
    return Message(content, node, kind, group_id="1")


def _context(cfg: dict, pid: int = 0, n: int = 2) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": n},
                   state=RecordDict(), run_config=cfg)


def test_client_train_stage1_then_stage2_returns_only_shared_keys(lfw_root, tmp_path):
    from clients.client_app import app
    cfg = tiny_config(lfw_root, tmp_path)
    preset = get_preset("tiny")
    ctx = _context(cfg)
    sent1 = initial_arrays(STAGE1, preset, 0)
    reply = app(_message(RecordDict({"arrays": ArrayRecord(sent1), "config": ConfigRecord(
        {"stage": STAGE1, "lr": 0.01, "local-epochs": 1, "server-round": 1})})), ctx)
    assert not reply.has_error()
    back = reply.content["arrays"].to_torch_state_dict()
    assert set(back) == set(sent1)
    assert any(not torch.equal(back[k], sent1[k]) for k in sent1 if k.startswith("generator."))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert "head-stage1" in ctx.state                   # the private head stays on the site
    head = ctx.state["head-stage1"].to_torch_state_dict()["weight"]
    assert all(head.shape != v.shape for v in back.values() if v.dim() == 2)

    frozen = {f"generator.{k}": v for k, v in unflatten(back, "generator").items()}
    sent2 = initial_arrays(STAGE2, preset, 1)
    reply2 = app(_message(RecordDict({
        "arrays": ArrayRecord(sent2), FROZEN_GENERATOR: ArrayRecord(frozen),
        "config": ConfigRecord({"stage": STAGE2, "lr": 0.01, "local-epochs": 1, "server-round": 2})})), ctx)
    back2 = reply2.content["arrays"].to_torch_state_dict()
    assert set(back2) == set(sent2) and set(reply2.content.keys()) == {"arrays", "metrics"}
    assert "head-stage2" in ctx.state

    ev = app(_message(RecordDict({"arrays": ArrayRecord(back2), FROZEN_GENERATOR: ArrayRecord(frozen),
                                  "config": ConfigRecord({"stage": STAGE2, "server-round": 2})}),
                      kind="evaluate"), ctx)
    m = ev.content["metrics"]
    assert set(ev.content.keys()) == {"metrics"} and m["num-examples"] > 0
    assert 0.0 <= m["accuracy"] <= 1.0


def test_inprocess_federation_checkpoints_resumes_and_rejects_bad_updates(
        lfw_root, tmp_path, monkeypatch):
    from federation.server_eval import ServerEvaluator
    from simulation.inprocess import run_inprocess
    out = tmp_path / "run"
    cfg = tiny_config(lfw_root, out)
    messages = capture_train_messages(monkeypatch)
    grid = run_inprocess(cfg, 2)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in lines if "client" not in r]
    assert [(r["round"], r["stage"]) for r in rounds] == [(1, STAGE1), (2, STAGE2)]
    assert (out / "final" / "generator.pt").exists() and (out / "report.md").exists()
    # sites by name (query.site_info): partition-<id> in a simulation, in every client line
    assert {r["client"]["site"] for r in lines if "client" in r} == {"partition-0", "partition-1"}
    assert "| partition-0 |" in (out / "report.md").read_text()

    # every round aggregated honest replies, and each aggregate moved the global weights
    assert_honest_replies_accepted(out, every=True)
    assert_stage1_weights_moved(out)
    assert len(messages) == 4                                # 2 rounds x 2 sites
    initial = initial_arrays(STAGE1, get_preset("tiny"), 0)
    assert all(torch.equal(messages[0]["arrays"][k], v) for k, v in initial.items())
    round1 = torch.load(out / "checkpoint.prev.pt", weights_only=True)
    round2 = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (round1["round"], round2["round"]) == (1, 2)
    round2["arrays"] = {k.removeprefix("frozen."): v for k, v in round2["arrays"].items()}
    assert_moved(messages[0]["arrays"], round1["arrays"], ("generator.", "recognizer."), "round 1")
    assert_moved(messages[2]["arrays"], round2["arrays"], ("recognizer.",), "round 2")
    frozen = messages[2][FROZEN_GENERATOR]                   # stage 2 trains on round 1's g
    assert frozen and all(torch.equal(v, round1["arrays"][k]) for k, v in frozen.items())

    # the round line's server benchmark is the checkpointed round-1 model's (stage 1 has no
    # random permutation, so an independent evaluation gives the same numbers)
    again = ServerEvaluator(lfw_root, 0, 20)(STAGE1, get_preset("tiny"), round1["arrays"])
    logged = rounds[0]["metrics"]
    assert logged["server_eval_pairs"] == again["server_eval_pairs"] == 20
    assert logged["server_auc"] == pytest.approx(again["server_auc"], abs=1e-3)
    assert logged["server_accuracy"] == pytest.approx(again["server_accuracy"], abs=1e-3)
    # ... and the clients' evaluate metrics in it are the example-weighted mean of the sites'
    for r in rounds:
        site = [e["client"] for e in lines if "client" in e and e["round"] == r["round"]
                and e["client"]["phase"] == "evaluate" and e["client"]["accepted"]]
        assert len(site) == 2
        mean = (sum(c["metrics"]["accuracy"] * c["metrics"]["num-examples"] for c in site)
                / sum(c["metrics"]["num-examples"] for c in site))
        assert r["metrics"]["clients_evaluate_accuracy"] == pytest.approx(mean)
    sent = [b for b in grid.bytes_sent if b["type"] == "train"]
    arrays = initial_arrays(STAGE1, get_preset("tiny"), 0)
    expected = {STAGE1: sum(v.numel() * v.element_size() for v in arrays.values())}
    assert sent[0]["array_bytes"] == expected[STAGE1]  # exactly the shared weights, no head

    # resume: one more stage-2 round continues after round 2 instead of starting over
    ck_before = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck_before["round"] == 2
    cfg2 = dict(cfg, **{"stage2-rounds": 2})
    run_inprocess(cfg2, 2)
    assert round_numbers(out) == [1, 2, 3]
    # ... from the checkpoint's weights: f_p and the frozen g of round 2, not a fresh start
    resumed = messages[4]
    assert set(resumed["arrays"]) == {k for k in round2["arrays"] if k.startswith("recognizer.")}
    assert all(torch.equal(v, round2["arrays"][k]) for k, v in resumed["arrays"].items())
    assert all(torch.equal(v, round2["arrays"][k]) for k, v in resumed[FROZEN_GENERATOR].items())
    assert_honest_replies_accepted(out, every=True)


def test_a_nan_update_is_rejected_and_the_round_goes_on(lfw_root, tmp_path, monkeypatch):
    import simulation.inprocess as ip
    original = ip.InProcessGrid.send_and_receive

    def corrupt(self, messages, *, timeout=None):
        replies = list(original(self, messages, timeout=timeout))
        for r in replies:
            if r.metadata.src_node_id == self.node_ids[0] and "arrays" in r.content:
                arrays = r.content["arrays"].to_torch_state_dict()
                key = next(iter(arrays))
                arrays[key] = torch.full_like(arrays[key], float("nan"))
                r.content["arrays"] = ArrayRecord(arrays)
        return replies

    monkeypatch.setattr(ip.InProcessGrid, "send_and_receive", corrupt)
    out = tmp_path / "run"
    ip.run_inprocess(tiny_config(lfw_root, out, **{"stage2-rounds": 0}), 2)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rejected = [r for r in lines if "client" in r and not r["client"]["accepted"]]
    assert rejected and any("finite" in " ".join(r["client"]["problems"]).lower() or
                            "nan" in " ".join(r["client"]["problems"]).lower() for r in rejected)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in ck["arrays"].values())


@pytest.mark.slow
@pytest.mark.timeout(1800)    # its own waits (up to 900 s per run) fail first, with a reason
def test_flwr_run_end_to_end_four_virtual_clients(lfw_root, tmp_path):
    from simulation.launch import run_simulation
    out = tmp_path / "flwr-out"
    t0 = time.time()
    result = run_simulation(tiny_config(lfw_root, out, **{"min-nodes": 4, "max-identities": 16}),
                            num_supernodes=4, num_cpus=1, timeout=900)
    print(f"\nflwr run: {result.status} in {time.time() - t0:.1f} s")
    assert result.completed, result.details + result.log[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines if "client" not in r] == [1, 2]
    nodes = {r["client"]["node_id"] for r in lines if "client" in r}
    assert len(nodes) == 4
    assert (out / "checkpoint.pt").exists() and (out / "final" / "generator.pt").exists()
    assert_honest_replies_accepted(out, every=True)
    assert_stage1_weights_moved(out)


def test_round_lr_schedule_follows_the_paper_milestones():
    from federation.server_app import lr_for_round
    p = get_preset("paper")
    lrs = [lr_for_round(p, r, 24) for r in range(1, 25)]
    assert lrs[:10] == [0.01] * 10 and abs(lrs[10] - 1e-3) < 1e-12    # / 10 at epoch 10 of 24
    assert abs(lrs[17] - 1e-3) < 1e-12 and abs(lrs[18] - 1e-4) < 1e-12  # and at 18
    assert abs(lrs[21] - 1e-4) < 1e-12 and abs(lrs[22] - 1e-5) < 1e-12  # and at 22
    assert [lr_for_round(p, r, 2) for r in (1, 2)] == [0.01, 0.001]
    assert lr_for_round(p, 1, 1) == 0.01


@pytest.mark.slow      # a whole in-process federation: minutes on 2 busy cores
def test_wire_dtype_float16_halves_the_bytes_and_keeps_a_float32_master(lfw_root, tmp_path):
    from simulation.inprocess import run_inprocess
    out = tmp_path / "run16"
    grid = run_inprocess(tiny_config(lfw_root, out, **{"wire-dtype": "float16",
                                                       "stage2-rounds": 0}), 2)
    full = initial_arrays(STAGE1, get_preset("tiny"), 0)
    expected = sum(v.numel() * (2 if v.is_floating_point() and not stays_float32(k)
                                else v.element_size()) for k, v in full.items())
    sent = [b["array_bytes"] for b in grid.bytes_sent if b["type"] == "train"]
    assert sent == [expected, expected]                  # both sites replied in float16
    assert expected < 0.51 * sum(v.numel() * v.element_size() for v in full.values())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(e["client"]["accepted"] for e in lines if "client" in e)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    floats = [v for v in ck["arrays"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)


def test_float16_wire_keeps_batchnorm_statistics_finite():
    """The recognizer's first BN sees DCT-sized inputs: its running variance outgrows float16."""
    state = {"f.input_layer.1.running_var": torch.tensor([3.0e5, 1.0]),
             "f.input_layer.1.running_mean": torch.tensor([1576.9, -2.0]),
             "f.input_layer.1.weight": torch.tensor([1.0 + 2 ** -12, 0.5]),
             "f.input_layer.1.num_batches_tracked": torch.tensor(7)}
    wire = to_wire(state, "float16")
    assert wire["f.input_layer.1.running_var"].dtype == torch.float32
    assert wire["f.input_layer.1.running_mean"].dtype == torch.float32
    assert wire["f.input_layer.1.weight"].dtype == torch.float16
    assert wire["f.input_layer.1.num_batches_tracked"].dtype == torch.int64
    back = from_wire(wire)
    assert all(torch.isfinite(v.float()).all() for v in back.values())
    assert torch.equal(back["f.input_layer.1.running_var"], state["f.input_layer.1.running_var"])
    assert not torch.isfinite(state["f.input_layer.1.running_var"].half()).all()   # why


def test_wire_dtype_is_validated():
    from task.config import run_config
    with pytest.raises(ValueError, match="wire-dtype"):
        run_config({"wire-dtype": "bfloat16"})


@pytest.mark.slow      # a whole in-process federation
def test_a_server_without_lfw_runs_without_its_benchmark(lfw_root, tmp_path, monkeypatch):
    """Sites with their own folders, no LFW at the server: the run completes, scored by the
    sites only; a data-path the run config names but that is missing still fails."""
    import task.config
    from simulation.inprocess import run_inprocess
    from tests.test_deploy_rehearsal import _people, _site_folder
    people = _people(lfw_root, 12)
    sites = [{"data-path": str(_site_folder(lfw_root, tmp_path / f"site{i}", people[6 * i:6 * i + 6])),
              "partition-id": i} for i in range(2)]
    monkeypatch.delenv("MINUSFED_DATA", raising=False)
    monkeypatch.setattr(task.config, "DEFAULT_DATA", tmp_path / "no-lfw-here")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    cfg = tiny_config(lfw_root, out)
    cfg["data-path"] = ""
    run_inprocess(cfg, 2, sites)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in lines if "client" not in r]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all("server_accuracy" not in r["metrics"] for r in rounds)
    assert all("clients_evaluate_accuracy" in r["metrics"] for r in rounds)
    assert (out / "report.md").is_file()
    assert not (out / "final" / "server").exists()       # no pairs to calibrate thresholds on
    with pytest.raises(FileNotFoundError, match="data-path"):
        run_inprocess(tiny_config(lfw_root, tmp_path / "run2", **{"data-path": str(tmp_path / "x")}),
                      2, sites)
