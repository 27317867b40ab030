"""Replace a file atomically: a crash leaves the old file or the new one, never half of one.

One helper for every file minusfed writes that a reader may open at any time (generator weights,
final models, a site's private margin heads): write a temporary file beside the target, fsync,
then `os.replace`.  `private=True` creates the temporary file 0600 from its first byte (raw-face
derived state at a site); otherwise the umask applies as for any new file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *,
                 private: bool = False, sync: bool = True) -> None:
    """Atomically replace `path` with what `write` puts into a temporary file beside it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
