"""CPU precision and memory layout, chosen per model and batch by measurement.

Why: on a CPU with bf16 matrix units (Intel AMX-BF16, AVX512-BF16) bf16 autocast makes some of
our models several times faster and others slower (a narrow U-Net trained in bf16 loses to
float32: its convolutions are too small to pay for the casts).  A fixed rule would pick wrong
somewhere, so each *task* (what runs) on each *model shape* and batch size is probed once: a
few alternating iterations of every candidate, median milliseconds, the fastest kept only if it
beats float32 NCHW by `MARGIN` -- so the policy never picks a mode slower than float32.  The
choice is cached per machine in ``<cache dir>/cpu_precision.json`` keyed by CPU model, its
flags, thread count, torch version, task, model shape and batch, and memoised per process.

Tasks: "protect" (g forward, no grad), "stage1" (g + f forward and backward), "stage2" and
"baseline" (f_p / f forward and backward on 3-channel images), "embed" (f_p / f forward, no
grad: evaluation and the recognition service, `embed_context`).

Candidates: "float32" (NCHW, autocast explicitly off), "bf16" (CPU autocast to bfloat16) and
"bf16+channels_last" (inference: the input is made channels_last; training: the trained modules
are).  Inference in long-lived work may also get "bf16+compiled" (`minusface.compiled`: inductor
with frozen weights).  It costs seconds of compilation per process and input shape, so a caller
says how many forwards it expects (`calls`); it is probed only when that work would take at
least `COMPILE_WORTH_S` eagerly, and chosen only when the time it saves over those calls exceeds
the compilation it measured.  The DCT maps e and d always run in float32: `minusface.dct` turns
autocast off inside them and casts bf16 inputs up, and g's bf16 output meets e(X) in float32
(x - g(x) promotes).

Mode, first that is set: the `mode` argument, $MINUSFED_CPU_PRECISION (the site's operator
knows the machine), the process default from `configure()` (run config ``cpu-precision``),
"auto".  "float32" skips every probe and runs exactly the pre-policy code; "bf16" forces
bf16 + channels_last; "auto" probes, and picks float32 without probing on a CPU that has
neither AMX-BF16 nor AVX512-BF16.  Off the CPU the policy does nothing (CUDA keeps its own
bf16 autocast).  Each choice is logged once per process with the measured milliseconds.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import torch
from torch import nn

from .atomic import write_atomic
from .compiled import compile_available, compiled_for

ENV = "MINUSFED_CPU_PRECISION"
MODES = ("auto", "float32", "bf16")
TASKS = ("protect", "stage1", "stage2", "baseline", "embed")
CANDIDATES = ("float32", "bf16", "bf16+channels_last")
COMPILED = "bf16+compiled"                 # inference only, and only for long-lived work
COMPILE_WORTH_S = 120.0                     # shorter eager work is not worth the compile probe
COMPILE_PROBE_ITERS = 7                     # a compile costs seconds anyway; time it well
# Training never runs channels_last on the CPU: with torch 2.13 on an AMD EPYC with AVX512-BF16,
# the backward of channels_last modules aborted the process with heap corruption ("double free
# or corruption", segfaults) in 2 of 3 runs of a tiny stage-1 step, in bf16 and in float32,
# while NCHW bf16 ran clean (tests/test_precision.py).  Inference (no backward) keeps it.
TRAINING_TASKS = ("stage1", "stage2", "baseline")
CACHE_FILE = "cpu_precision.json"
CACHE_ENV, XDG_CACHE = "MINUSFED_CACHE_DIR", "XDG_CACHE_HOME"
MARGIN = 0.05            # a bf16 mode must beat float32 by 5 % (probe noise) to be chosen
PROBE_BATCH = 8          # training probes run at most this batch (seconds, not minutes)
PROBE_ITERS, PROBE_WARMUP = 3, 1

log = logging.getLogger(__name__)
_lock = threading.Lock()
_default_mode = "auto"
_forced: str | None = None
_plans: dict[str, Plan] = {}
# one training step: (modules by name, faces, labels) -> loss
Step = Callable[[Mapping[str, nn.Module], torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- what the CPU has

@dataclass(frozen=True)
class CpuFeatures:
    model: str
    amx_bf16: bool
    avx512_bf16: bool
    capability: str          # torch.backends.cpu.get_cpu_capability(): the kernels torch uses
    flags_digest: str        # short hash of all /proc/cpuinfo flags (cache key)

    @property
    def bf16_units(self) -> bool:
        return self.amx_bf16 or self.avx512_bf16

    def describe(self) -> str:
        units = [n for n, on in (("AMX-BF16", self.amx_bf16), ("AVX512-BF16", self.avx512_bf16)) if on]
        return f"{self.model} ({', '.join(units) or 'no bf16 matrix units'}; torch {self.capability})"


@cache
def cpu_features() -> CpuFeatures:
    """What this CPU offers, from /proc/cpuinfo (Linux) with torch's own checks as fallback."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    amx, avx = "amx_bf16" in flags, "avx512_bf16" in flags
    if not flags:                                    # not Linux: ask torch (private, may vanish)
        amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        avx = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    digest = hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return CpuFeatures(model or "unknown CPU", amx, avx,
                       torch.backends.cpu.get_cpu_capability(), digest)


