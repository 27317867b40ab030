"""The content digest a site pins: which Flower app (FAB) its SuperNode may run.

A FAB is a zip.  Flower builds it deterministically (fixed dates, sorted paths), but zlib output
may differ between machines and zlib versions, so sha256 of the zip bytes is not something an
operator and a site can both recompute from the same release.  The digest here is computed from
the zip's *entries*: sha256 over the sorted list of (entry name, sha256 of its decompressed
bytes), recomputed from the entries themselves (Flower's own `.info/CONTENT` manifest is hashed
as an ordinary entry, never trusted).  Any added, removed, renamed or changed file changes it.

    app_digest(Path("."))            # a source tree, built in memory with Flower's own builder
    app_digest(Path("app.fab"))      # a FAB file
    fab_digest(fab_bytes)            # what a SuperNode received

`load_pins(path)` reads a pins file: one digest per line, `#` starts a comment.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

DIGEST_VERSION = "minusfed-app-digest-v1"
MAX_UNPACKED_BYTES = 1 << 30        # a FAB that inflates past 1 GiB is refused, not hashed
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class AppDigestError(ValueError):
    """The bytes are not a FAB whose digest can be computed (not a zip, duplicate or bad entry)."""


def _entry_sha256(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: list[int]) -> str:
    """sha256 of one entry's decompressed bytes, streamed; charges `budget` (bytes left)."""
    h = hashlib.sha256()
    with archive.open(info) as f:                  # zipfile checks the CRC at the end
        while chunk := f.read(_CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise AppDigestError(f"FAB inflates to more than {MAX_UNPACKED_BYTES} bytes")
            h.update(chunk)
    return h.hexdigest()


def fab_digest(fab: bytes) -> str:
    """The content digest of FAB bytes; AppDigestError if they are not a readable FAB."""
    entries: list[tuple[str, str]] = []
    budget = [MAX_UNPACKED_BYTES]
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            seen: set[str] = set()
            for info in archive.infolist():
                if info.filename in seen:          # which copy would be extracted is ambiguous
                    raise AppDigestError(f"FAB has two entries named {info.filename!r}")
                seen.add(info.filename)
                entries.append((info.filename, _entry_sha256(archive, info, budget)))
    except AppDigestError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError,
            NotImplementedError, ValueError) as e:   # not a zip, bad CRC, encrypted, ...
        raise AppDigestError(f"not a readable FAB (zip): {e}") from None
    if not entries:
        raise AppDigestError("FAB has no entries")
    entries.sort()
    payload = json.dumps([DIGEST_VERSION, entries], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def build_fab(app_dir: Path) -> bytes:
    """The FAB `flwr run APP_DIR` would submit, built in memory with Flower's own builder."""
    from flwr.cli.build import build_fab_from_disk
    return build_fab_from_disk(Path(app_dir))


def app_digest(path: Path) -> str:
    """The digest of an app directory (built like `flwr run` builds it) or of a .fab file."""
    path = Path(path)
    if path.is_dir():
        if not (path / "pyproject.toml").is_file():
            raise AppDigestError(f"{path}: not a Flower app directory (no pyproject.toml)")
        try:
            return fab_digest(build_fab(path))
        except AppDigestError:
            raise
        except Exception as e:                    # noqa: BLE001  Flower's build errors vary
            raise AppDigestError(f"{path}: Flower could not build a FAB: {e}") from None
    if path.is_file():
        try:
            return fab_digest(path.read_bytes())
        except AppDigestError as e:
            raise AppDigestError(f"{path}: {e}") from None
    raise AppDigestError(f"{path}: no such app directory or .fab file")


def parse_digest(text: str, where: str = "digest") -> str:
    """A pinned digest: exactly 64 hex characters (case-insensitive), returned lower-case."""
    value = text.strip().lower()
    if not _HEX64.fullmatch(value):
        raise ValueError(f"{where}: expected a 64-hex-digit app digest "
                         f"(`minusfed deploy app-digest APP`), got {text.strip()!r}")
    return value


def parse_pins(lines: Iterable[str], source: str) -> list[str]:
    """Digests from pins-file lines; `#` starts a comment; a bad line is named by number."""
    pins: list[str] = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if text:
            pins.append(parse_digest(text, f"{source}:{number}"))
    return pins


def load_pins(path: Path) -> list[str]:
    """Read a pins file; a missing/unreadable file or one without any digest is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"pins file {path}: cannot read it ({e})") from None
    pins = parse_pins(text.splitlines(), str(path))
    if not pins:
        raise ValueError(f"pins file {path}: no app digest in it (one 64-hex digest per line)")
    return pins
