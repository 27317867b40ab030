"""Central DP: Flower's client-side fixed clipping (through our mods) + server noise, the RDP
accountant, the per-client ledger, and a whole in-process federation with DP on."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import RdpAccountant
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.task_identity import TaskIdentity

from clients.dp import dp_clipping_mod
from clients.guard import outbound_guard
from simulation.inprocess import InProcessGrid
from strategy.dp import LEDGER_NAME, DpRun, DpSettings, dp_settings
from task.config import run_config
from task.records import FROZEN_GENERATOR

N = 20_000                                     # elements: noise std estimated to about 0.5 %
Z, C = 0.8, 0.5


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def reference() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"recognizer.w": rng.normal(size=N).astype(np.float32),
            "recognizer.b": np.zeros(7, np.float32),
            "recognizer.bn.num_batches_tracked": np.array(5, dtype=np.int64)}


def fake_site(scale: dict[int, float], examples: dict[int, int], seen: list) -> ClientApp:
    """A ClientApp with the production mods whose 'training' adds a big random step."""
    app = ClientApp()

    @app.train(mods=[outbound_guard, dp_clipping_mod])
    def train(msg: Message, context: Context) -> Message:
        seen.append(sorted(msg.content.keys()))
        sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        rng = np.random.default_rng(context.node_id)
        out = {k: (v + scale[context.node_id] * rng.normal(size=v.shape)).astype(v.dtype)
               if v.dtype.kind == "f" else v + 40 for k, v in sent.items()}
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()}),
                                   "metrics": MetricRecord({"num-examples": examples[context.node_id],
                                                            "train_loss": 1.0})}), reply_to=msg)

    return app


def update_norm(reply: Message, sent: dict[str, np.ndarray]) -> float:
    arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    return float(np.sqrt(sum(np.sum((arrays[k].astype(np.float64) - sent[k]) ** 2) for k in sent)))


def test_clipped_updates_and_noise_of_the_right_std(tmp_path):
    seen: list = []
    sent = reference()
    grid = InProcessGrid(fake_site({101: 0.05, 102: 0.0001}, {101: 1, 102: 100}, seen), 2, {})
    settings = DpSettings(noise_multiplier=Z, clipping_norm=C, target_delta=1e-5, max_epsilon=None)
    dp = DpRun(settings, tmp_path, grid.get_node_ids(), fraction_train=1.0, min_train_nodes=2)
    inner = dp.make_strategy("fedavg", min_train_nodes=2, min_available_nodes=2)
    wrapper = dp.wrap(inner)
    inner.frozen_arrays = {FROZEN_GENERATOR: ArrayRecord({"generator.x": Array(np.ones(3, np.float32))})}

    messages = list(wrapper.configure_train(1, ArrayRecord({k: Array(v) for k, v in sent.items()}),
                                            ConfigRecord({"lr": 0.1}), grid))
    assert all(m.content["config"]["clipping_norm"] == C for m in messages)   # Flower's key
    replies = list(grid.send_and_receive(messages))
    assert all(not r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
    assert seen == [["arrays", "config", FROZEN_GENERATOR]] * 2      # handler still gets frozen g
    norms = {r.metadata.src_node_id: update_norm(r, sent) for r in replies}
    assert norms[101] == pytest.approx(C, rel=1e-4)                  # 0.05 * sqrt(N) = 7 > C: clipped
    assert norms[102] < C and norms[102] == pytest.approx(1e-4 * np.sqrt(N), rel=0.05)  # untouched
    for r in replies:                                                # integer buffer: zero update
        nbt = r.content["arrays"]["recognizer.bn.num_batches_tracked"].numpy()
        assert nbt.dtype == np.int64 and int(nbt) == 5
    # equal weights although num-examples are 1 and 100 (sensitivity C/m needs a plain mean)
    plain = {k: np.mean([r.content["arrays"][k].numpy().astype(np.float64) for r in replies], axis=0)
             for k in sent}

    np.random.seed(1)
    arrays, _ = wrapper.aggregate_train(1, replies)
    noise = arrays["recognizer.w"].numpy().astype(np.float64) - plain["recognizer.w"]
    expected_std = Z * C / 2
    assert wrapper.noise_std == pytest.approx(expected_std)
    assert noise.std() == pytest.approx(expected_std, rel=0.03)
    assert abs(noise.mean()) < 4 * expected_std / np.sqrt(N)
    assert arrays["recognizer.bn.num_batches_tracked"].numpy().dtype == np.int64

    # one release composed in Flower's RDP accountant; with every client sampled (q = 1) the
    # replace-one without-replacement value equals the no-amplification value at z / 2
    spent = wrapper.privacy_spent()
    assert spent.num_releases == 1 and spent.delta == 1e-5
    check = RdpAccountant(PrivacyConfig(1e-5, 2, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                        SamplingMethod.NO_AMPLIFICATION))
    check.compose(GaussianPrivacyEvent(Z / 2, 2, 2))
    assert spent.epsilon == pytest.approx(check.get_epsilon(1e-5), rel=1e-6)


def test_mod_is_a_no_op_without_clipping_norm():
    seen: list = []
    app = fake_site({7: 1.0}, {7: 3}, seen)
    sent = reference()
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}),
                              "config": ConfigRecord({"lr": 0.1})}), 7, "train", group_id="1")
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = app(msg, ctx)
    assert update_norm(reply, {k: v for k, v in sent.items() if v.dtype.kind == "f"}) > 100 * C
    assert int(reply.content["arrays"]["recognizer.bn.num_batches_tracked"].numpy()) == 45


def test_ledger_fields_partial_sampling_and_budget_stop(tmp_path):
    seen: list = []
    grid = InProcessGrid(fake_site({101: 1.0, 102: 1.0, 103: 1.0}, {101: 1, 102: 1, 103: 1}, seen), 3, {})
    settings = DpSettings(noise_multiplier=1.0, clipping_norm=C, target_delta=1e-5, max_epsilon=None)
    dp = DpRun(settings, tmp_path, grid.get_node_ids(), fraction_train=0.67, min_train_nodes=1)
    assert dp.num_sampled == 2 and dp.population == 3
    wrapper = dp.wrap(dp.make_strategy("fedavg", fraction_train=0.67, min_train_nodes=1,
                                       min_available_nodes=1))
    sent = ArrayRecord({k: Array(v) for k, v in reference().items()})
    eps = []
    for index in (1, 2, 3):
        assert not dp.budget_exhausted()
        replies = grid.send_and_receive(wrapper.configure_train(1, sent, ConfigRecord({}), grid))
        wrapper.aggregate_train(1, replies)
        dp.record_round(index, "stage1")
        eps.append(json.loads((tmp_path / LEDGER_NAME).read_text())["epsilon"])
    assert eps[0] > 0 and eps[0] < eps[1] < eps[2]
    led = json.loads((tmp_path / LEDGER_NAME).read_text())
    assert led["population_size"] == 3 and led["num_sampled_per_round"] == 2
    assert led["sampling_rate"] == pytest.approx(2 / 3) and led["releases"] == 3
    assert led["accountant"]["neighboring_relation"] == "replace-one"
    assert [r["round"] for r in led["rounds"]] == [1, 2, 3] and all(r["released"] for r in led["rounds"])
    assert set(led["clients"]) == {"101", "102", "103"}
    total = 0
    for c in led["clients"].values():
        for key in ("rounds_participated", "times_sampled", "sampling_rate", "noise_multiplier",
                    "clipping_norm", "epsilon", "delta", "epsilon_participation"):
            assert key in c
        assert c["epsilon"] == led["epsilon"] and c["delta"] == 1e-5
        assert c["rounds_participated"] == c["times_sampled"] == len(c["participated_rounds"])
        assert (c["epsilon_participation"] > 0) == (c["times_sampled"] > 0)
        total += c["times_sampled"]
    assert total == 6
    assert any("replace" in n for n in led["notes"])

    # a budget between the 2- and 3-round epsilon: a fresh run stops before its third round
    capped = DpRun(DpSettings(1.0, C, 1e-5, (eps[1] + eps[2]) / 2), tmp_path / "capped",
                   grid.get_node_ids(), fraction_train=0.67, min_train_nodes=1)
    (tmp_path / "capped").mkdir()
    w2 = capped.wrap(capped.make_strategy("fedavg", fraction_train=0.67, min_train_nodes=1,
                                          min_available_nodes=1))
    rounds = 0
    while not capped.budget_exhausted():
        replies = grid.send_and_receive(w2.configure_train(1, sent, ConfigRecord({}), grid))
        w2.aggregate_train(1, replies)
        rounds += 1
        capped.record_round(rounds, "stage1")
    capped.finish()
    assert w2.would_exceed_budget() and w2.rdp.would_exceed(w2.event(2), led2_cap := (eps[1] + eps[2]) / 2)
    assert not RdpAccountant(w2.rdp.config).would_exceed(w2.event(2), led2_cap)
    led2 = json.loads((tmp_path / "capped" / LEDGER_NAME).read_text())
    assert rounds == 2 and led2["budget_exhausted"] and led2["epsilon"] <= led2["max_epsilon"]


def test_dp_settings_from_run_config_values():
    cfg = run_config({"dp-noise-multiplier": 1.0, "dp-clipping-norm": 2.0,
                      "dp-target-delta": 1e-6})
    assert dp_settings(0.0, 1.0, 1e-5, 0.0) is None                  # z = 0: DP off
    s = dp_settings(cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.dp_target_delta,
                    cfg.dp_max_epsilon)
    assert s == DpSettings(1.0, 2.0, 1e-6, None)                     # max-epsilon 0: no cap
    with pytest.raises(ValueError, match="dp-target-delta"):
        dp_settings(1.0, 1.0, 1.5, 0.0)
    with pytest.raises(ValueError, match="wire-dtype"):
        DpRun(s, Path("/x"), [1, 2], 1.0, 2, wire_dtype="float16")
    with pytest.raises(ValueError, match="fedavg"):
        DpRun(s, Path("/x"), [1, 2], 1.0, 2).make_strategy("median")
    with pytest.raises(ValueError, match="aggregation-backend 'flower'"):
        DpRun(s, Path("/x"), [1, 2], 1.0, 2).make_strategy("fedavg", backend="streaming")


def test_start_returns_the_round_report_through_the_dp_wrapper(tmp_path):
    seen: list = []
    grid = InProcessGrid(fake_site({101: 1.0, 102: 1.0}, {101: 1, 102: 1}, seen), 2, {})
    dp = DpRun(DpSettings(Z, C, 1e-5, None), tmp_path, grid.get_node_ids(), 1.0, 2)
    wrapper = dp.wrap(dp.make_strategy("fedavg", min_train_nodes=2, min_available_nodes=2,
                                       fraction_evaluate=0.0))
    sent = ArrayRecord({k: Array(v) for k, v in reference().items()})
    result = wrapper.start(grid=grid, initial_arrays=sent, num_rounds=1)
    assert len(result.arrays) == len(sent)                           # released
    assert sorted((e["phase"], e["node_id"], e["accepted"], e["weight"])   # replies arrive
                  for e in result.report.replies) == [("train", 101, True, 1), ("train", 102, True, 1)]
    assert result.report.node_summary()["nodes"]["train"]["replied"] == [101, 102]
    dp.record_round(1, "stage1")
    assert json.loads((tmp_path / LEDGER_NAME).read_text())["rounds"][0]["aggregated"] == \
        [101, 102]


@pytest.mark.slow      # a whole in-process federation: minutes on 2 busy cores
def test_inprocess_federation_with_dp_writes_the_ledger(lfw_root, tmp_path):
    from simulation.inprocess import run_inprocess
    out = tmp_path / "run"
    cfg = {"preset": "tiny", "stage1-rounds": 1, "stage2-rounds": 1, "local-epochs": 1,
           "fraction-train": 1.0, "fraction-evaluate": 0.0,        # no client eval: time
           "data-path": str(lfw_root), "out-dir": str(out),
           "min-nodes": 2, "max-identities": 8, "server-eval-pairs": 10,
           "dp-noise-multiplier": 0.5, "dp-clipping-norm": 1.0}
    run_inprocess(cfg, 2)
    led = json.loads((out / LEDGER_NAME).read_text())
    assert [(r["round"], r["stage"], r["released"]) for r in led["rounds"]] == \
        [(1, "stage1", True), (2, "stage2", True)]                 # stage 2 (frozen g) works too
    assert led["releases"] == 2 and led["epsilon"] > 0 and not led["budget_exhausted"]
    assert {c["rounds_participated"] for c in led["clients"].values()} == {2}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in lines if "client" not in r]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(np.isfinite(r["metrics"]["server_accuracy"]) for r in rounds)
    assert all(r["client"]["accepted"] for r in lines if "client" in r)
    assert (out / "final" / "generator.pt").exists() and (out / "report.md").exists()


def test_fewer_updates_weaken_the_round_and_an_error_releases_nothing(tmp_path):
    seen: list = []
    grid = InProcessGrid(fake_site({101: 1.0, 102: 1.0}, {101: 1, 102: 1}, seen), 2, {})
    dp = DpRun(DpSettings(Z, C, 1e-5, None), tmp_path, grid.get_node_ids(), 1.0, 1)
    wrapper = dp.wrap(dp.make_strategy("fedavg", min_train_nodes=1, min_available_nodes=1))
    sent = ArrayRecord({k: Array(v) for k, v in reference().items()})

    grid.failing = {102}                        # node 102 does not answer: 1 of 2 averaged
    arrays, _ = wrapper.aggregate_train(1, grid.send_and_receive(
        wrapper.configure_train(1, sent, ConfigRecord({}), grid)))
    dp.record_round(1, "stage1")
    assert arrays is not None
    r1 = json.loads((tmp_path / LEDGER_NAME).read_text())["rounds"][0]
    assert r1["aggregated"] == [101] and r1["noise_multiplier_effective"] == pytest.approx(Z / 2)

    grid.failing = set()                         # an error reply: Flower's wrapper skips the round
    messages = list(wrapper.configure_train(1, sent, ConfigRecord({}), grid))
    replies = list(grid.send_and_receive(messages))
    replies[0] = Message(Error(code=2, reason="boom"), reply_to=messages[0])
    arrays, _ = wrapper.aggregate_train(1, replies)
    dp.record_round(2, "stage1")
    led = json.loads((tmp_path / LEDGER_NAME).read_text())
    assert arrays is None and led["releases"] == 1 and not led["rounds"][1]["released"]
    assert led["clients"]["102"]["rounds_participated"] == 0
    assert led["clients"]["102"]["times_sampled"] == 2