# --------------------------------------------------------------------------- a plan

@dataclass(frozen=True)
class Plan:
    """How one task runs: `autocast()` around it, `layout()` on its inputs (inference) or
    `prepare()` on its modules (training).  `native` = not a CPU plan: change nothing."""
    task: str
    choice: str                                   # a CANDIDATES name, or "native"
    reason: str = ""
    ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def bf16(self) -> bool:
        return self.choice.startswith("bf16")

    @property
    def compiled(self) -> bool:
        return self.choice == COMPILED

    @property
    def channels_last(self) -> bool:
        return self.choice.endswith("channels_last") or self.compiled

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast, or autocast explicitly off (also inside an outer bf16 region)."""
        if self.choice == "native":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Inference: `model(x)` in this plan's layout, through its compiled forward if planned
        (call inside `autocast()`)."""
        if self.compiled:
            return compiled_for(model)(x)
        return model(self.layout(x))

    def prepare(self, *modules: nn.Module) -> None:
        """Training: put the modules in channels_last when the plan says so (idempotent)."""
        if self.channels_last:
            for m in modules:
                if not _is_channels_last(m):
                    m.to(memory_format=torch.channels_last)

    def line(self) -> str:
        timing = ", ".join(f"{k} {v:.1f} ms" for k, v in self.ms.items())
        return f"cpu precision [{self.task}]: {self.choice} ({self.reason}{'; ' if timing else ''}{timing})"


NATIVE = Plan("any", "native", "not a CPU")


def _is_channels_last(module: nn.Module) -> bool:
    for p in module.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return True


# --------------------------------------------------------------------------- mode

def configure(mode: str) -> None:
    """Process default (the run config's ``cpu-precision``); $MINUSFED_CPU_PRECISION wins."""
    global _default_mode
    _default_mode = check_mode(mode, "run config 'cpu-precision'")


def check_mode(mode: str, source: str) -> str:
    value = mode.strip().lower()
    if value not in MODES:
        raise ValueError(f"{source}: expected one of {', '.join(MODES)}, got {mode!r}")
    return value


@contextlib.contextmanager
def forced(choice: str) -> Iterator[None]:
    """Benchmarks: every plan in this block is `choice` (a CANDIDATES name), whatever the
    argument, environment or run config say."""
    global _forced
    if choice not in (*CANDIDATES, COMPILED):
        raise ValueError(f"forced: expected one of {', '.join((*CANDIDATES, COMPILED))}, "
                         f"got {choice!r}")
    before, _forced = _forced, choice
    try:
        yield
    finally:
        _forced = before


