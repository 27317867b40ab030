"""Allocator modes, measured by page faults (counted by the kernel, not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minusface.runtime import ALLOCATOR_ENV, THP_ENV, allocator_mode

PAGES = 32 * 192 * 112 * 112 * 4 // 4096        # e's output for a batch of 32: 75,264 pages
PROBE = r"""
import json, os, resource
import minusface                                 # sets PyTorch's THP switch per the mode
import torch
from minusface.runtime import applied_allocator_mode, tune_allocator
ok = tune_allocator()
def faults_of_one_batch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(32, 192, 112, 112)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [faults_of_one_batch() for _ in range(12)]
print(json.dumps({"ok": ok, "mode": applied_allocator_mode(), "thp": os.environ.get("%s"),
                  "faults": faults}))
""".replace("%s", THP_ENV)


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (THP_ENV, ALLOCATOR_ENV)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**env, ALLOCATOR_ENV: mode}, timeout=180)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _kernel_thp() -> str:
    p = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return p.read_text() if p.exists() else ""


def test_each_mode_cuts_the_page_faults_of_a_fresh_batch():
    runs = {mode: _probe(mode) for mode in ("glibc", "threshold", "thp", "heap")}
    assert all(r["ok"] and r["mode"] == m for m, r in runs.items()), runs
    assert runs["glibc"]["thp"] is None and runs["thp"]["thp"] == "1"
    # glibc mmaps a 308 MB block fresh for every batch (32 MB is the largest threshold)
    assert min(runs["glibc"]["faults"]) > 0.9 * PAGES, runs["glibc"]
    assert min(runs["threshold"]["faults"]) > 0.9 * PAGES, runs["threshold"]
    # heap: once glibc has settled its holes, a batch is reused without any fault
    assert min(runs["heap"]["faults"][-3:]) < 0.01 * PAGES, runs["heap"]
    if "[never]" in _kernel_thp() or not _kernel_thp():
        pytest.skip("kernel transparent huge pages are off: thp mode is threshold mode here")
    assert sorted(runs["thp"]["faults"])[6] < 0.2 * PAGES, runs["thp"]    # 2 MB pages


def test_mode_comes_from_the_environment_and_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    assert allocator_mode() == "thp"
    monkeypatch.setenv(ALLOCATOR_ENV, "jemalloc")
    with pytest.raises(ValueError, match=r"\$MINUSFED_ALLOCATOR='jemalloc'.*thp, heap"):
        allocator_mode()
    with pytest.raises(ValueError, match=r"tune_allocator\(mode\)='x'"):
        allocator_mode("x")


def test_a_thp_choice_the_user_made_is_kept():
    env = {**os.environ, THP_ENV: "0", ALLOCATOR_ENV: "thp"}
    out = subprocess.run([sys.executable, "-c", f"import os, minusface; print(os.environ['{THP_ENV}'])"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "0", out.stderr
