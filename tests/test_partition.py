"""Identity partitioners: disjoint cover, determinism, skew, big-small shares, errors, summary."""

from __future__ import annotations

import numpy as np
import pytest

from simulation.partition import (
    SCHEMES,
    format_summary,
    partition_for_client,
    partition_identities,
    summarize,
)

N_IDS, N_CLIENTS = 500, 10


@pytest.fixture(scope="module")
def counts() -> dict[str, int]:
    rng = np.random.default_rng(123)
    return {f"id{i:04d}": int(c) for i, c in enumerate(rng.geometric(0.2, N_IDS))}


def _cv(partition, counts) -> float:
    images = np.array([r["images"] for r in summarize(partition, counts)], dtype=float)
    return float(images.std() / images.mean())


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_identity_exactly_once(counts, scheme):
    parts = partition_identities(counts, N_CLIENTS, scheme, seed=1)
    assert len(parts) == N_CLIENTS
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == N_IDS
    assert set(flat) == set(counts)
    assert all(p for p in parts)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_deterministic_per_seed(counts, scheme):
    a = partition_identities(counts, N_CLIENTS, scheme, seed=7)
    assert a == partition_identities(dict(reversed(list(counts.items()))), N_CLIENTS, scheme, seed=7)
    assert a != partition_identities(counts, N_CLIENTS, scheme, seed=8)
    assert partition_for_client(counts, N_CLIENTS, 3, scheme, seed=7) == a[3]


def test_accepts_lists_of_paths(counts):
    paths = {k: [f"{k}/{j}.jpg" for j in range(v)] for k, v in counts.items()}
    assert partition_identities(paths, N_CLIENTS, seed=2) == partition_identities(counts, N_CLIENTS, seed=2)


def test_uniform_is_balanced(counts):
    parts = partition_identities(counts, N_CLIENTS, "uniform", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _cv(parts, counts) < 0.05


def test_dirichlet_small_alpha_more_skewed(counts):
    for seed in range(3):
        skewed = partition_identities(counts, N_CLIENTS, "dirichlet", seed=seed, alpha=0.1)
        uniform = partition_identities(counts, N_CLIENTS, "uniform", seed=seed)
        assert _cv(skewed, counts) > 3 * _cv(uniform, counts)
        assert min(len(p) for p in skewed) >= 2


def test_dirichlet_min_identities(counts):
    parts = partition_identities(counts, 50, "dirichlet", seed=0, alpha=0.05, min_identities=5)
    assert min(len(p) for p in parts) >= 5
    with pytest.raises(ValueError, match="needs 510"):
        partition_identities(counts, 51, "dirichlet", min_identities=10)
    with pytest.raises(ValueError, match="alpha"):
        partition_identities(counts, N_CLIENTS, "dirichlet", alpha=0)


def test_big_small_shares(counts):
    parts = partition_identities(counts, 20, "big-small", seed=0, num_big=2, big_share=0.6)
    big = sum(len(p) for p in parts[:2])
    assert abs(big / N_IDS - 0.6) <= 1 / N_IDS
    assert abs(len(parts[0]) - len(parts[1])) <= 1
    small = [len(p) for p in parts[2:]]
    assert max(small) - min(small) <= 1 and min(len(parts[0]), len(parts[1])) > max(small)
    with pytest.raises(ValueError, match="num_big"):
        partition_identities(counts, 2, "big-small", num_big=2)
    with pytest.raises(ValueError, match="big_share"):
        partition_identities(counts, 5, "big-small", big_share=1.0)


def test_errors(counts):
    with pytest.raises(ValueError, match="uniform.*dirichlet.*big-small"):
        partition_identities(counts, 4, "zipf")
    for k in (0, N_IDS + 1):
        with pytest.raises(ValueError, match=rf"num_clients={k}.*\({N_IDS}\)"):
            partition_identities(counts, k)
    with pytest.raises(ValueError, match="client_id"):
        partition_for_client(counts, 4, 4)
    with pytest.raises(TypeError):
        partition_identities({"a": "a.jpg"}, 1)


def test_summary_totals(counts):
    parts = partition_identities(counts, N_CLIENTS, "dirichlet", seed=3)
    rows = summarize(parts, counts)
    assert [r["client"] for r in rows] == list(range(N_CLIENTS))
    assert sum(r["identities"] for r in rows) == N_IDS
    assert sum(r["images"] for r in rows) == sum(counts.values())
    text = format_summary(rows)
    assert f"total {N_IDS:>10} {sum(counts.values()):>8}" in text
    assert "min" in text and "median" in text and "max" in text