def current_mode(mode: str | None = None) -> tuple[str, str]:
    """(mode, where it came from); a mode may also be a CANDIDATES name (benchmarks)."""
    if _forced is not None:
        return _forced, "benchmark"
    if mode in (*CANDIDATES, COMPILED):
        return str(mode), "argument"
    if mode:
        return check_mode(mode, "cpu precision mode"), "argument"
    env = os.environ.get(ENV, "").strip()
    if env:
        return check_mode(env, f"${ENV}"), f"${ENV}"
    return _default_mode, "run config" if _default_mode != "auto" else "default"


# --------------------------------------------------------------------------- cache

def cache_path() -> Path | None:
    """<$MINUSFED_CACHE_DIR | $XDG_CACHE_HOME/minusfed | ~/.cache/minusfed>/cpu_precision.json;
    None when $MINUSFED_CACHE_DIR is "off" (probe every process)."""
    raw = os.environ.get(CACHE_ENV, "").strip()
    if raw.lower() == "off":
        return None
    if raw:
        return Path(raw).expanduser() / CACHE_FILE
    xdg = os.environ.get(XDG_CACHE, "")
    try:
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    except RuntimeError:
        return None
    return base / "minusfed" / CACHE_FILE


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); probing again", path, exc)
        return {}


def _write_cache(path: Path | None, key: str, entry: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = entry
        write_atomic(path, lambda f: f.write(json.dumps(data, indent=1, sort_keys=True).encode()))
    except OSError as exc:
        log.warning("%s: cannot write the precision cache (%s); set %s", path, exc, CACHE_ENV)


def model_signature(*modules: nn.Module) -> str:
    """Class names and parameter shapes (not values): the same network gets the same key."""
    parts = []
    for m in modules:
        shapes = ";".join("x".join(map(str, p.shape)) for p in m.parameters())
        parts.append(f"{type(m).__name__}:{hashlib.sha1(shapes.encode()).hexdigest()[:10]}")
    return "+".join(parts)


def cache_key(task: str, signature: str, batch: int) -> str:
    cpu = cpu_features()
    return (f"{cpu.model}|{cpu.flags_digest}|threads {torch.get_num_threads()}|torch "
            f"{torch.__version__}|{task}|{signature}|batch {batch}")


# --------------------------------------------------------------------------- probe and choose

def time_alternating(runs: Mapping[str, Callable[[], object]], iters: int,
                     warmup: int) -> dict[str, float]:
    """Median ms of each callable, the candidates alternating so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - t))
    return {name: statistics.median(v) for name, v in times.items()}


def pick(ms: Mapping[str, float], margin: float = MARGIN) -> str:
    """The fastest candidate, but float32 unless a bf16 mode beats it by `margin`."""
    best = min(ms, key=ms.__getitem__)
    return best if best != "float32" and ms[best] < (1 - margin) * ms["float32"] else "float32"


def plan_for(task: str, device: torch.device | str, signature: Callable[[], str], batch: int,
             probe: Callable[[int], Mapping[str, Callable[[], object]]],
             mode: str | None = None, calls: float = 0,
             compiled_probe: Callable[[int], Callable[[], object]] | None = None) -> Plan:
    """The plan of `task` for this model (`signature()`) and batch; `probe(batch)` builds one
    callable per candidate (only on a cache miss), each running one iteration under it.
    `compiled_probe(batch)` (inference) builds the compiled forward's callable; it is tried
    when the caller expects `calls` forwards worth `COMPILE_WORTH_S` (see `_with_compiled`)."""
    if torch.device(device).type != "cpu":
        return NATIVE
    if task not in TASKS:
        raise ValueError(f"cpu precision: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    chosen, source = current_mode(mode)
    training = task in TRAINING_TASKS
    if chosen == "bf16" or (training and chosen in ("bf16+channels_last", COMPILED)):
        chosen = "bf16" if training else "bf16+channels_last"
    if chosen in (*CANDIDATES, COMPILED):
        return _remember(f"{task}|{chosen}|{source}", Plan(task, chosen, f"forced by {source}"),
                         quiet=source == "benchmark")
    cpu = cpu_features()
    if not cpu.bf16_units:
        return _remember(f"{task}|nobf16", Plan(task, "float32", f"{cpu.model} has neither "
                                                 "AMX-BF16 nor AVX512-BF16"))
    key = cache_key(task, signature(), batch)
    eligible = compiled_probe is not None and calls > 0 and not training
    memo = f"{key}|calls {calls:g}" if eligible else key
    with _lock:
        if memo in _plans:
            return _plans[memo]
        path = cache_path()
        entry = _read_cache(path).get(key)
        allowed = {p.choice for p in _candidates(training)}
        if isinstance(entry, dict) and entry.get("choice") in allowed:
            plan = Plan(task, entry["choice"], f"cached in {path}, probed at batch "
                        f"{entry.get('probe_batch', '?')}", dict(entry.get("ms", {})))
        else:
            plan = _probe(task, batch, probe)
            entry = {"choice": plan.choice, "ms": dict(plan.ms), "probe_batch": batch,
                     "date": time.strftime("%Y-%m-%d")}
            _write_cache(path, key, entry)
        if eligible and compiled_probe is not None:
            plan = _with_compiled(plan, entry, key, path, batch, calls, probe, compiled_probe)
        return _remember(memo, plan, locked=True)


def _with_compiled(plan: Plan, entry: dict, key: str, path: Path | None, batch: int,
                   calls: float, probe: Callable[[int], Mapping[str, Callable[[], object]]],
                   compiled_probe: Callable[[int], Callable[[], object]]) -> Plan:
    """`plan`, or the compiled forward when it pays: it must beat `plan` (the faster of its two
    measurements) by `MARGIN` per call, and the time it saves over `calls` forwards must exceed
    its measured compilation.  Probed (compilation included) only when the work would take
    `COMPILE_WORTH_S` eagerly; the result, a failure included, is cached with the eager entry."""
    eager_ms = plan.ms.get(plan.choice)
    usable, why_not = compile_available()
    if not usable:
        return replace(plan, reason=f"{plan.reason}; not compiled: {why_not}")
    if eager_ms is None or calls * eager_ms / 1000 < COMPILE_WORTH_S:
        return replace(plan, reason=f"{plan.reason}; not compiled: {calls:g} calls, under "
                                    f"{COMPILE_WORTH_S:g} s of work")
    measured = entry.get("compiled")
    if not isinstance(measured, dict):
        measured = _probe_compiled(plan.choice, batch, probe, compiled_probe)
        entry = {**entry, "compiled": measured}
        _write_cache(path, key, entry)
    if measured.get("failed"):
        return replace(plan, reason=f"{plan.reason}; compile failed: {measured['failed']}")
    c_ms, e_ms, c_s = (float(measured[k]) for k in ("ms", "eager_ms", "compile_s"))
    e_ms = min(e_ms, eager_ms)               # the doubt goes to eager: its best measurement
    ms = {**plan.ms, COMPILED: round(c_ms, 2)}
    faster = c_ms < (1 - MARGIN) * e_ms
    detail = f"compiled {c_ms:.1f} vs {plan.choice} {e_ms:.1f} ms, compile {c_s:.0f} s"
    if math.isinf(calls):                   # a service: any per-call win pays in the end
        pays, detail = faster, f"{detail}, long-lived"
    else:
        saved = calls * (e_ms - c_ms) / 1000
        pays, detail = faster and saved > c_s, f"{detail}, {calls:g} calls save {saved:.0f} s"
    if pays:
        return Plan(plan.task, COMPILED, f"{plan.reason}; {detail}", ms)
    return Plan(plan.task, plan.choice, f"{plan.reason}; not compiled: {detail}", ms)


def _probe_compiled(choice: str, batch: int,
                    probe: Callable[[int], Mapping[str, Callable[[], object]]],
                    compiled_probe: Callable[[int], Callable[[], object]]) -> dict:
    """Compile (timed: the first call) and time the compiled forward alternating with the eager
    `choice`; {"failed": why} when compilation failed (the call returns the reason)."""
    run = compiled_probe(batch)
    with torch.random.fork_rng(devices=[]):
        t = time.perf_counter()
        failure = run()
        compile_s = time.perf_counter() - t
        if isinstance(failure, str):
            return {"failed": failure, "date": time.strftime("%Y-%m-%d")}
        eager = probe(batch)[choice]
        ms = time_alternating({choice: eager, COMPILED: run}, COMPILE_PROBE_ITERS, PROBE_WARMUP)
    return {"ms": round(ms[COMPILED], 2), "eager_ms": round(ms[choice], 2),
            "compile_s": round(compile_s, 1), "probe_batch": batch,
            "date": time.strftime("%Y-%m-%d")}


def _probe(task: str, batch: int, probe: Callable[[int], Mapping[str, Callable[[], object]]]) -> Plan:
    with torch.random.fork_rng(devices=[]):           # the run's random stream is untouched
        ms = time_alternating(probe(batch), PROBE_ITERS, PROBE_WARMUP)
    choice = pick(ms)
    return Plan(task, choice, f"measured at batch {batch}, {torch.get_num_threads()} threads",
                {k: round(v, 2) for k, v in ms.items()})


def _remember(key: str, plan: Plan, locked: bool = False, quiet: bool = False) -> Plan:
    with contextlib.nullcontext() if locked else _lock:
        if key not in _plans:
            _plans[key] = plan
            if not quiet:
                _announce(plan.line())
    return _plans[key]


def _announce(line: str) -> None:
    """One line per choice per process: to logging, or stderr where nothing is configured."""
    if log.hasHandlers() and log.isEnabledFor(logging.INFO):
        log.info(line)
    else:
        print(line, file=sys.stderr, flush=True)


def forget() -> None:
    """Drop the per-process memo (tests; a long process after a hardware change)."""
    with _lock:
        _plans.clear()


# --------------------------------------------------------------------------- the tasks

def _candidates(training: bool = False) -> tuple[Plan, ...]:
    """The plans a probe compares; no channels_last for training (TRAINING_TASKS)."""
    return tuple(Plan("probe", c) for c in CANDIDATES
                 if not (training and c.endswith("channels_last")))


def _faces(batch: int, channels: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, channels, 112, 112, generator=gen) * 2 - 1


def in_channels(model: nn.Module) -> int:
    """Input channels of `model` (3 for f_p, 192 for f and g): its `in_channels` attribute (the
    backbones register their input layer after the body), else its first convolution's."""
    declared = getattr(model, "in_channels", None)
    if isinstance(declared, int):
        return declared
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f"{type(model).__name__}: no Conv2d to take the input channels from")


