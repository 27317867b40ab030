"""Tests for strategy/: reply validation, aggregation rules, checkpoints.

Replies are real Flower Messages built with `make_message(Metadata(...), ...)`
(a plain `Message(...)` needs a running task); `configure_train` builds
instruction Messages itself, so the TaskIdentity ids are set in a fixture.
"""

import json
import time
from collections.abc import Callable, Iterable
from logging import WARNING
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedTrimmedAvg
from flwr.supercore.task_identity import TaskIdentity

from strategy import (
    BACKENDS,
    RULES,
    CheckpointError,
    CheckpointStore,
    SharedKeyStrategy,
    make_strategy,
    validate_update,
)
from task.config import AGGREGATION_BACKENDS, AGGREGATION_RULES, run_config

SHAPES = {"backbone.weight": (2, 2), "backbone.bias": (2,)}


def record(value: float | dict[str, np.ndarray], dtype: str = "float32") -> ArrayRecord:
    """ArrayRecord with the SHAPES keys filled with `value` (or given arrays)."""
    if isinstance(value, dict):
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in value.items()})
    return ArrayRecord(
        {k: Array(np.full(s, value, dtype=dtype)) for k, s in SHAPES.items()}
    )


def reply(
    node_id: int,
    arrays: ArrayRecord | None = None,
    num_examples: float | None = 1,
    *,
    metrics: dict[str, float] | None = None,
    error: Error | None = None,
    extra_records: dict[str, ArrayRecord] | None = None,
) -> Message:
    """A train reply from `node_id` as Flower's own strategy tests build them."""
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"ins-{node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type=MessageType.TRAIN,
    )
    if error is not None:
        return make_message(metadata, error=error)
    metric_values: dict[str, float] = {"train_loss": float(node_id)}
    if num_examples is not None:
        metric_values["num-examples"] = num_examples
    metric_values.update(metrics or {})
    content = RecordDict({"metrics": MetricRecord(metric_values)})
    if arrays is not None:
        content["arrays"] = arrays
    for name, rec in (extra_records or {}).items():
        content[name] = rec
    return make_message(metadata, content=content)


