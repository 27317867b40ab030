"""task.models and task.wire: one key scheme for g, one generator loader, one site seed."""

from __future__ import annotations

import pytest
import torch

from minusface.presets import get_preset
from minusface.weights import WeightsError
from task.models import generator_from_arrays, initial_arrays, site_seed
from task.records import STAGE1
from task.wire import prefixed, select, unflatten


def test_generator_keys_round_trip_and_select_keeps_only_g() -> None:
    arrays = initial_arrays(STAGE1, get_preset("tiny"), 0)
    g = select(arrays, "generator")
    assert g and all(k.startswith("generator.") for k in g)
    assert len(g) + len(select(arrays, "recognizer")) == len(arrays)
    assert prefixed(unflatten(arrays, "generator"), "generator") == g


def test_generator_from_arrays_builds_g_at_the_width_of_its_weights() -> None:
    preset = get_preset("tiny").with_(generator_width=6)
    arrays = initial_arrays(STAGE1, preset, 0)
    g = generator_from_arrays(arrays)                # recognizer keys are ignored
    assert g.width == 6
    assert all(torch.equal(v, arrays[f"generator.{k}"]) for k, v in g.state_dict().items())


@pytest.mark.parametrize("arrays, expected", [
    ({"recognizer.fc.weight": torch.zeros(2, 2)}, "no 'enc1.0.weight'"),
    ({"generator.enc1.0.weight": torch.zeros(4, 192, 3, 3)}, "do not fit the U-Net"),
    ({"generator.enc1.0.weight": torch.zeros(4, 3, 3, 3)}, "do not fit a U-Net of width 4"),
])
def test_a_record_that_is_no_generator_is_refused_by_name(arrays, expected) -> None:
    with pytest.raises(WeightsError, match=f"generator arrays: .*{expected}"):
        generator_from_arrays(arrays)


def test_site_seeds_keep_their_numbers() -> None:
    """Runs made before the seed had one home repeat: run seed x 7919 + partition + 100 x round."""
    assert site_seed(0, 3) == 3
    assert site_seed(2, 1) == 2 * 7919 + 1
    assert site_seed(2, 1, 4) == 2 * 7919 + 1 + 400
