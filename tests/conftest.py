"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from flwr.common.logger import FLOWER_LOGGER

from task.config import DEFAULT_DATA
from tests.flower_log import FlowerLog

ALLOW_NO_DATA = "MINUSFED_ALLOW_NO_DATA"


def pytest_configure(config: pytest.Config) -> None:
    """The suite checks the float32 path (no probes, bit-stable numbers), module-scoped fixtures
    and the processes tests start included; the bf16 policy has its own tests
    (tests/test_precision.py), which set MINUSFED_CPU_PRECISION themselves."""
    os.environ["MINUSFED_CPU_PRECISION"] = "float32"


@pytest.fixture(scope="session")
def lfw_root() -> Path:
    """LFW 112x112 folder (env MINUSFED_DATA, default ../shared/data/lfw_112_centercrop).

    Missing data fails the test: a CI machine without the faces must not pass by skipping every
    test that trains.  Set MINUSFED_ALLOW_NO_DATA=1 to skip those tests instead (a quick check
    on a machine without the data)."""
    root = Path(os.environ.get("MINUSFED_DATA") or DEFAULT_DATA)
    if not (root / "images").is_dir() or not (root / "pairs.txt").is_file():
        message = (f"LFW data not found at {root}: expected images/ and pairs.txt there "
                   f"(set MINUSFED_DATA to the lfw_112_centercrop folder, or "
                   f"{ALLOW_NO_DATA}=1 to skip the tests that need it)")
        if os.environ.get(ALLOW_NO_DATA) == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    return root


@pytest.fixture
def one_torch_thread():
    """Attack training on a shared 2-core machine: one torch thread avoids the spin-waiting that
    makes oversubscribed intra-op threads up to 10x slower (measured with bench/train_step.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def site_dirs(tmp_path_factory, monkeypatch) -> Path:
    """Each test's sites cache faces and keep margin heads in its own folders, never in
    ~/.cache or ~/.local/state (clients/site_state.py); flwr run / SuperNode subprocesses
    inherit these variables."""
    root = tmp_path_factory.mktemp("site")
    monkeypatch.setenv("MINUSFED_CACHE_DIR", str(root / "cache"))
    monkeypatch.setenv("MINUSFED_STATE_DIR", str(root / "state"))
    return root


@pytest.fixture
def site_log():
    """Flower's log lines during the test (`.lines`, `.text()`)."""
    handler = FlowerLog()
    FLOWER_LOGGER.addHandler(handler)
    yield handler
    FLOWER_LOGGER.removeHandler(handler)