def values(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def good_but(**changes: np.ndarray) -> ArrayRecord:
    """A plausible update (all ones) with some arrays replaced or added."""
    return record(values(record(1.0)) | changes)


class FakeGrid(Grid):
    """Grid with fixed node ids; `send_and_receive` calls `handler` per message."""

    def __init__(
        self,
        node_ids: list[int],
        handler: Callable[[Message], Message] | None = None,
    ) -> None:
        self.node_ids = node_ids
        self.handler = handler
        self.sent: list[Message] = []

    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(  # type: ignore[no-untyped-def]
        self, content, message_type, dst_node_id, group_id, ttl=None
    ):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def send_and_receive(  # type: ignore[no-untyped-def]
        self, messages, *, timeout=None
    ):
        messages = list(messages)
        self.sent.extend(messages)
        assert self.handler is not None
        return [self.handler(msg) for msg in messages]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction Messages read run/node/task ids set by a running ServerApp."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def server_strategy(**kwargs: object) -> SharedKeyStrategy:
    """`make_strategy` with the run config's default weight bounds (as the ServerApp passes
    them: cap 1,000,000 examples, ratio 4) unless `kwargs` set them."""
    cfg = run_config({})
    kwargs.setdefault("weighting", cfg.weighting)
    kwargs.setdefault("max_num_examples", cfg.max_num_examples)
    kwargs.setdefault("max_weight_ratio", cfg.max_weight_ratio or None)
    return make_strategy(**kwargs)  # type: ignore[arg-type]


def configured(reference: ArrayRecord, **kwargs: object) -> SharedKeyStrategy:
    """A server strategy that has sent `reference` in round 1."""
    kwargs.setdefault("min_available_nodes", 1)
    kwargs.setdefault("min_train_nodes", 1)
    strategy = server_strategy(**kwargs)
    strategy.configure_train(1, reference, ConfigRecord(), FakeGrid([1, 2, 3]))
    return strategy


# --- FedAvg and validation -----------------------------------------------------


def test_weighted_average_of_three_updates() -> None:
    strategy = configured(record(0.0))
    updates = [
        {"backbone.weight": [[1, 2], [3, 4]], "backbone.bias": [1, 0]},
        {"backbone.weight": [[2, 2], [2, 2]], "backbone.bias": [2, 4]},
        {"backbone.weight": [[4, 0], [0, 8]], "backbone.bias": [4, 8]},
    ]
    replies = [
        reply(i + 1, record({k: np.asarray(v, np.float32) for k, v in u.items()}), n)
        for i, (u, n) in enumerate(zip(updates, [1, 2, 1]))
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    got = values(arrays)
    # (1*u1 + 2*u2 + 1*u3) / 4, computed by hand
    np.testing.assert_allclose(got["backbone.weight"], [[2.25, 1.5], [1.75, 4.0]])
    np.testing.assert_allclose(got["backbone.bias"], [2.25, 4.0])
    assert got["backbone.weight"].dtype == np.float32
    assert list(arrays.keys()) == list(SHAPES)  # reference order
    assert metrics["train_loss"] == pytest.approx((1 * 1 + 2 * 2 + 3 * 1) / 4)
    assert strategy.take_report().rejected == []


BAD_REPLIES: dict[str, tuple[Callable[[], Message], str]] = {
    "missing-key": (
        lambda: reply(99, record({"backbone.weight": np.ones((2, 2), np.float32)})),
        "missing keys: 'backbone.bias'",
    ),
    "extra-key": (
        lambda: reply(99, good_but(**{"head.weight": np.ones((3, 2))})),
        "unexpected keys: 'head.weight'",
    ),
    "wrong-shape": (
        lambda: reply(99, good_but(**{"backbone.bias": np.ones(3, np.float32)})),
        "'backbone.bias': shape [3] != expected [2]",
    ),
    "wrong-dtype": (
        lambda: reply(99, record(1.0, dtype="float64")),
        "dtype float64 != expected float32",
    ),
    "nan": (
        lambda: reply(
            99, good_but(**{"backbone.bias": np.array([1, np.nan], np.float32)})
        ),
        "'backbone.bias': 1 non-finite value(s)",
    ),
    "norm-too-large": (
        lambda: reply(99, record(1000.0)),
        "update norm 2449.49 exceeds max_update_norm 50",
    ),
    "error-reply": (
        lambda: reply(99, error=Error(code=0, reason="client crashed")),
        "client crashed",
    ),
    "no-weight": (
        lambda: reply(99, record(1.0), num_examples=None),
        "lacks the weight 'num-examples'",
    ),
    "zero-weight": (
        lambda: reply(99, record(1.0), num_examples=0),
        "'num-examples' must be a whole number >= 1, got 0",
    ),
    "frozen-echoed-back": (
        lambda: reply(99, record(1.0), extra_records={"frozen-generator": record(0.0)}),
        "expected exactly one ArrayRecord named 'arrays'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_bad_reply_is_rejected_and_round_goes_on(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_bad, problem = BAD_REPLIES[case]
    strategy = configured(record(0.0), max_update_norm=50.0)
    replies = [reply(1, record(1.0), 10), make_bad(), reply(2, record(3.0), 30)]
    with caplog.at_level(WARNING, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    for value in values(arrays).values():
        np.testing.assert_allclose(value, 2.5)  # (10*1 + 30*3) / 40
    report = strategy.take_report()
    assert len(report.rejected) == 1
    rejected = report.rejected[0]
    assert (rejected["round"], rejected["node_id"]) == (1, 99)
    assert any(problem in p for p in rejected["problems"]), rejected["problems"]
    assert "rejected reply from node 99" in caplog.text and problem in caplog.text
    assert [(e["node_id"], e["accepted"]) for e in report.replies] == [
        (1, True), (99, False), (2, True)
    ]
    assert strategy.take_report().replies == []          # taken: the next one starts empty


def test_all_bad_replies_keep_previous_arrays() -> None:
    strategy = configured(record(0.0))
    replies = [reply(1, record(np.nan)), reply(2, record(1.0, dtype="float16"))]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert {r["node_id"] for r in strategy.take_report().rejected} == {1, 2}


def test_integer_buffers_keep_their_dtype() -> None:
    def model(count: int) -> ArrayRecord:
        return record({"w": np.ones(2, np.float32), "bn.num_batches_tracked": count})

    for rule in ("fedavg", "median"):
        strategy = configured(model(0), rule=rule)
        replies = [reply(1, model(4), 1), reply(2, model(7), 2)]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        counter = arrays["bn.num_batches_tracked"].numpy()
        assert counter.dtype == np.int64 and counter.shape == ()
        assert counter == 6  # fedavg: (4 + 2 * 7) / 3; median: rint(5.5)


def test_metric_reported_by_some_nodes_only_is_dropped() -> None:
    strategy = configured(record(0.0))
    replies = [reply(1, record(1.0), 1, metrics={"acc": 0.5}), reply(2, record(3.0), 1)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert "acc" not in metrics and metrics["train_loss"] == pytest.approx(1.5)
    assert strategy.take_report().replies[0]["metrics"]["acc"] == 0.5  # per-node log keeps it


def test_validate_update_reports_norm_header_and_size() -> None:
    ref = {"a": np.zeros(2, np.float32)}
    update = ArrayRecord({"a": Array(np.array([3, 4], np.float32))})
    assert validate_update(update, ref, 5.0) == []
    assert validate_update(update, ref, 4.9) == [
        "update norm 5 exceeds max_update_norm 4.9"
    ]
    lying = Array(dtype="float32", shape=(2,), stype=update["a"].stype,
                  data=Array(np.zeros(2, np.float64)).data)
    assert "header says float32[2] but data is float64[2]" in validate_update(
        ArrayRecord({"a": lying}), ref, None
    )[0]
    assert validate_update(update, ref, None, max_bytes=10)[0].startswith(
        "oversized update"
    )


# --- robust rules --------------------------------------------------------------


def robust(
    rule: str, firsts: list[float], seconds: list[float], **kw: object
) -> np.ndarray:
    """Aggregate replies whose 2-vector "w" is (firsts[i], seconds[i])."""
    strategy = configured(record({"w": np.zeros(2, np.float32)}), rule=rule, **kw)
    replies = [
        reply(i + 1, record({"w": np.array([a, b], np.float32)}), 1)
        for i, (a, b) in enumerate(zip(firsts, seconds))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return arrays["w"].numpy()


def test_median() -> None:
    np.testing.assert_allclose(robust("median", [1, 2, 10], [5, -1, 0]), [2, 0])


def test_trimmed_mean() -> None:
    got = robust("trimmed-mean", [1, 2, 3, 4, 100], [-50, 0, 1, 2, 3], beta=0.2)
    np.testing.assert_allclose(got, [3, 1])  # mean(2,3,4), mean(0,1,2)


def test_krum_and_multi_krum() -> None:
    # n=5, f=1: score = sum of squared distances to the n-f-2=2 nearest others:
    # 7.25, 3.25, 2.5, 4.25, huge -> Krum picks 2.5; MultiKrum averages the 4 best
    points, zeros = [0, 1, 2.5, 3, 20], [0] * 5
    krum = robust("krum", points, zeros, num_malicious_nodes=1)
    np.testing.assert_allclose(krum, [2.5, 0])
    multi = robust("multi-krum", points, zeros, num_malicious_nodes=1)
    np.testing.assert_allclose(multi, [(0 + 1 + 2.5 + 3) / 4, 0])


def test_make_strategy_rules() -> None:
    assert RULES == AGGREGATION_RULES and BACKENDS == AGGREGATION_BACKENDS  # one entry each
    rule = make_strategy("Trimmed_Mean", beta=0.1).strategy
    assert isinstance(rule, FedTrimmedAvg) and rule.beta == 0.1
    with pytest.raises(ValueError) as info:
        make_strategy("fedsgd")
    assert all(rule in str(info.value) for rule in RULES)


# --- configure_train and a whole federation ------------------------------------


def test_frozen_arrays_go_into_every_train_message() -> None:
    frozen = record({"gen.weight": np.ones(3, np.float32)})
    strategy = make_strategy(frozen_arrays={"frozen-generator": frozen})
    config = ConfigRecord({"lr": 0.1})
    grid = FakeGrid([5, 6, 7])
    messages = list(strategy.configure_train(3, record(0.0), config, grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [5, 6, 7]
    for msg in messages:
        assert msg.metadata.message_type == MessageType.TRAIN
        assert set(msg.content.keys()) == {"arrays", "config", "frozen-generator"}
        assert msg.content["frozen-generator"] is frozen
        assert msg.content["config"]["server-round"] == 3
    with pytest.raises(ValueError, match="clashes"):
        make_strategy(frozen_arrays={"arrays": frozen})


def test_start_with_one_nan_node_keeps_honest_average() -> None:
    def client(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == MessageType.EVALUATE:
            metrics = MetricRecord({"acc": 0.5 * node, "num-examples": 1})
            return Message(RecordDict({"metrics": metrics}), reply_to=msg)
        glob = values(msg.content["arrays"])
        step = {1: 1.0, 2: 3.0, 3: np.nan}[node]
        out = record({k: (v + step).astype(np.float32) for k, v in glob.items()})
        metrics = MetricRecord({"train_loss": 1.0, "num-examples": 1})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    strategy = make_strategy(
        min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3
    )
    grid = FakeGrid([1, 2, 3], client)
    result = strategy.start(grid=grid, initial_arrays=record(0.0), num_rounds=2)
    for value in values(result.arrays).values():
        np.testing.assert_allclose(value, 4.0)  # two rounds of mean(+1, +3)
    assert [(r["round"], r["node_id"]) for r in result.report.rejected] == [(1, 3), (2, 3)]
    assert result.evaluate_metrics_clientapp[2]["acc"] == pytest.approx(1.0)
    assert len([e for e in result.report.replies if e["phase"] == "evaluate"]) == 6
    assert [(n["round"], n["phase"], n["sampled"]) for n in result.report.nodes] == [
        (1, "train", [1, 2, 3]), (1, "evaluate", [1, 2, 3]),
        (2, "train", [1, 2, 3]), (2, "evaluate", [1, 2, 3])]
    again = strategy.start(grid=grid, initial_arrays=record(0.0), num_rounds=1)
    assert {e["round"] for e in again.report.replies} == {1}   # only this call's rounds


# --- CheckpointStore -----------------------------------------------------------


def test_checkpoint_round_trip_and_rotation(tmp_path: Path) -> None:
    import torch

    store = CheckpointStore(tmp_path / "out")
    assert store.latest() is None
    arrays = record({"w": np.arange(4, dtype=np.float32), "n": np.array(3, np.int64)})
    extra = {"lr": np.float32(0.5), "seen": (1, 2), "nested": {"ids": [4, 5]}}
    store.save(1, "stage1", arrays, extra=extra, metrics={"acc": np.float64(0.25)})
    arrays2 = {"w": torch.ones(4), "n": np.array(4)}
    store.save(2, "stage1", arrays2, metrics={"acc": 0.5})

    latest = store.latest()
    assert latest is not None and (latest["round"], latest["stage"]) == (2, "stage1")
    assert torch.equal(latest["arrays"]["w"], torch.ones(4))
    previous = store.previous()
    assert previous is not None and previous["round"] == 1
    assert torch.equal(previous["arrays"]["w"], torch.arange(4, dtype=torch.float32))
    assert previous["arrays"]["n"].dtype == torch.int64
    assert previous["extra"] == {"lr": 0.5, "seen": (1, 2), "nested": {"ids": [4, 5]}}
    assert {p.name for p in store.out_dir.iterdir()} == {
        "checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl"
    }


def test_checkpoint_failed_write_leaves_last_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    store = CheckpointStore(tmp_path)
    store.save(1, "stage1", {"w": np.zeros(2, np.float32)})

    def broken_save(obj, file):  # type: ignore[no-untyped-def]
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        store.save(2, "stage1", {"w": np.ones(2, np.float32)})
    assert not list(tmp_path.glob("*.tmp"))
    latest = store.latest()
    assert latest is not None and latest["round"] == 1
    assert len(store.read_metrics()) == 1
    with pytest.raises(TypeError, match=r"extra\['bad'\]"):
        store.save(3, "stage1", {"w": np.ones(2)}, extra={"bad": object()})


def test_metrics_jsonl_lines(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, "stage2", {"w": np.zeros(1)}, metrics={"loss": 1.5, "acc": 0.25})
    store.append_metrics({"round": 1, "node_id": 7, "metrics": {"loss": np.float32(2)}})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == (
        '{"metrics": {"acc": 0.25, "loss": 1.5}, "round": 1, "stage": "stage2"}'
    )
    assert json.loads(lines[1]) == {"metrics": {"loss": 2.0}, "node_id": 7, "round": 1}


def test_corrupt_checkpoint_names_the_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, "stage1", {"w": np.zeros(2)})
    store.save(2, "stage1", {"w": np.ones(2)})
    store.checkpoint_path.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError) as info:
        store.latest()
    assert str(store.checkpoint_path) in str(info.value)
    assert str(store.previous_path) in str(info.value)
    previous = store.previous()
    assert previous is not None and previous["round"] == 1


def test_relative_out_dir_is_rejected() -> None:
    with pytest.raises(ValueError, match="absolute"):
        CheckpointStore(Path("runs/out"))