def inference_plan(task: str, model: nn.Module, batch: int, mode: str | None = None,
                   calls: float = 0) -> Plan:
    """Plan for a no-grad forward of `model` (g for "protect", f / f_p for "embed") at `batch`;
    `calls` = how many such forwards the caller's process expects (0: a short job, never
    compiled; `math.inf`: a service)."""
    device = next(model.parameters()).device

    def probe(b: int) -> dict[str, Callable[[], object]]:
        x = _faces(b, in_channels(model))

        def run(p: Plan) -> Callable[[], object]:
            def once() -> None:
                with torch.no_grad(), p.autocast():
                    p.forward(model, x)
            return once
        return {p.choice: run(p) for p in _candidates()}

    def compiled_probe(b: int) -> Callable[[], object]:
        x, p, fc = _faces(b, in_channels(model)), Plan("probe", COMPILED), compiled_for(model)

        def once() -> str | None:
            with torch.no_grad(), p.autocast():
                fc(x)
            return fc.failed
        return _eval_mode(model, lambda _b: {COMPILED: once})(b)[COMPILED]
    return plan_for(task, device, lambda: model_signature(model), batch, _eval_mode(model, probe),
                    mode, calls=calls, compiled_probe=compiled_probe)


def _eval_mode(model: nn.Module, probe: Callable[[int], dict]) -> Callable[[int], dict]:
    """Run the probe's callables with `model` in eval mode (BatchNorm stats untouched)."""
    def wrapped(b: int) -> dict[str, Callable[[], object]]:
        runs = probe(b)

        def in_eval(fn: Callable[[], object]) -> Callable[[], object]:
            def once() -> object:
                was = model.training
                model.eval()
                try:
                    return fn()
                finally:
                    model.train(was)
            return once
        return {k: in_eval(fn) for k, fn in runs.items()}
    return wrapped


