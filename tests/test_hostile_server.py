"""A hostile site against the server: the issue's scenarios, through the real strategy.

Replies are real Flower Messages (`tests.test_strategy.reply`) aggregated by the server's
strategy (`make_strategy` with the run config's weight bounds) on each backend ("flower",
"streaming", "ray" on a one-CPU local Ray), or by Flower's own `start()` loop over a grid whose
nodes answer in-process.  Every bad value must be rejected or bounded with its reason in the
round report (`RoundReport.replies`, what the ServerApp writes to metrics.jsonl), and the
round must go on.  The run-config cases check `run_config()` and `run_server`.
"""

from __future__ import annotations

import json
import math
from logging import ERROR

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from strategy import RoundReport, make_strategy
from strategy.validation import MAX_KEY_CHARS, MAX_METRIC_KEYS, weight_problem
from task.config import run_config
from tests.test_aggregate_backends import local_ray  # noqa: F401  (fixture)
from tests.test_strategy import (  # noqa: F401  (task_identity: autouse fixture)
    FakeGrid,
    configured,
    record,
    reply,
    server_strategy,
    task_identity,
    values,
)

BACKENDS = ["flower", "streaming", "ray"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "ray":
        request.getfixturevalue("local_ray")
    return str(request.param)


def honest_three_and(liar_weight: object, liar_value: float = 1.0) -> list[Message]:
    """The issue's round: three honest sites send 0.0 with 100 examples, node 9 lies."""
    return [reply(i, record(0.0), 100) for i in (1, 2, 3)] + [
        reply(9, record(liar_value), liar_weight)  # type: ignore[arg-type]
    ]


def global_value(arrays: ArrayRecord | None) -> float:
    assert arrays is not None
    got = values(arrays)
    first = next(iter(got.values()))
    for value in got.values():
        np.testing.assert_allclose(value, first.flat[0], rtol=1e-6)
    return float(first.flat[0])


def entry_of(report: RoundReport, node: int) -> dict:
    return next(e for e in report.replies if e["node_id"] == node)


# --- FedAvg influence ------------------------------------------------------------------


@pytest.mark.parametrize("norm", [None, 50.0])
def test_1e18_examples_is_rejected_on_every_backend(backend: str, norm: float | None) -> None:
    strategy = configured(record(0.0), backend=backend, max_update_norm=norm)
    arrays, _ = strategy.aggregate_train(1, honest_three_and(1e18))
    report = strategy.take_report()
    assert global_value(arrays) == 0.0                 # was 1.0: the liar took over
    [rejected] = report.rejected
    assert rejected["node_id"] == 9
    assert "exceeds max-num-examples 1000000" in rejected["problems"][0]
    entry = entry_of(report, 9)
    assert not entry["accepted"] and entry["metrics"]["num-examples"] == 1e18
    json.dumps(report.replies)                     # what metrics.jsonl receives


def test_a_lie_under_the_cap_is_clipped_to_ratio_x_median(backend: str) -> None:
    strategy = configured(record(0.0), backend=backend)    # run-config defaults: cap 1e6, ratio 4
    arrays, _ = strategy.aggregate_train(1, honest_three_and(100_000))
    report = strategy.take_report()
    # liar clipped to 4 x 100: 400 / (400 + 3 * 100) of the weight, not 100000 / 100300
    assert global_value(arrays) == pytest.approx(400 / 700, rel=1e-6)
    entry = entry_of(report, 9)
    assert entry["accepted"] and entry["weight"] == 400
    assert entry["notes"] == ["weight clipped from 100000 to 400 "
                              "(max-weight-ratio 4 x median 100)"]
    assert entry["metrics"]["num-examples"] == 100_000          # the claim, as sent
    assert [entry_of(report, n)["weight"] for n in (1, 2, 3)] == [100, 100, 100]
    assert report.rejected == []


def test_caps_off_the_liar_wins_as_before_but_nothing_raises(backend: str) -> None:
    """Without the caps the weight is the claim (the operator's choice); 3.5e38 no longer
    raises out of the streaming backend (torch refused a float32 factor that large)."""
    strategy = configured(record(0.0), backend=backend, max_num_examples=None,
                          max_weight_ratio=None)
    arrays, _ = strategy.aggregate_train(1, honest_three_and(3.5e38))
    report = strategy.take_report()
    assert global_value(arrays) == pytest.approx(1.0, rel=1e-6)
    assert report.rejected == []


def test_huge_claim_with_default_caps_is_rejected_and_round_goes_on(backend: str) -> None:
    strategy = configured(record(0.0), backend=backend)
    arrays, _ = strategy.aggregate_train(1, honest_three_and(3.5e38))
    report = strategy.take_report()
    assert global_value(arrays) == 0.0
    assert [r["node_id"] for r in report.rejected] == [9]


@pytest.mark.parametrize("claim, problem", [
    (0.5, "must be a whole number >= 1, got 0.5"),
    (100.5, "must be a whole number >= 1, got 100.5"),
    (-100, "must be a whole number >= 1, got -100"),
    (0, "must be a whole number >= 1, got 0"),
    (math.nan, "must be a finite whole number >= 1, got nan"),
    (math.inf, "must be a finite whole number >= 1, got inf"),
    (10**30, "within int64"),
    ([100, 100], "must be a number, got list"),
])
def test_a_claim_that_is_not_a_whole_number_is_rejected(claim: object, problem: str) -> None:
    strategy = configured(record(0.0))
    arrays, _ = strategy.aggregate_train(1, honest_three_and(claim))
    report = strategy.take_report()
    assert global_value(arrays) == 0.0
    [rejected] = report.rejected
    assert rejected["node_id"] == 9, rejected
    assert any(problem in p for p in rejected["problems"]), rejected
    json.dumps(report.replies)


def test_weight_problem_refuses_bools_and_names_the_cap() -> None:
    """MetricRecord itself refuses a bool; the check does not rely on that."""
    assert weight_problem(True) == "'num-examples' must be a number, got bool"
    assert weight_problem(100.0) is None and weight_problem(7, max_num_examples=7) is None
    assert "exceeds max-num-examples 7" in str(weight_problem(8, max_num_examples=7))


def test_equal_weighting_ignores_claims() -> None:
    strategy = configured(record(0.0), weighting="equal")
    arrays, metrics = strategy.aggregate_train(1, honest_three_and(999_999))
    report = strategy.take_report()
    assert global_value(arrays) == pytest.approx(0.25)
    assert [e["weight"] for e in report.replies] == [1, 1, 1, 1]
    assert metrics is not None and metrics["train_loss"] == pytest.approx((1 + 2 + 3 + 9) / 4)


def test_two_sites_the_lower_median_bounds_the_bigger_claim() -> None:
    strategy = configured(record(0.0))
    replies = [reply(1, record(0.0), 100), reply(9, record(1.0), 900_000)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert global_value(arrays) == pytest.approx(400 / 500)   # not 900000 / 900100


def test_effective_weights_reach_multi_krum_and_the_metrics() -> None:
    """MultiKrum averages the selected replies by weight; every rule weights the metrics."""
    strategy = configured(record(0.0), rule="multi-krum", num_nodes_to_select=4)
    arrays, metrics = strategy.aggregate_train(1, honest_three_and(100_000))
    assert global_value(arrays) == pytest.approx(400 / 700, rel=1e-6)
    assert metrics is not None
    assert metrics["train_loss"] == pytest.approx((100 * (1 + 2 + 3) + 400 * 9) / 700)
    median = configured(record(0.0), rule="median")
    _, metrics = median.aggregate_train(1, honest_three_and(100_000))
    assert metrics is not None
    assert metrics["train_loss"] == pytest.approx((100 * (1 + 2 + 3) + 400 * 9) / 700)


def test_replies_are_left_as_they_came() -> None:
    replies = honest_three_and(100_000)
    for rule in ("fedavg", "median", "trimmed-mean"):
        strategy = configured(record(0.0), rule=rule)
        strategy.aggregate_train(1, replies)
        assert [m.content["metrics"]["num-examples"] for m in replies] == [100] * 3 + [100_000]
        assert all(len(m.content["arrays"]) == 2 for m in replies), rule


def test_flower_start_loop_with_a_liar_in_train_and_evaluate() -> None:
    """Flower's own round loop (configure, send, aggregate) over in-process nodes."""

    def node(msg: Message) -> Message:
        site = msg.metadata.dst_node_id
        claim = 10**18 if site == 4 else (100_000 if site == 3 else 100)
        if msg.metadata.message_type == MessageType.EVALUATE:
            acc = 1.0 if site == 3 else 0.5
            metrics = MetricRecord({"acc": acc, "num-examples": claim})
            return Message(RecordDict({"metrics": metrics}), reply_to=msg)
        step = 1.0 if site in (3, 4) else 0.0
        out = record({k: (v + step).astype(np.float32)
                      for k, v in values(msg.content["arrays"]).items()})
        metrics = MetricRecord({"train_loss": 1.0, "num-examples": claim})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    strategy = server_strategy(min_available_nodes=4, min_train_nodes=4, min_evaluate_nodes=4)
    result = strategy.start(grid=FakeGrid([1, 2, 3, 4], node), initial_arrays=record(0.0),
                            num_rounds=1)
    # node 4 (1e18) rejected; node 3 clipped from 100000 to 400 against two sites of 100
    assert global_value(result.arrays) == pytest.approx(400 / 600, rel=1e-6)
    assert result.evaluate_metrics_clientapp[1]["acc"] == pytest.approx(
        (0.5 * 200 + 1.0 * 400) / 600)
    report = result.report
    assert [(r["phase"], r["node_id"]) for r in report.rejected] == [
        ("train", 4), ("evaluate", 4)]
    clipped = [e for e in report.replies if e["notes"]]
    assert [(e["phase"], e["node_id"], e["weight"]) for e in clipped] == [
        ("train", 3, 400), ("evaluate", 3, 400)]


# --- bounded reply content ---------------------------------------------------------------


def leak_metrics(keys: int = 588, length: int = 64) -> dict[str, list[float]]:
    return {f"leak-{i}": [0.5] * length for i in range(keys)}


@pytest.mark.parametrize("metrics, extra, problem", [
    (leak_metrics(), {}, f"MetricRecords hold 590 keys (max {MAX_METRIC_KEYS})"),
    ({"x" * 10_000: 1.0}, {}, f"is longer than {MAX_KEY_CHARS} characters"),
    ({"face": [0.5] * 65}, {}, "holds a list of 65 values (max 64)"),
    ({"big": 10**30}, {}, "holds an integer outside int64"),
    ({}, {"cfg": ConfigRecord({"note": "y" * 10_000})}, "holds a str of 10000 characters"),
    ({}, {"cfg": ConfigRecord({"blob": b"\0" * 1_000})}, "holds a bytes of 1000 characters"),
    ({}, {"cfg": ConfigRecord({f"k{i}": 1 for i in range(65)})}, "ConfigRecords hold 65 keys"),
    ({}, {f"c{i}": ConfigRecord() for i in range(8)}, "records in one reply (max 8)"),
])
def test_metric_and_config_smuggling_is_rejected_and_logged_bounded(
    metrics: dict, extra: dict, problem: str
) -> None:
    strategy = configured(record(0.0))
    bad = reply(9, record(1.0), 100, metrics=metrics)
    for name, rec in extra.items():
        bad.content[name] = rec
    arrays, _ = strategy.aggregate_train(1, [reply(1, record(0.0), 100), bad])
    report = strategy.take_report()
    assert global_value(arrays) == 0.0
    [rejected] = report.rejected
    assert any(problem in p for p in rejected["problems"]), rejected["problems"]
    entry = entry_of(report, 9)
    assert len(json.dumps(entry)) < 2_000                 # was ~1 MB for the 588 x 64 leak
    assert entry["metrics"]["num-examples"] == 100 and len(entry["metrics"]) <= 16
    assert all(len(p) < 1_000 for p in rejected["problems"])


def test_long_names_and_error_reasons_are_truncated_in_problems() -> None:
    strategy = configured(record(0.0))
    name = "n" * 100_000
    replies = [reply(1, record(0.0), 100),
               reply(7, error=Error(code=0, reason="r" * 1_000_000)),
               reply(8, record(0.0), 100, extra_records={name: record(0.0)}),
               reply(9, record({"backbone.weight": np.zeros((2, 2), np.float32),
                                "backbone.bias": np.zeros(2, np.float32),
                                name: np.zeros(1, np.float32)}), 100)]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.take_report()
    assert global_value(arrays) == 0.0
    assert [r["node_id"] for r in report.rejected] == [7, 8, 9]
    for rejected in report.rejected:
        assert all(len(p) < 1_000 for p in rejected["problems"]), rejected
    assert len(json.dumps(report.replies)) < 10_000


def test_an_array_in_an_evaluate_reply_is_rejected() -> None:
    strategy = server_strategy(min_available_nodes=1, min_evaluate_nodes=1)
    honest = reply(1, None, 100, metrics={"acc": 0.5})
    leak = reply(9, record(0.0), 100, metrics={"acc": 1.0})    # e.g. embeddings of faces
    metrics = strategy.aggregate_evaluate(1, [honest, leak])
    report = strategy.take_report()
    assert metrics is not None and metrics["acc"] == 0.5
    [rejected] = report.rejected
    assert rejected["node_id"] == 9
    assert "evaluate replies carry no ArrayRecord, got ['arrays']" in rejected["problems"][0]


# --- nothing raises out of aggregation ---------------------------------------------------


def test_a_reply_whose_data_breaks_the_arithmetic_is_rejected(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception no check foresaw, raised by one reply's data inside Flower's FedAvg:
    that reply is rejected with the reason and the traceback is logged; the round goes on."""
    decode = Array.numpy

    def numpy(self: Array) -> np.ndarray:
        value = decode(self)
        if value.size and np.all(value == 7.0):
            raise RuntimeError("cannot decode a 7")
        return value

    monkeypatch.setattr(Array, "numpy", numpy)
    strategy = configured(record(0.0))
    replies = [reply(1, record(1.0), 100), reply(9, record(7.0), 100),
               reply(2, record(3.0), 100)]
    with caplog.at_level(ERROR, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, replies)
        report = strategy.take_report()
    assert global_value(arrays) == pytest.approx(2.0)
    [rejected] = report.rejected
    assert rejected["node_id"] == 9
    assert rejected["problems"] == [
        "aggregation failed on this reply: RuntimeError: cannot decode a 7"]
    entry = entry_of(report, 9)
    assert not entry["accepted"] and entry["weight"] is None
    assert "Traceback" in caplog.text and "cannot decode a 7" in caplog.text


def test_an_error_no_reply_reproduces_is_raised_not_swallowed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = configured(record(0.0))

    def broken(server_round: int, replies: object) -> None:
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(strategy.strategy, "aggregate_train", broken)
    with caplog.at_level(ERROR, logger="flwr"), pytest.raises(ZeroDivisionError):
        strategy.aggregate_train(1, honest_three_and(100))
    assert "aggregation raised" in caplog.text and strategy.take_report().rejected == []


def test_a_non_finite_aggregate_keeps_the_previous_arrays() -> None:
    """Finite float32 replies whose mean overflows (trimmed mean sums in float32)."""
    strategy = configured(record(0.0), rule="trimmed-mean")
    replies = [reply(i, record(3e38), 100) for i in (1, 2, 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None


# --- run config --------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, expected", [
    ("fraction-train", 2.0, "a fraction in (0, 1]"),
    ("fraction-train", math.nan, "a fraction in (0, 1]"),
    ("fraction-train", 0.0, "a fraction in (0, 1]"),
    ("fraction-evaluate", 1.5, "a fraction in [0, 1]"),
    ("stage1-rounds", -3, "an integer >= 1"),
    ("stage1-rounds", 0, "an integer >= 1"),
    ("stage2-rounds", -1, "an integer >= 0"),
    ("local-epochs", 0, "an integer >= 1"),
    ("min-nodes", 0, "an integer >= 1"),
    ("eval-fold", 42, "an LFW View 2 fold, 0..9"),
    ("eval-fold", -1, "an LFW View 2 fold, 0..9"),
    ("max-identities", -5, "an integer >= 0 (0 = all identities)"),
    ("server-eval-pairs", -1, "an integer >= 0"),
    ("round-timeout", math.inf, "a finite number > 0"),
    ("round-timeout", 0.0, "a finite number > 0"),
    ("out-dir", "runs/mine", "an absolute path"),
    ("max-update-norm", -1.0, "a finite number >= 0 (0 = off)"),
    ("max-update-norm", math.nan, "a finite number >= 0"),
    ("partition-scheme", "zipf", "one of uniform, dirichlet, big-small"),
    ("partition-seed", -1, "an integer >= 0"),
    ("aggregation", "mean", "valid rules: fedavg, median"),
    ("aggregation-backend", "dask", "valid backends: flower, streaming, ray"),
    ("dp-noise-multiplier", -1.0, ">= 0"),
    ("dp-clipping-norm", 0.0, "> 0"),
    ("dp-target-delta", 1.0, "(0, 1)"),
    ("dp-max-epsilon", math.inf, ">= 0"),
    ("weighting", "size", "valid: num-examples, equal"),
    ("max-num-examples", 0, "an integer >= 1"),
    ("max-weight-ratio", 0.5, "0 (off) or a finite number >= 1"),
    ("max-weight-ratio", math.inf, "0 (off) or a finite number >= 1"),
])
def test_run_config_names_the_key_and_what_was_expected(key: str, value: object,
                                                        expected: str) -> None:
    with pytest.raises(ValueError) as info:
        run_config({key: value})
    message = str(info.value)
    assert message.startswith(f"run config {key!r}:") and expected in message, message


def test_run_config_accepts_the_edges_and_normalises_names() -> None:
    cfg = run_config({"fraction-train": 1, "fraction-evaluate": 0.0, "stage2-rounds": 0,
                      "eval-fold": 9, "max-identities": 0, "max-update-norm": 0.0,
                      "out-dir": "/abs/run", "aggregation": "Trimmed_Mean",
                      "aggregation-backend": " Streaming ", "weighting": "Equal",
                      "max-weight-ratio": 0, "max-num-examples": 1})
    assert cfg.fraction_train == 1.0 and cfg.aggregation == "trimmed-mean"
    assert cfg.aggregation_backend == "streaming" and cfg.weighting == "equal"
    assert cfg.max_weight_ratio == 0.0
    with pytest.raises(ValueError, match="run config 'unknown-key': unknown key; valid keys: "):
        run_config({"unknown-key": 3})
    with pytest.raises(TypeError, match="run config 'max-num-examples': expected int"):
        run_config({"max-num-examples": 1e6})


def test_negative_rounds_stop_the_server_before_it_writes_anything(tmp_path) -> None:
    """The issue: stage1-rounds=-3 "succeeded" and wrote an untrained final/generator.pt."""
    from federation.server_app import run_server

    out = tmp_path / "run"
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"stage1-rounds": -3, "out-dir": str(out)})
    with pytest.raises(ValueError, match="run config 'stage1-rounds'"):
        run_server(FakeGrid([1, 2]), context)
    assert not out.exists()


def test_max_update_norm_error_names_the_run_config_key() -> None:
    with pytest.raises(ValueError, match="run config 'max-update-norm'"):
        run_config({"max-update-norm": -1.0})
    with pytest.raises(ValueError, match="max_weight_ratio"):
        make_strategy(max_weight_ratio=0.5)
    with pytest.raises(ValueError, match="max_num_examples"):
        make_strategy(max_num_examples=0)
    with pytest.raises(ValueError, match="valid: num-examples, equal"):
        make_strategy(weighting="size")
