"""What every benchmark needs: where things are, which data, which code on which machine, how to
time, how much memory, and how to print a table.

One implementation each, so every result line says the same things the same way (a number
without its machine, commit and date cannot be compared with another).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

from task.config import DEFAULT_DATA, resolve_data_path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"                  # default home of benchmark outputs (git-ignored)
DATA_HELP = (f"LFW crops folder (default: $MINUSFED_DATA, else {DEFAULT_DATA.name} in "
             "../shared/data next to the checkout)")


# --- inputs and provenance --------------------------------------------------------------------


def data_path(given: Path | str | None) -> Path:
    """The LFW folder: `given` (--data), else $MINUSFED_DATA, else the default next to the
    checkout, resolved as the ServerApp resolves `data-path`; exits naming --data if missing."""
    try:
        return resolve_data_path(str(given or ""))
    except FileNotFoundError as exc:
        raise SystemExit(f"--data: {exc}") from None


def git_commit() -> str:
    """Short commit of this checkout, with "+dirty" when the working tree differs from it
    (uncommitted or untracked files); "unknown" outside a git checkout."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=False)
    try:
        head = git("rev-parse", "--short", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return head.stdout.strip() + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """Host, CPU, load and the versions of the libraries already imported (importing one here
    would cost the caller its start-up time)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    parts = [f"{platform.node()} ({cpu_model()}, {os.cpu_count()} CPUs, load {load:.1f})",
             f"Python {platform.python_version()}"]
    for name in ("numpy", "torch", "flwr"):
        module = sys.modules.get(name)
        if module is not None:
            threads = f" ({module.get_num_threads()} threads)" if name == "torch" else ""
            parts.append(f"{name} {getattr(module, '__version__', '?')}{threads}")
    return ", ".join(parts)


def today() -> str:
    return time.strftime("%Y-%m-%d")


def provenance() -> str:
    """One line for the top of a result: machine, commit, date."""
    return f"{machine()}; commit {git_commit()}; {today()}"


def result_record(command: str, note: str, data: dict) -> dict:
    """A `bench/results` record for `bench.report` (kind "generic": `data["rows"]` holds the
    headline rows), stamped with this machine, today and the commit."""
    return {"kind": "generic", "command": command, "machine": machine(), "date": today(),
            "commit": git_commit(), "note": note, "data": data}


def arg_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose usage line reads `python -m bench.NAME` and whose description is the
    first line of the module docstring."""
    return argparse.ArgumentParser(prog=f"python -m {module}",
                                   description=(doc or module).strip().splitlines()[0])


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """How to run this benchmark again: `python -m bench.NAME ARGS`."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", module, shlex.join(args)]).strip()


def site_configs(num_sites: int, cache_dir: Path, state_dir: Path) -> list[dict[str, object]]:
    """Node configs of in-process sites (`simulation.inprocess`) that keep their face cache and
    margin heads under the benchmark's own folders: every in-process run has run id 1, so heads
    left in the default state folder by an earlier run would be restored into this one."""
    return [{"partition-id": i, "num-partitions": num_sites, "cache-dir": str(cache_dir),
             "state-dir": str(state_dir)} for i in range(num_sites)]


# --- timers -----------------------------------------------------------------------------------


def sync(device: Any = None) -> None:
    """Wait for queued device work (CUDA runs asynchronously); no-op on the CPU."""
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        import torch  # heavy: only a benchmark that times a GPU has a CUDA device

        torch.cuda.synchronize(device)


def timings(fn: Callable[[], object], iters: int, warmup: int = 1,
            device: Any = None) -> list[float]:
    """Wall seconds of `iters` calls after `warmup` untimed ones, device-synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def median_seconds(fn: Callable[[], object], device: Any = None, iters: int = 5,
                   warmup: int = 2) -> float:
    return statistics.median(timings(fn, iters, warmup, device))


# --- memory (Linux /proc) ---------------------------------------------------------------------


def status_kb(field: str, pid: int | str = "self") -> int | None:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...); None when unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (getrusage), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def sum_kb(field: str, pids: Iterable[int]) -> int:
    """`field` summed over `pids` (processes that have exited count 0)."""
    return sum(status_kb(field, pid) or 0 for pid in pids)


class PeakSampler:
    """The largest value `measure()` returned, sampled every `interval` seconds on a thread
    while the `with` block runs (and once before and after it)."""

    def __init__(self, measure: Callable[[], float], interval: float) -> None:
        self.measure, self.interval = measure, interval
        self.peak = measure()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.measure())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.measure())


# --- output -----------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; cells are printed with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
