"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lfw_112_centercrop"


@pytest.fixture(scope="session")
def lfw_root() -> Path:
    """LFW 112x112 folder (env MINUSFED_DATA, default ../shared/data/...); skip when absent."""
    root = Path(os.environ.get("MINUSFED_DATA", DEFAULT_DATA))
    if not (root / "images").is_dir() or not (root / "pairs.txt").is_file():
        pytest.skip(f"LFW data not found at {root} (set MINUSFED_DATA)")
    return root
