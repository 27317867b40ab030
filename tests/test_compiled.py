"""Compiled inference (minusface/compiled.py and the policy's "bf16+compiled"): the same output
as eager, never stale weights, eager when compilation fails, and compiled only where the work
pays for the compilation."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from federation.service.model import PLAN_BUCKETS, Embedder, bucket_pieces, served_model
from federation.service.payload import npy_bytes
from minusface import compiled, precision
from minusface.frontend import MinusFaceFrontend
from minusface.generator import UNetGenerator
from tests.service_server import Service, make_bundle


@pytest.fixture(autouse=True)
def fresh_policy(monkeypatch, tmp_path):
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.delenv(compiled.ENV, raising=False)
    precision.forget()
    yield
    precision.forget()


def with_bf16_units(monkeypatch) -> None:
    real = precision.cpu_features()
    fake = precision.CpuFeatures(real.model, True, True, real.capability, real.flags_digest)
    monkeypatch.setattr(precision, "cpu_features", lambda: fake)


def eager_bf16(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x.contiguous(memory_format=torch.channels_last)).float()


@pytest.mark.skipif(not compiled.compile_available()[0], reason="no C++ compiler for inductor")
def test_compiled_forward_matches_eager_and_follows_weight_changes() -> None:
    torch.manual_seed(0)
    g = UNetGenerator(width=4).eval()
    x = torch.randn(2, 192, 112, 112)
    fc = compiled.FrozenCompiled(g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fc(x).float()
    assert fc.failed is None and fc.compiles == 1
    ref = eager_bf16(g, x)
    assert float((out - ref).norm() / ref.norm()) < 1e-2
    # the snapshot is frozen: an in-place update (an optimizer step) must trigger a recompile,
    # and a compiled graph still holding the old weights would be far off
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(-0.5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        moved = fc(x).float()
    ref2 = eager_bf16(g, x)
    assert fc.compiles == 2
    assert float((moved - ref2).norm() / ref2.norm()) < 1e-2
    assert float((moved - out).norm() / out.norm()) > 0.1
    # load_state_dict copies into the same tensors: also seen
    g.load_state_dict(UNetGenerator(width=4).state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fc(x)
    assert fc.compiles == 3


def test_a_failing_compilation_runs_eager_and_says_so(monkeypatch, caplog) -> None:
    def broken(*_a, **_k):
        def fn(_x):
            raise RuntimeError("InductorError: no compiler today")
        return fn
    monkeypatch.setattr(torch, "compile", broken)
    g = UNetGenerator(width=4).eval()
    x = torch.randn(1, 192, 112, 112)
    fc = compiled.FrozenCompiled(g)
    with caplog.at_level(logging.WARNING, logger="minusface.compiled"), torch.no_grad():
        out = fc(x)
        again = fc(x)
    assert fc.failed and "no compiler today" in fc.failed
    with torch.no_grad():
        assert torch.equal(out, g(x)) and torch.equal(again, out)
    assert sum("failed" in r.message for r in caplog.records) == 1


def test_switched_off_by_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(compiled.ENV, "off")
    assert compiled.compile_available() == (False, f"${compiled.ENV} is off")


def _eager_probe(_b: int):
    return {"float32": lambda: None, "bf16": lambda: None, "bf16+channels_last": lambda: None}


def _plan(monkeypatch, calls: float, measured: dict | None, net: str = "net") -> precision.Plan:
    """plan_for with the eager probe faked (bf16+channels_last 10 ms) and the compiled
    measurement `measured` (None: the compiled probe must not run)."""
    monkeypatch.setattr(precision, "time_alternating",
                        lambda runs, *_: {k: {"float32": 20.0, "bf16": 12.0}.get(k, 10.0) for k in runs})
    probed = []

    def fake_probe(choice, batch, probe, compiled_probe):
        probed.append(batch)
        assert measured is not None, "the compiled probe ran for a short job"
        return measured
    monkeypatch.setattr(precision, "_probe_compiled", fake_probe)
    monkeypatch.setattr(compiled, "compile_available", lambda: (True, ""))
    monkeypatch.setattr(precision, "compile_available", lambda: (True, ""))
    return precision.plan_for("protect", "cpu", lambda: net, 1, _eager_probe, calls=calls,
                              compiled_probe=lambda b: (lambda: None))


def test_the_policy_compiles_only_when_the_work_pays_for_it(monkeypatch) -> None:
    with_bf16_units(monkeypatch)
    # a short job (10 calls x 10 ms = 0.1 s of work) is never compiled, not even probed
    short = _plan(monkeypatch, 10, None, "a")
    assert short.choice == "bf16+channels_last" and "not compiled" in short.reason
    fast = {"ms": 6.0, "eager_ms": 10.0, "compile_s": 12.0}
    # 5,000 calls x 10 ms = 50 s of work: under COMPILE_WORTH_S, so not even probed
    assert precision.COMPILE_WORTH_S > 50
    assert _plan(monkeypatch, 5_000, None, "a2").choice == "bf16+channels_last"
    # 20,000 calls (200 s of work) save 80 s > 12 s of compilation
    assert _plan(monkeypatch, 20_000, fast, "b").choice == precision.COMPILED
    # 15,000 calls (150 s of work) save 60 s < 100 s of compilation
    slow_compile = {**fast, "compile_s": 100.0}
    plan = _plan(monkeypatch, 15_000, slow_compile, "c")
    assert plan.choice == "bf16+channels_last" and "not compiled" in plan.reason
    assert "save 60 s" in plan.reason
    # a service (unbounded calls) takes it, unless it is not faster by the margin
    assert _plan(monkeypatch, math.inf, fast, "d").choice == precision.COMPILED
    assert _plan(monkeypatch, math.inf, {**fast, "ms": 9.8}, "e").choice == "bf16+channels_last"
    # a slow spell during the paired timing (eager 14 ms there, 10 ms in its own probe) must
    # not make a 9.8 ms compiled forward look like a win
    noisy = {"ms": 9.8, "eager_ms": 14.0, "compile_s": 1.0}
    assert _plan(monkeypatch, math.inf, noisy, "g").choice == "bf16+channels_last"
    failed = _plan(monkeypatch, math.inf, {"failed": "RuntimeError: x"}, "f")
    assert failed.choice == "bf16+channels_last" and "compile failed" in failed.reason


def test_compiled_measurement_is_cached_with_the_plan(monkeypatch) -> None:
    with_bf16_units(monkeypatch)
    fast = {"ms": 6.0, "eager_ms": 10.0, "compile_s": 12.0}
    assert _plan(monkeypatch, math.inf, fast, "net").choice == precision.COMPILED
    precision.forget()
    # a second process: read from the cache, no probe (the fake refuses to be called)
    assert _plan(monkeypatch, math.inf, None, "net").choice == precision.COMPILED
    precision.forget()
    # the same model in a short job: eager, from the same cache entry
    assert _plan(monkeypatch, 5, None, "net").choice == "bf16+channels_last"


def test_training_is_never_compiled(monkeypatch) -> None:
    with_bf16_units(monkeypatch)
    with precision.forced(precision.COMPILED):
        plan = precision.plan_for("stage2", "cpu", lambda: "n", 8, _eager_probe)
    assert plan.choice == "bf16"


@pytest.mark.skipif(not compiled.compile_available()[0], reason="no C++ compiler for inductor")
def test_protect_through_the_compiled_g_gives_the_eager_x_p() -> None:
    torch.manual_seed(0)
    fe = MinusFaceFrontend(generator=UNetGenerator(width=4)).eval()
    faces = torch.rand(3, 3, 112, 112) * 2 - 1       # micro-batches of 2 and a short 1
    with precision.forced(precision.COMPILED):
        xp_c = fe.protect(faces, rng=torch.Generator().manual_seed(3), register=False)
    with precision.forced("bf16+channels_last"):
        xp_e = fe.protect(faces, rng=torch.Generator().manual_seed(3), register=False)
    fc = compiled.compiled_for(fe.generator)
    assert fc.compiles == 1 and fc.failed is None
    # one graph, for the full micro-batch; the short last one ran eager
    assert set(fc.first_call_s) == {(2, 192, 112, 112)}
    assert xp_c.dtype == torch.float32 and xp_c.shape == (3, 3, 112, 112)
    assert float((xp_c - xp_e).abs().max()) < 1e-3


def test_bucket_pieces_cover_every_image_once() -> None:
    for n in range(1, 130):
        pieces = bucket_pieces(n)
        assert sum(k for _, k in pieces) == n
        assert [s for s, _ in pieces] == [sum(k for _, k in pieces[:i]) for i in range(len(pieces))]
        assert all(k in PLAN_BUCKETS for _, k in pieces)
    assert bucket_pieces(13) == [(0, 8), (8, 4), (12, 1)]


def test_embedder_pieces_give_the_unsplit_embeddings(monkeypatch, tmp_path) -> None:
    """The compile-enabled Embedder runs f_p on bucket-sized pieces; every image must land in
    its own row (float32 and no compilation here, so only the splitting is compared)."""
    monkeypatch.setenv(precision.ENV, "float32")
    monkeypatch.setenv(compiled.ENV, "off")
    served = served_model(make_bundle(tmp_path / "final") / "server")
    views = torch.rand(13, 2, 3, 112, 112)
    whole = Embedder(served)(views)
    pieces = Embedder(served, compile=True)
    assert pieces.calls == math.inf
    assert torch.allclose(pieces(views), whole, atol=1e-5)
    assert torch.allclose(pieces(views[:1]), whole[:1], atol=1e-5)


@pytest.mark.slow
def test_serve_cpu_compile_answers_with_the_eager_embeddings(tmp_path, monkeypatch) -> None:
    """`minusfed serve --cpu-compile` as a user starts it: start-up probes (and where it wins,
    compiles) every bucket, then /v1/embed gives f_p's embeddings (bf16 tolerance)."""
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache"))   # inherited by the server
    bundle = make_bundle(tmp_path / "final")
    svc = Service(tmp_path, bundle / "server", tmp_path / "gallery.db",
                  extra=["--cpu-compile"]).wait(timeout=1500)
    try:
        x = np.random.default_rng(0).random((3, 3, 112, 112), dtype=np.float32)
        with svc.http() as h:
            r = h.post("/v1/embed", content=npy_bytes(x),
                       headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 200, r.text
        got = torch.tensor(r.json()["embeddings"])
        f_p = served_model(bundle / "server").model
        with torch.no_grad():
            ref = F.normalize(f_p(torch.from_numpy(x)), dim=1)
        assert got.shape == ref.shape
        assert float((got * ref).sum(dim=1).min()) > 0.99
        log = svc.log()
        # every bucket's plan was decided at start-up and says why (compiled or not)
        assert log.count("cpu precision [embed]") >= len(PLAN_BUCKETS) or \
            "neither AMX-BF16 nor AVX512-BF16" in log, log
    finally:
        svc.stop()


def test_a_jobs_short_last_call_never_probes_a_compilation(monkeypatch) -> None:
    """`minusfed protect` hands its folder's last odd face to protect() alone: that call's
    batch-1 shape must not start a compile probe, however long the job."""
    with_bf16_units(monkeypatch)
    monkeypatch.setattr(precision, "compile_available", lambda: (True, ""))

    def refuse(*_a, **_k):
        raise AssertionError("compiled probe for a call smaller than one micro-batch")
    monkeypatch.setattr(precision, "_probe_compiled", refuse)
    fe = MinusFaceFrontend(generator=UNetGenerator(width=4)).eval()
    xp = fe.protect(torch.rand(1, 3, 112, 112) * 2 - 1, register=False, expected_faces=10**9)
    assert xp.shape == (1, 3, 112, 112)