class _LaidOut(nn.Module):
    """`model` run the plan's way: input in its memory layout, through the compiled forward if
    planned (a module, so callers that set eval mode or read parameters through it reach
    `model`)."""

    def __init__(self, model: nn.Module, plan: Plan) -> None:
        super().__init__()
        self.model, self.plan = model, plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plan.forward(self.model, x)


EMBED_PROBE_BATCH = 32


def embed_context(model: nn.Module, batch: int, mode: str | None = None, calls: float = 0
                  ) -> tuple[contextlib.AbstractContextManager, nn.Module]:
    """(context, model_fn) for embedding with `model` (f or f_p) on this CPU: call
    `model_fn(x)` inside `context`.  For evaluation and the recognition service; the plan is
    probed at min(batch, EMBED_PROBE_BATCH) and logged once per process; `calls` as in
    `inference_plan` (a compiled plan compiles once per input shape)."""
    if next(model.parameters()).device.type != "cpu":
        return contextlib.nullcontext(), model
    plan = inference_plan("embed", model, max(1, min(batch, EMBED_PROBE_BATCH)), mode, calls)
    return plan.autocast(), (_LaidOut(model, plan) if plan.channels_last else model)


def training_plan(task: str, step: Step,
                  modules: Mapping[str, nn.Module], channels: int, num_classes: int, batch: int,
                  mode: str | None = None) -> Plan:
    """Plan for a training step: `step(modules, faces, labels)` returns the loss; the probe runs
    forward + backward on deep copies (the real models, their BatchNorm statistics and their
    gradients are untouched) at min(batch, PROBE_BATCH)."""
    first = next(iter(modules.values()))
    device = next(first.parameters()).device
    probe_batch = min(batch, PROBE_BATCH)

    def probe(b: int) -> dict[str, Callable[[], object]]:
        x = _faces(b, channels)
        y = torch.arange(b) % max(1, num_classes)
        runs = {}
        for p in _candidates(training=True):
            copies = {k: copy.deepcopy(m) for k, m in modules.items()}
            p.prepare(*copies.values())

            def once(p: Plan = p, copies: dict = copies) -> None:
                with p.autocast():
                    loss = step(copies, x, y)
                loss.backward()
                for m in copies.values():
                    m.zero_grad(set_to_none=True)
            runs[p.choice] = once
        return runs
    # the margin head is left out of the key: its size is the site's identity count, and the
    # same network at another site should reuse the measurement
    keyed = [m for name, m in modules.items() if name != "head"] or list(modules.values())
    return plan_for(task, device, lambda: model_signature(*keyed), probe_batch, probe, mode)


__all__ = ["CANDIDATES", "COMPILED", "ENV", "MODES", "NATIVE", "TASKS", "CpuFeatures", "Plan", "cache_path",
           "configure", "cpu_features", "forced", "current_mode", "embed_context", "forget",
           "inference_plan", "pick", "plan_for", "time_alternating", "training_plan"]
