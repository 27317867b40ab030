"""Gallery search is exact: the column-major matrix, its growth, reload and sync agree with a
brute-force cosine search over what was enrolled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federation.service.gallery import Gallery, UnknownSubject

DIM = 32


def _reference(enrolled: list[tuple[str, np.ndarray]], q: np.ndarray, k: int
               ) -> list[tuple[str, float]]:
    best: dict[str, float] = {}
    qn = q / np.linalg.norm(q)
    for subject, v in enrolled:
        score = float(v @ qn / np.linalg.norm(v))
        best[subject] = max(best.get(subject, -2.0), score)
    return sorted(best.items(), key=lambda kv: -kv[1])[:k]


def _check(gallery: Gallery, enrolled: list[tuple[str, np.ndarray]], rng) -> None:
    for _ in range(5):
        q = rng.standard_normal(DIM).astype(np.float32)
        got = [(m.subject, m.score) for m in gallery.identify(torch.from_numpy(q), 4)]
        want = _reference(enrolled, q, 4)
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], atol=1e-5)
        for subject, score in want:
            assert gallery.verify(subject, torch.from_numpy(q)) == pytest.approx(score, abs=1e-5)


def test_search_is_exact_through_growth_reload_sync_and_delete(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "gallery.db"
    g = Gallery(path, DIM)
    enrolled: list[tuple[str, np.ndarray]] = []
    for i in range(40):                    # one by one: the buffer grows 16 -> 32 -> 64
        v = rng.standard_normal(DIM).astype(np.float32)
        g.enroll(f"p{i % 11}", torch.from_numpy(v))
        enrolled.append((f"p{i % 11}", v))
    _check(g, enrolled, rng)
    batch = rng.standard_normal((30, DIM)).astype(np.float32)
    g.enroll_many([f"q{i % 7}" for i in range(30)], torch.from_numpy(batch))
    enrolled += [(f"q{i % 7}", v) for i, v in enumerate(batch)]
    _check(g, enrolled, rng)

    other = Gallery(path, DIM)             # a second connection: reload, then sync appends
    _check(other, enrolled, rng)
    for _ in range(20):
        v = rng.standard_normal(DIM).astype(np.float32)
        g.enroll("late", torch.from_numpy(v))
        enrolled.append(("late", v))
    _check(other, enrolled, rng)

    assert g.delete("p3") == len([s for s, _ in enrolled if s == "p3"])
    enrolled = [(s, v) for s, v in enrolled if s != "p3"]
    _check(g, enrolled, rng)
    _check(other, enrolled, rng)
    with pytest.raises(UnknownSubject):
        other.verify("p3", torch.ones(DIM))
    g.close()
    other.close()
