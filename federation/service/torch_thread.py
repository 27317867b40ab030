"""One thread for all torch work of a recognition-service process.

PyTorch's CPU kernels parallelise with OpenMP (libgomp in the CPU wheels).  libgomp keeps a
thread team for every thread that enters a parallel region, and once a process holds more
OpenMP threads than it has CPUs it stops spinning between regions, so every region pays a
sleep and a wake-up.  Request handlers run on a pool of worker threads: f_p, the gallery search
and start-up code each started their own team, and on a 2-core machine one f_p forward then
took about twice as long as in a single-threaded program (docs/service.md).  Sending every
torch call through this one thread keeps one team; torch's own threads still use every core.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_ident: list[int] = []


def _remember() -> None:
    _ident.append(threading.get_ident())


_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minusfed-torch", initializer=_remember)


def call(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` on the torch thread and wait for it (start-up code; safe from that thread)."""
    if _ident and threading.get_ident() == _ident[0]:
        return fn(*args, **kwargs)
    return _POOL.submit(fn, *args, **kwargs).result()


async def run(fn: Callable[..., T], *args, **kwargs) -> T:
    """Await `fn` on the torch thread (request handlers); calls run one at a time, in order."""
    return await asyncio.wrap_future(_POOL.submit(fn, *args, **kwargs))
