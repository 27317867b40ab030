"""Aggregation backends: streaming (strategy/streaming.py) and Ray (strategy/ray_backend.py).

Both must give the plain weighted average (and Flower's FedAvg result) to float rounding, with
the reference's key order and dtypes, and plug into `make_strategy(backend=...)` without
changing validation or metrics.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from strategy import BACKENDS, StreamingWeightedMean, make_strategy
from strategy.backends import BACKEND_AVERAGES, ray_average, streaming_average
from strategy.ray_backend import plan_shards
from strategy.streaming import weighted_mean
from tests.test_strategy import (  # noqa: F401  (task_identity: autouse fixture)
    configured,
    record,
    reply,
    task_identity,
    values,
)

WEIGHTS = [3, 1, 7, 2, 5]


def updates(seed: int = 0, n: int = len(WEIGHTS)) -> list[dict[str, np.ndarray]]:
    """Small updates with a float32 matrix, a 0-d float32, an int64 counter, a float64."""
    rng = np.random.default_rng(seed)
    return [
        {
            "layer.weight": rng.standard_normal((5, 7)).astype(np.float32),
            "layer.scale": np.float32(rng.standard_normal()).reshape(()),
            "bn.num_batches_tracked": np.array(10 * i + 3, np.int64),
            "layer.bias": rng.standard_normal(300_001),  # float64, spans several blocks
        }
        for i in range(n)
    ]


def by_hand(ups: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """sum_i w_i a_i / sum_i w_i in float64, cast back (integers rounded)."""
    total = float(sum(weights))
    out = {}
    for key, first in ups[0].items():
        mean = sum(w * u[key].astype(np.float64) for u, w in zip(ups, weights)) / total
        if first.dtype.kind in "iu":
            mean = np.rint(mean)
        out[key] = np.asarray(mean).astype(first.dtype)
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        rtol = 1e-6 if want[key].dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=rtol, err_msg=key)


def flower_fedavg(ups: list[dict[str, np.ndarray]], weights: list[float]) -> dict:
    contents = [
        RecordDict({"arrays": record(u), "m": MetricRecord({"num-examples": w})})
        for u, w in zip(ups, weights)
    ]
    return {k: v.numpy() for k, v in aggregate_arrayrecords(contents, "num-examples").items()}


# --- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", ["float64", "float32"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernel", ["torch", "numpy"])
def test_streaming_equals_weighted_average_and_flower(accumulate: str, threads: int,
                                                      kernel: str) -> None:
    ups = updates()
    acc = StreamingWeightedMean(accumulate, block=1000, threads=threads, kernel=kernel)
    for u, w in zip(ups, WEIGHTS):
        acc.add(u, w)
    assert acc.count == len(ups) and acc.total_weight == sum(WEIGHTS)
    got = acc.result()
    want = by_hand(ups, WEIGHTS)
    if accumulate == "float32":  # float32 sums of 5 terms: a few ulps
        got = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in got.items()}
        want32 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in want.items()}
        for key in want:
            np.testing.assert_allclose(got[key], want32[key], rtol=1e-5, atol=1e-6)
    else:
        assert_same(got, want)
    flower = flower_fedavg(ups, WEIGHTS)
    for key in ("layer.weight", "layer.scale", "layer.bias"):
        np.testing.assert_allclose(got[key], flower[key], rtol=1e-5, atol=1e-6)
    assert got["bn.num_batches_tracked"] == np.rint(flower["bn.num_batches_tracked"])


def test_streaming_like_order_and_dtypes_and_errors() -> None:
    ups = updates(n=2)
    like = {k: ups[0][k] for k in reversed(list(ups[0]))}
    got = weighted_mean(((u, 1.0) for u in ups), like=like)
    assert list(got) == list(like)
    assert_same(got, {k: by_hand(ups, [1, 1])[k] for k in like})

    acc = StreamingWeightedMean()
    with pytest.raises(ValueError, match="no updates"):
        acc.result()
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and > 0"):
            acc.add(ups[0], bad)
    acc.add(ups[0], 1)
    with pytest.raises(ValueError, match="missing"):
        acc.add({"layer.weight": ups[1]["layer.weight"]}, 1)
    wrong = dict(ups[1], **{"layer.weight": np.zeros((7, 5), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        acc.add(wrong, 1)
    acc.result()
    with pytest.raises(RuntimeError):
        acc.add(ups[1], 1)


def test_torch_kernel_on_read_only_half_and_foreign_byte_order_updates() -> None:
    """What Flower hands over: read-only buffers; also float16 wires and a big-endian array
    (torch cannot view it: the NumPy kernel folds that one)."""
    rng = np.random.default_rng(3)
    ups = []
    for _ in range(4):
        u = {"w16": rng.standard_normal(70_001).astype(np.float16),
             "w32": rng.standard_normal((3, 5)).astype(np.float32),
             "big": rng.standard_normal(9).astype(">f4"),
             "empty": np.zeros((0, 4), np.float32)}
        for value in u.values():
            value.setflags(write=False)
        ups.append(u)
    weights = [2.0, 1.0, 0.5, 4.0]
    want = by_hand(ups, weights)
    for accumulate in ("float64", "float32"):
        got = {k: StreamingWeightedMean(accumulate, kernel=k) for k in ("torch", "numpy")}
        for acc in got.values():
            for u, w in zip(ups, weights):
                acc.add(u, w)
        torch_mean, numpy_mean = got["torch"].result(), got["numpy"].result()
        for key in want:
            assert torch_mean[key].dtype == want[key].dtype and torch_mean[key].shape == \
                want[key].shape, key
            np.testing.assert_allclose(torch_mean[key].astype(np.float64),
                                       numpy_mean[key].astype(np.float64), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(torch_mean[key].astype(np.float64),
                                       want[key].astype(np.float64), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="kernel"):
        StreamingWeightedMean(kernel="cuda")


def test_merge_of_partial_sums_equals_one_pass() -> None:
    ups = updates()
    left, right = StreamingWeightedMean(), StreamingWeightedMean()
    for i, (u, w) in enumerate(zip(ups, WEIGHTS)):
        (left if i < 2 else right).add(u, w)
    both = StreamingWeightedMean()
    both.merge(left.sums(), left.total_weight, left.count)
    both.merge(right.sums(), right.total_weight, right.count)
    assert both.count == len(ups)
    assert_same(both.result(like=ups[0]), by_hand(ups, WEIGHTS))


@pytest.mark.parametrize("kernel", ["torch", "numpy"])
@pytest.mark.parametrize("accumulate", ["float32", "float64"])
@pytest.mark.parametrize("group", [1, 3])
def test_streaming_takes_any_finite_weight(kernel: str, accumulate: str, group: int) -> None:
    """Weights past float32's range (torch raised "value cannot be converted to type float
    without overflow" for 3.5e38) and near float64's: no exception, the right mean."""
    ups = updates(n=4)
    for weights in ([3.5e38, 3.5e38, 7e38, 3.5e38], [1.0, 1e300, 2e300, 1.0],
                    [1e-300, 3.0, 1.0, 5e20]):
        acc = StreamingWeightedMean(accumulate, block=1000, kernel=kernel, group=group)
        for u, w in zip(ups, weights):
            acc.add(u, w)
        got = acc.result(like=ups[0])
        want = by_hand(ups, [w / max(weights) for w in weights])
        for key in want:
            np.testing.assert_allclose(got[key].astype(np.float64),
                                       want[key].astype(np.float64), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{weights} {key}")


def test_streaming_sums_after_a_huge_weight_are_absolute() -> None:
    ups = updates(n=2)
    left = StreamingWeightedMean()
    left.add(ups[0], 1.0)
    left.add(ups[1], 1e30)               # rescales the accumulators
    assert left.total_weight == pytest.approx(1e30)
    sums = left.sums()
    np.testing.assert_allclose(sums["layer.weight"],
                               ups[0]["layer.weight"] + 1e30 * ups[1]["layer.weight"].astype(
                                   np.float64), rtol=1e-12)
    both = StreamingWeightedMean()
    both.merge(sums, left.total_weight, left.count)
    assert_same(both.result(like=ups[0]), by_hand(ups, [1e-30, 1.0]))


def test_plan_shards_by_bytes() -> None:
    sizes = {"a": 40, "b": 40, "c": 100, "d": 10, "e": 10}
    assert plan_shards(sizes, 80) == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_shards(sizes, 10**6) == [list(sizes)]
    assert plan_shards(sizes, 1) == [[k] for k in sizes]


# --- Ray -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        # "local": never attach to another Ray cluster running on this machine
        ray.init(address="local", num_cpus=1, include_dashboard=False,
                 log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.parametrize("fan_in, shard_bytes", [(2, 200), (3, 1 << 30)])
def test_ray_equals_weighted_average(local_ray, fan_in: int, shard_bytes: int) -> None:
    from strategy.ray_backend import ray_weighted_mean

    ups = updates()
    got = ray_weighted_mean(
        zip(ups, WEIGHTS), fan_in=fan_in, shard_bytes=shard_bytes, max_in_flight=2
    )
    assert_same(got, by_hand(ups, WEIGHTS))
    one = ray_weighted_mean([(ups[0], 2.0)], like=ups[0])
    assert_same(one, ups[0])
    with pytest.raises(ValueError, match="keys differ"):
        ray_weighted_mean([(ups[0], 1.0), ({"x": np.zeros(1)}, 1.0)])


def test_ray_takes_any_finite_weight(local_ray) -> None:
    from strategy.ray_backend import ray_weighted_mean

    ups = updates(n=3)
    for weights in ([3.5e38, 3.5e38, 7e38], [1.0, 1e300, 1.0]):
        got = ray_weighted_mean(zip(ups, weights), fan_in=2, accumulate_dtype="float32")
        want = by_hand(ups, [w / max(weights) for w in weights])
        for key in want:
            np.testing.assert_allclose(got[key].astype(np.float64),
                                       want[key].astype(np.float64), rtol=1e-5, atol=1e-6)


# --- make_strategy(backend=...) ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["streaming", "ray"])
def test_strategy_backend_rejects_bad_update_and_averages_the_rest(
    backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "ray":
        request.getfixturevalue("local_ray")
    reference = record({"w": np.zeros((2, 2), np.float32), "bn.count": np.array(0)})

    def model(value: float, count: int) -> ArrayRecord:
        return record({"w": np.full((2, 2), value, np.float32), "bn.count": np.array(count)})

    strategy = configured(reference, backend=backend, max_update_norm=50.0)
    replies = [
        reply(1, model(1.0, 4), 10),
        reply(99, model(1000.0, 0), 10),                       # norm too large
        reply(7, record({"w": np.full((2, 2), np.nan, np.float32),
                         "bn.count": np.array(1)}), 5),         # NaN
        reply(2, model(3.0, 8), 30),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    got = values(arrays)
    assert list(got) == ["w", "bn.count"]
    np.testing.assert_allclose(got["w"], 2.5)  # (10*1 + 30*3) / 40
    assert got["w"].dtype == np.float32
    assert got["bn.count"].dtype == np.int64 and got["bn.count"].shape == ()
    assert got["bn.count"] == 7  # (10*4 + 30*8) / 40
    assert sorted(r["node_id"] for r in strategy.take_report().rejected) == [7, 99]
    assert metrics["train_loss"] == pytest.approx((10 * 1 + 30 * 2) / 40)

    flower = configured(reference, max_update_norm=50.0)
    want, want_metrics = flower.aggregate_train(1, replies)
    assert want is not None and want_metrics is not None
    for key, value in values(want).items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6)
    assert dict(metrics) == dict(want_metrics)


def test_backend_names() -> None:
    assert BACKENDS == ("flower", "streaming", "ray")
    assert {"flower": None, "streaming": streaming_average,
                                "ray": ray_average} == BACKEND_AVERAGES
    assert make_strategy("fedavg", backend=" Streaming ").strategy.average is streaming_average
    assert type(make_strategy().strategy) is FedAvg          # "flower": Flower's own FedAvg
    with pytest.raises(ValueError, match="valid backends: flower, streaming, ray"):
        make_strategy("fedavg", backend="dask")


def test_other_rules_keep_flowers_arithmetic() -> None:
    strategy = configured(record({"w": np.zeros(2, np.float32)}), rule="median",
                          backend="streaming")
    replies = [reply(i + 1, record({"w": np.array([v, v], np.float32)}), 1)
               for i, v in enumerate([1.0, 2.0, 10.0])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0])


def test_strategy_backends_weigh_like_flower_after_clipping(request: pytest.FixtureRequest
                                                          ) -> None:
    """The clipped weights are what every backend uses (same result as Flower's FedAvg)."""
    request.getfixturevalue("local_ray")
    ups = updates(n=4)
    reference = record({k: np.zeros_like(v) for k, v in ups[0].items()})
    claims = [100, 120, 90, 50_000]                          # the last one clipped to 4 x 100
    results = {}
    for backend in BACKENDS:
        strategy = configured(reference, backend=backend)
        replies = [reply(i + 1, record(u), n) for i, (u, n) in enumerate(zip(ups, claims))]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None and strategy.take_report().replies[-1]["weight"] == 400
        results[backend] = values(arrays)
    want = by_hand(ups, [100, 120, 90, 400])
    for backend, got in results.items():
        for key in ("layer.weight", "layer.scale", "layer.bias"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{backend} {key}")
        assert got["bn.num_batches_tracked"] == want["bn.num_batches_tracked"], backend


def test_run_config_has_the_backend_key() -> None:
    from task.config import run_config

    assert run_config({}).aggregation_backend == "flower"
    assert run_config({"aggregation-backend": "ray"}).aggregation_backend == "ray"
