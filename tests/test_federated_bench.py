"""bench/federated_lfw.py: the federated loop the GPU accuracy benchmark runs without Flower."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import federated_lfw as fl  # noqa: E402
from minusface.presets import get_preset  # noqa: E402


def test_fedavg_is_weighted_mean_with_integer_buffers_rounded():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(6)}
    out = fl.fedavg([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert out["w"].dtype == torch.float32
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 5      # 0.25*3 + 0.75*6 = 5.25


def test_fedavg_matches_flower_fedavg_arithmetic():
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    rng = np.random.default_rng(0)
    states = [{"a": torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32)),
               "b": torch.from_numpy(rng.standard_normal(5).astype(np.float32))} for _ in range(3)]
    weights = [10, 30, 7]
    records = [RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": w})})
               for s, w in zip(states, weights)]
    flower = aggregate_arrayrecords(records, "num-examples").to_torch_state_dict()
    ours = fl.fedavg(states, weights)
    for k in ours:
        assert torch.allclose(ours[k], flower[k], atol=1e-6)


def test_split_sites_partitions_identities_and_relabels():
    labels = np.repeat(np.arange(9), 2)
    images = np.arange(18, dtype=np.uint8)[:, None, None, None].repeat(3, axis=3)
    train = type("T", (), {"labels": labels, "images": images})()
    sites = fl.split_sites(train, 3, seed=0)
    assert sum(s.train.num_images for s in sites) == 18
    seen = set()
    for s in sites:
        assert set(np.unique(s.train.labels)) == set(range(s.num_classes))
        ids = {int(v) // 2 for v in s.train.images[:, 0, 0, 0]}
        assert not ids & seen
        seen |= ids


@pytest.mark.slow      # a whole in-process federation: minutes on 2 busy cores
def test_run_federated_tiny_both_stages(tmp_path):
    rng = np.random.default_rng(0)
    preset = get_preset("tiny").with_(batch_size=4)
    sites = [fl.Site(fl.SiteArrays(rng.integers(0, 255, (8, 112, 112, 3), dtype=np.uint8),
                                   np.repeat(np.arange(4), 2))) for _ in range(2)]
    faces = torch.rand(6, 3, 112, 112) * 2 - 1
    test = fl.TestSet(faces, np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4]),
                      np.array([True, False, True, False]), np.arange(4) % 2)
    out = fl.run_federated(preset, sites, 1, test, torch.device("cpu"), log=lambda s: None)
    for stage in ("stage1", "stage2"):
        assert 0.0 <= out[stage]["accuracy"] <= 1.0
        assert len(out["round_seconds"][stage]) == 1
    assert out["generator"] is not None and "enc1.0.weight" in out["generator"]


def test_over_wire_rounds_floats_both_ways_and_keeps_integers():
    state = {"w": torch.tensor([1.0 + 2 ** -12, 3.0]), "n": torch.tensor(7)}
    assert fl.over_wire(state, "float32")["w"][0] == state["w"][0]
    got = fl.over_wire(state, "float16")
    assert got["w"].dtype == torch.float32 and float(got["w"][0]) == 1.0   # 11-bit mantissa
    assert got["n"].dtype == torch.int64 and int(got["n"]) == 7
    with pytest.raises(ValueError, match="wire"):
        fl.run_federated(get_preset("tiny"), [], 1, None, torch.device("cpu"), wire="int8")


def test_weight_drift_is_relative_l2_over_float_tensors():
    ref = {"a": torch.tensor([3.0, 4.0]), "n": torch.tensor(5)}
    other = {"a": torch.tensor([3.0, 4.5]), "n": torch.tensor(9)}
    assert fl.weight_drift(ref, ref) == 0.0
    assert abs(fl.weight_drift(ref, other) - 0.1) < 1e-12
