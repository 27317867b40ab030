"""Inductor-compiled, weight-frozen forwards for CPU inference in long-lived work.

Why: with `freezing`, torch.compile folds a model's weights into the graph and pre-packs them
for oneDNN's bf16 convolutions, which eager bf16 autocast re-packs on every call; on a CPU with
bf16 units that makes g and f_p markedly faster per call (BENCHMARKS.md, issue 20).  It costs
seconds of compilation per input shape and process, and it needs a C++ compiler, so only
callers whose process runs many forwards opt in (`minusface.precision`, candidate
"bf16+compiled"), and every failure falls back to the eager model with one warning.

Frozen means a snapshot: the compiled graph holds a copy of the weights taken at compile time.
Each call compares the live model's weights (storage and in-place version counters) with the
snapshot's and recompiles when they moved, so a model that is trained or reloaded afterwards is
never served with stale weights.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from itertools import chain

import torch
from torch import nn

ENV = "MINUSFED_CPU_COMPILE"            # "off" keeps every forward eager
log = logging.getLogger(__name__)
_lock = threading.Lock()
_registry: weakref.WeakKeyDictionary[nn.Module, FrozenCompiled] = weakref.WeakKeyDictionary()


def compile_available() -> tuple[bool, str]:
    """(usable, why not): not switched off by $MINUSFED_CPU_COMPILE, and a C++ compiler for
    inductor's CPU kernels on PATH ($CXX, g++ or clang++)."""
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return False, f"${ENV} is off"
    names = [os.environ.get("CXX", "").strip(), "g++", "clang++", "c++"]
    if not any(n and shutil.which(n) for n in names):
        return False, "no C++ compiler on PATH (inductor needs one)"
    return True, ""


def weights_version(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity of the model's current weights: each tensor's storage and in-place version
    (optimizer steps, `load_state_dict` and `copy_` bump it; swapping a tensor changes storage)."""
    return tuple((t.data_ptr(), t._version) for t in chain(model.parameters(), model.buffers()))


class FrozenCompiled:
    """`model`'s forward compiled with weights frozen, input channels_last, one graph per input
    shape; eager whenever compilation or a compiled call fails."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self._fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._version: tuple | None = None
        self.failed: str | None = None
        self.compiles = 0                   # how many snapshots were compiled (tests, logs)
        self.first_call_s: dict[tuple, float] = {}

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the compiled model was garbage-collected")
        return model

    def _snapshot(self) -> None:
        snapshot = copy.deepcopy(self.model).eval().to(memory_format=torch.channels_last)
        for p in snapshot.parameters():
            p.requires_grad_(False)
        self._fn = torch.compile(snapshot, dynamic=False, options={"freezing": True})
        self._version = weights_version(self.model)
        self.first_call_s.clear()
        self.compiles += 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is not None:
            return self.model(x)
        try:
            if self._fn is None or weights_version(self.model) != self._version:
                self._snapshot()
            shape = tuple(x.shape)
            t = time.perf_counter()
            out = self._fn(x.contiguous(memory_format=torch.channels_last))
            if shape not in self.first_call_s:
                self.first_call_s[shape] = time.perf_counter() - t
                log.info("compiled %s for input %s in %.1f s", type(self.model).__name__,
                         shape, self.first_call_s[shape])
            return out
        except Exception as exc:            # inductor, the C++ toolchain, an unsupported op
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log.warning("torch.compile of %s failed (%s); running it eager from now on",
                        type(self.model).__name__, self.failed)
            return self.model(x)


def compiled_for(model: nn.Module) -> FrozenCompiled:
    """The process's one compiled forward of `model` (made on first use, kept while `model`
    lives), so a probe's compilation is reused by the work that follows it."""
    with _lock:
        fc = _registry.get(model)
        if fc is None:
            fc = _registry[model] = FrozenCompiled(model)
        return fc


__all__ = ["ENV", "FrozenCompiled", "compile_available", "compiled_for", "weights_version"]
