"""The CPU precision policy (minusface/precision.py): never slower than float32, cached, logged,
overridable, and never letting bf16 into the DCT maps; X_p under bf16 vs float32 on real faces."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from clients.data import load_image
from minusface import dct, precision
from minusface.frontend import MinusFaceFrontend
from minusface.presets import get_preset
from minusface.trainer import build_models, make_optimizer, step_plan, train_step
from task.config import run_config


@pytest.fixture(autouse=True)
def fresh_policy(monkeypatch, tmp_path):
    """Each test: its own cache file, no memo from earlier tests, the process default back."""
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(precision.ENV, raising=False)
    precision.forget()
    yield
    precision.configure("auto")
    precision.forget()


def with_bf16_units(monkeypatch) -> None:
    """Pretend the CPU has AMX so "auto" probes here too (bf16 autocast runs on any CPU)."""
    real = precision.cpu_features()
    fake = precision.CpuFeatures(real.model, True, True, real.capability, real.flags_digest)
    monkeypatch.setattr(precision, "cpu_features", lambda: fake)


def sleeper(seconds: float):
    return lambda: time.sleep(seconds)


# --------------------------------------------------------------------------- choosing

def test_pick_keeps_float32_unless_a_bf16_mode_clearly_wins() -> None:
    assert precision.pick({"float32": 10.0, "bf16": 9.8, "bf16+channels_last": 9.7}) == "float32"
    assert precision.pick({"float32": 10.0, "bf16": 20.0, "bf16+channels_last": 30.0}) == "float32"
    assert precision.pick({"float32": 10.0, "bf16": 6.0, "bf16+channels_last": 4.0}) == \
        "bf16+channels_last"
    assert precision.pick({"float32": 10.0, "bf16": 5.0, "bf16+channels_last": 8.0}) == "bf16"


def test_auto_measures_caches_and_logs_once(monkeypatch, capsys) -> None:
    with_bf16_units(monkeypatch)
    calls = []

    def probe(batch: int):
        calls.append(batch)
        return {"float32": sleeper(0.03), "bf16": sleeper(0.05), "bf16+channels_last": sleeper(0.005)}
    plan = precision.plan_for("protect", "cpu", lambda: "net-A", 2, probe)
    assert plan.choice == "bf16+channels_last" and calls == [2]
    assert plan.ms["float32"] > plan.ms["bf16+channels_last"]
    again = precision.plan_for("protect", "cpu", lambda: "net-A", 2, probe)
    assert again is plan and calls == [2]                          # memoised in the process
    err = capsys.readouterr().err
    assert err.count("cpu precision [protect]: bf16+channels_last") == 1
    assert "float32" in err and " ms" in err                       # says why: the measurements

    cache = json.loads(precision.cache_path().read_text())
    (key,) = cache
    assert "net-A" in key and "batch 2" in key and torch.__version__ in key
    assert cache[key]["choice"] == "bf16+channels_last"

    precision.forget()                                             # a new process on this machine

    def no_probe(batch: int):
        raise AssertionError("probed although the machine's cache holds the answer")
    cached = precision.plan_for("protect", "cpu", lambda: "net-A", 2, no_probe)
    assert cached.choice == "bf16+channels_last" and "cached" in cached.reason
    other = precision.plan_for("protect", "cpu", lambda: "net-A", 1, probe)   # another batch
    assert calls == [2, 1] and other.choice == "bf16+channels_last"


def test_a_slower_bf16_is_never_picked(monkeypatch) -> None:
    with_bf16_units(monkeypatch)
    plan = precision.plan_for("stage1", "cpu", lambda: "net-B", 8, lambda b: {
        "float32": sleeper(0.01), "bf16": sleeper(0.03), "bf16+channels_last": sleeper(0.02)})
    assert plan.choice == "float32" and not plan.bf16


def test_no_bf16_units_means_float32_without_a_probe(monkeypatch) -> None:
    real = precision.cpu_features()
    monkeypatch.setattr(precision, "cpu_features", lambda: precision.CpuFeatures(
        "AMD EPYC (test)", False, False, real.capability, "x"))

    def no_probe(batch: int):
        raise AssertionError("probed on a CPU without bf16 units")
    plan = precision.plan_for("protect", "cpu", lambda: "net-C", 1, no_probe)
    assert plan.choice == "float32" and "neither AMX-BF16 nor AVX512-BF16" in plan.reason


def test_override_order_and_errors(monkeypatch) -> None:
    def no_probe(batch: int):
        raise AssertionError("a forced mode must not probe")
    precision.configure("bf16")                                   # the run config
    assert precision.plan_for("embed", "cpu", lambda: "n", 4, no_probe).choice == "bf16+channels_last"
    monkeypatch.setenv(precision.ENV, "float32")                  # the machine's operator wins
    assert precision.plan_for("embed", "cpu", lambda: "n", 4, no_probe).choice == "float32"
    assert precision.plan_for("embed", "cpu", lambda: "n", 4, no_probe, mode="bf16").bf16
    assert precision.plan_for("embed", "cuda", lambda: "n", 4, no_probe) is precision.NATIVE
    monkeypatch.setenv(precision.ENV, "fast")
    with pytest.raises(ValueError, match=r"\$MINUSFED_CPU_PRECISION: expected one of auto, float32, bf16"):
        precision.plan_for("embed", "cpu", lambda: "n", 4, no_probe)
    with pytest.raises(ValueError, match="run config 'cpu-precision': expected"):
        precision.configure("fp16")


def test_run_config_key_is_checked() -> None:
    assert run_config({}).cpu_precision == "auto"
    assert run_config({"cpu-precision": "bf16"}).to_flower()["cpu-precision"] == "bf16"
    with pytest.raises(ValueError, match="run config 'cpu-precision': expected one of auto, float32, bf16"):
        run_config({"cpu-precision": "int8"})


# --------------------------------------------------------------------------- wiring and DCT

def record_dct(monkeypatch) -> list[tuple]:
    """(map, input dtype, output dtype, autocast on inside) of every e / d call: as the front
    end calls them (what reaches e and d) and inside them (after their own float32 guard)."""
    from minusface import frontend
    seen: list[tuple] = []
    for owner, name in ((dct, "_encode"), (dct, "_decode"), (frontend, "encode"),
                        (frontend, "decode")):
        real = getattr(owner, name)

        def spy(x, *args, real=real, name=name):
            inside = torch.is_autocast_enabled("cpu") and name.startswith("_")
            out = real(x, *args)
            seen.append((name, x.dtype, out.dtype, inside))
            return out
        monkeypatch.setattr(owner, name, spy)
    return seen


def bf16_outputs_of(module: torch.nn.Module) -> list[torch.dtype]:
    dtypes: list[torch.dtype] = []
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
            break
    return dtypes


def test_bf16_never_reaches_the_dct_maps(monkeypatch) -> None:
    """Forced bf16: g and f run in bf16 (else this test would prove nothing) while e and d see
    float32 inputs, give float32 outputs and run with autocast off -- in protect(), in the
    stage-1 step (g + f trained through e and d) and in the stage-2 step."""
    monkeypatch.setenv(precision.ENV, "bf16")
    seen = record_dct(monkeypatch)
    torch.manual_seed(0)
    faces = torch.rand(3, 3, 112, 112) * 2 - 1
    fe = MinusFaceFrontend(width=4).eval()
    g_out = bf16_outputs_of(fe.generator)
    xp = fe.protect(faces, register=False)
    assert xp.dtype == torch.float32 and g_out and set(g_out) == {torch.bfloat16}
    preset = get_preset("tiny")
    for recipe in ("stage1", "stage2"):
        models = build_models(recipe, preset, 4, generator=fe.generator if recipe == "stage2" else None)
        f_out = bf16_outputs_of(models.recognizer)
        opt = make_optimizer(models, preset)
        train_step(models, faces, torch.tensor([0, 1, 2]), opt, torch.device("cpu"))
        assert f_out and set(f_out) == {torch.bfloat16}, recipe
    assert {s[0] for s in seen} == {"_encode", "_decode", "encode", "decode"}
    bad = [s for s in seen if s[1] != torch.float32 or s[2] != torch.float32 or s[3]]
    assert not bad, f"bf16 or autocast inside e/d: {bad[:3]}"


def test_float32_plan_is_the_pre_policy_code_bit_for_bit(monkeypatch) -> None:
    """float32 = autocast off and NCHW: protect() equals d(s(e(X) - g(e(X)))) computed by hand."""
    monkeypatch.setenv(precision.ENV, "float32")
    torch.manual_seed(1)
    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    fe = MinusFaceFrontend(width=4).eval()
    got = fe.protect(faces, rng=torch.Generator().manual_seed(7), register=False)
    from minusface.shuffle import shuffle_channels
    with torch.no_grad():
        x = dct.encode(faces)
        want = dct.decode(shuffle_channels(x - fe.generator(x), generator=torch.Generator().manual_seed(7)))
    assert torch.equal(got, want)


def test_training_probe_leaves_models_gradients_and_rng_alone(monkeypatch) -> None:
    with_bf16_units(monkeypatch)
    monkeypatch.setattr(precision, "PROBE_BATCH", 2)      # mechanics only: a short probe
    monkeypatch.setattr(precision, "PROBE_ITERS", 1)
    torch.manual_seed(3)
    models = build_models("stage1", get_preset("tiny"), 5)
    models.train()
    before = {k: v.clone() for k, v in models.recognizer.state_dict().items()}
    rng = torch.get_rng_state()
    plan = step_plan(models, 16, torch.device("cpu"))
    assert plan.choice in precision.CANDIDATES and set(plan.ms) == {"float32", "bf16"}  # no channels_last
    assert torch.equal(torch.get_rng_state(), rng)
    after = models.recognizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # BatchNorm stats too
    assert all(p.grad is None for p in models.recognizer.parameters())


def test_embed_context_runs_the_model_in_eval_mode_under_its_plan(monkeypatch) -> None:
    from minusface.eval import embed
    monkeypatch.setenv(precision.ENV, "bf16")
    models = build_models("stage2", get_preset("tiny"), 3, generator=MinusFaceFrontend(width=4).generator)
    models.recognizer.train()
    context, model_fn = precision.embed_context(models.recognizer, 8)
    out = bf16_outputs_of(models.recognizer)
    with context:
        emb = embed(model_fn, torch.rand(4, 3, 112, 112), batch_size=4)
    assert emb.dtype == torch.float32 and emb.shape == (4, 512)
    assert set(out) == {torch.bfloat16} and models.recognizer.training   # mode given back


# --------------------------------------------------------------------------- accuracy on LFW

def lfw_faces(root: Path, n: int) -> torch.Tensor:
    people = sorted(p for p in (root / "images").iterdir() if p.is_dir())[:n]
    return torch.stack([load_image(sorted(p.iterdir())[0]) for p in people])


def test_xp_bf16_vs_float32_on_real_faces_same_permutations(lfw_root) -> None:
    """The same LFW faces and the same permutations through g at the paper's width (untrained:
    no trained w = 64 generator ships with the repo), float32 vs bf16 + channels_last.  g's own
    output differs by bf16 rounding (measured 4.8e-3 relative); X_p = d(s(e - g)) much less, as e(X)
    dominates the residue of an untrained g.  Measured numbers are printed (-s)."""
    torch.manual_seed(0)
    faces = lfw_faces(lfw_root, 6)
    fe = MinusFaceFrontend(width=64).eval()
    out = {m: fe.protect(faces, rng=torch.Generator().manual_seed(11), register=False,
                         precision_mode=m) for m in ("float32", "bf16")}
    a, b = out["float32"], out["bf16"]
    rel = float((b - a).norm() / a.norm())
    a8, b8 = (a * 255).round(), (b * 255).round()
    differ = float((a8 != b8).float().mean())
    worst = float((a8 - b8).abs().max())
    with torch.no_grad():
        x = dct.encode(faces[:2])
        g32 = fe.generator(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g16 = fe.generator(x.contiguous(memory_format=torch.channels_last)).float()
    rel_g = float((g16 - g32).norm() / g32.norm())
    print(f"w = 64, 6 LFW faces: g(x) relative L2 {rel_g:.2e}; X_p relative L2 {rel:.2e}, "
          f"8-bit pixels that differ {100 * differ:.2f} %, largest difference {worst:.0f} levels")
    assert 0 < rel_g < 2e-2
    assert 0 < rel < 1e-2                 # > 0: bf16 really ran (else float32 twice)
    assert differ < 0.05 and worst <= 4
    assert float(b.min()) >= 0 and float(b.max()) <= 1


def test_the_probe_feeds_a_recognizer_its_own_input_channels():
    """The IR backbones register their input layer after the body: a probe that took the first
    Conv2d's channels fed f (192 channels) 8-channel faces and crashed the server's evaluation."""
    from minusface.backbones import build_backbone
    from minusface.precision import in_channels
    for channels in (3, 192):
        assert in_channels(build_backbone("ir18", channels, width=8)) == channels
        assert in_channels(build_backbone("mobilefacenet", channels)) == channels


def test_training_never_runs_channels_last_on_the_cpu(monkeypatch) -> None:
    """channels_last training aborted the process on an AVX512-BF16 EPYC (see TRAINING_TASKS):
    forced bf16 trains NCHW, probes offer no channels_last, inference keeps it."""
    monkeypatch.setenv(precision.ENV, "bf16")
    for task in precision.TRAINING_TASKS:
        assert precision.plan_for(task, "cpu", lambda: "n", 4, lambda b: {}).choice == "bf16"
    assert precision.plan_for("protect", "cpu", lambda: "n", 4, lambda b: {}).choice == \
        "bf16+channels_last"
    with precision.forced("bf16+channels_last"):
        assert precision.plan_for("stage2", "cpu", lambda: "n", 4, lambda b: {}).choice == "bf16"
    assert [p.choice for p in precision._candidates(training=True)] == ["float32", "bf16"]
    models = build_models("stage2", get_preset("tiny"), 3, generator=MinusFaceFrontend(width=4).generator)
    faces = torch.rand(3, 3, 112, 112) * 2 - 1
    train_step(models, faces, torch.tensor([0, 1, 2]), make_optimizer(models, get_preset("tiny")),
               torch.device("cpu"))
    assert all(p.is_contiguous() for p in models.recognizer.parameters())
