"""Replace a file atomically: a crash leaves the old file or the new one, never half of one.

The one helper for every file minusfed writes that a reader may open at any time (generator
weights, checkpoints, final models, reports, a site's private margin heads and face cache,
protected images, deployment keys): write a temporary file beside the target, fsync, then move
it into place.

* `mode` gives the file exactly these permission bits from its first byte (0o600 for raw-face
  derived state or key material), whatever the umask; without it the umask applies as for any
  new file.
* `replace=False` never replaces an existing target: the finished file is hard-linked into
  place, which fails if the target appeared meanwhile (`FileExistsError`).
* `backup` keeps the file being replaced under that name (a checkpoint's previous round).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _place(tmp: Path, path: Path, replace: bool, backup: Path | None) -> None:
    if not replace:
        try:
            os.link(tmp, path)                       # fails if `path` exists: no clobbering
            return
        except FileExistsError:
            raise FileExistsError(f"{path} exists; not replaced") from None
        except OSError:                              # no hard links on this file system
            if os.path.lexists(path):
                raise FileExistsError(f"{path} exists; not replaced") from None
    elif backup is not None and path.exists():
        os.replace(path, backup)                     # the old file survives under `backup`
    os.replace(tmp, path)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *,
                 mode: int | None = None, sync: bool = True, replace: bool = True,
                 backup: str | os.PathLike | None = None) -> None:
    """Atomically put at `path` what `write` puts into a temporary file beside it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as file:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(file.fileno(), mode)       # the umask may have stripped bits
            write(file)
            if sync:
                file.flush()
                os.fsync(file.fileno())
        _place(tmp, path, replace, Path(backup) if backup is not None else None)
    finally:
        tmp.unlink(missing_ok=True)                  # gone already unless hard-linked or failed
