"""The server's fast paths must give exactly what the plain ones give: zero-copy reading of
received arrays, the one-pass finiteness check, the blocked norm, grouped folding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array
from flwr.common.constant import SType

from strategy.streaming import StreamingWeightedMean
from strategy.validation import array_view, nonfinite_count, squared_distance, validate_update


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    np.array(7, dtype=np.int64),
    np.zeros((0, 5), np.float16),
    np.array([True, False]),
])
def test_array_view_equals_flowers_decoding_without_a_copy(value):
    arr = Array(value)
    view = array_view(arr)
    ref = arr.numpy()
    assert view.dtype == ref.dtype and view.shape == ref.shape
    assert np.array_equal(view, ref)
    assert not view.flags.writeable                 # the received bytes are never changed
    if value.size:
        assert np.shares_memory(view, np.frombuffer(arr.data, np.uint8))


def test_array_view_refuses_short_data_and_object_arrays():
    good = Array(np.ones(100, np.float32))
    short = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])
    with pytest.raises(ValueError, match="header says 400"):
        array_view(short)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    obj = Array(dtype="object", shape=(1,), stype=SType.NUMPY, data=buf.getvalue())
    with pytest.raises(ValueError, match="object"):
        array_view(obj)


def test_validation_reports_a_short_array_as_undecodable():
    ref = {"w": np.zeros(10, np.float32)}
    good = Array(np.ones(10, np.float32))
    short = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-8])
    from flwr.app import ArrayRecord
    problems = validate_update(ArrayRecord({"w": short}), ref)
    assert problems and "cannot decode" in problems[0]


def test_nonfinite_count_is_exact():
    x = np.ones(1000, np.float32)
    assert nonfinite_count(x) == 0
    x[[3, 500]] = np.nan
    x[7] = -np.inf
    assert nonfinite_count(x) == 3
    both = np.array([np.inf, -np.inf, 1.0], np.float16)     # inf + -inf = nan: still counted
    assert nonfinite_count(both) == 2
    big32 = np.full(10_000, np.finfo(np.float32).max, np.float32)
    assert nonfinite_count(big32) == 0              # float64 sum of float32 cannot overflow
    big64 = np.array([1e308, 1e308], np.float64)    # the sum overflows; the values are finite
    assert nonfinite_count(big64) == 0


@pytest.mark.parametrize("dtype, rel", [(np.float32, 1e-5), (np.float64, 1e-12),
                                        (np.float16, 1e-12)])
def test_squared_distance_matches_float64_reference_across_blocks(dtype, rel):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(600_000).astype(dtype)     # > 2 blocks of 2^18
    b = (a + 1e-2 * rng.standard_normal(600_000)).astype(dtype)   # a real update: a small step
    want = float(np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    assert squared_distance(a, b) == pytest.approx(want, rel=rel)
    far = rng.standard_normal(600_000).astype(dtype)
    want_far = float(np.sum((a.astype(np.float64) - far.astype(np.float64)) ** 2))
    assert squared_distance(a, far) == pytest.approx(want_far, rel=rel)
    assert squared_distance(a[:0], b[:0]) == 0.0


@pytest.mark.parametrize("kernel", ["torch", "numpy"])
@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_grouped_folding_is_bit_identical_to_one_at_a_time(kernel, accumulate):
    rng = np.random.default_rng(1)
    updates = [({"big": rng.standard_normal(5_003).astype(np.float32),
                 "half": rng.standard_normal(17).astype(np.float16),
                 "count": np.array(rng.integers(0, 100), np.int64),
                 "empty": np.zeros(0, np.float32)}, float(rng.integers(1, 50)))
               for _ in range(11)]
    results = []
    for group in (1, 3, 8):
        acc = StreamingWeightedMean(accumulate, block=1_000, kernel=kernel, group=group)
        for arrays, w in updates[:-1]:
            acc.add(arrays, w)
        acc.merge(updates[-1][0], updates[-1][1])   # a partial sum folds with the rest
        results.append(acc.result())
    for got in results[1:]:
        for key in results[0]:
            assert got[key].dtype == results[0][key].dtype
            assert np.array_equal(got[key], results[0][key]), key


def test_sums_flush_pending_updates():
    acc = StreamingWeightedMean("float32", group=4)
    acc.add({"w": np.array([1.0, 2.0], np.float32)}, 2)
    acc.add({"w": np.array([3.0, 4.0], np.float32)}, 1)
    assert np.array_equal(acc.sums()["w"], np.array([5.0, 8.0], np.float32))
    acc.add({"w": np.array([1.0, 1.0], np.float32)}, 1)
    assert np.array_equal(acc.result()["w"], np.array([1.5, 2.25], np.float32))
    with pytest.raises(ValueError, match="group"):
        StreamingWeightedMean(group=0)
