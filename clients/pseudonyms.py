"""Pseudonymous identity labels for pooled stage 2: random tokens made on the site, never names.

In pooled mode the server learns which protected images share an identity (it trains one class
per identity), but not who anyone is: a site labels its identities with random 62-bit tokens
drawn from the operating system's CSPRNG (`secrets`), one per identity and a random site token
for the site itself.  Tokens carry no name, no folder, no count; two sites draw independently,
so a collision has probability below n^2 / 2^63 (and the server keys classes by site token and
label token, so even a collision would not merge two people).

The tokens of one upload (the server's `upload-id`) are kept in the SuperNode's context state
(`held`: it survives the fresh ClientApp process a deployed SuperNode starts per message) and in
an owner-only JSON file in the site's state-dir (`clients.site_state`), so a restarted SuperNode
labels its remaining chunks as before; with state-dir "off", a SuperNode restart draws new
tokens (the server then sees a new site and the old one's partial upload is not used).
Every token handed out is also recorded in a process-level set the outbound guard checks: a
label array may leave only if each value is a token this module issued.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.common.logger import log

from minusface.atomic import write_atomic

TOKEN_BITS = 62
_lock = threading.Lock()
_issued: set[int] = set()
_in_memory: dict[tuple[str, str], SitePseudonyms] = {}


@dataclass(frozen=True)
class SitePseudonyms:
    """A site's tokens for one upload: `labels[k]` names its k-th identity."""

    site_token: int
    labels: np.ndarray            # int64 (num_classes,)


def new_token() -> int:
    """A random positive token (never 0, so an all-zero array is never a valid label set)."""
    return secrets.randbits(TOKEN_BITS) + 1


def _register(p: SitePseudonyms) -> SitePseudonyms:
    with _lock:
        _issued.update(int(v) for v in p.labels)
    return p


def all_issued(values: np.ndarray) -> bool:
    """True if every value of an int64 array is a label token this process issued."""
    values = np.asarray(values)
    if values.dtype != np.int64 or values.ndim != 1:
        return False
    with _lock:
        return all(int(v) in _issued for v in np.unique(values))


def _fresh(num_classes: int) -> SitePseudonyms:
    tokens: set[int] = set()
    while len(tokens) < num_classes:
        tokens.add(new_token())
    return SitePseudonyms(new_token(), np.array(list(tokens), dtype=np.int64))


def pseudonym_file(folder: Path, upload_id: str, site: str) -> Path:
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", f"pseudonyms-{upload_id}-{site}")
    return folder / f"{clean}.json"


def _read(path: Path, num_classes: int) -> SitePseudonyms | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        labels = np.array(data["labels"], dtype=np.int64)
        site_token = int(data["site-token"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(WARNING, "pseudonym file %s unreadable (%s); drawing new tokens", path, e)
        return None
    if labels.shape != (num_classes,) or len(set(labels.tolist())) != num_classes or site_token <= 0:
        log(WARNING, "pseudonym file %s holds %d tokens, the site has %d identities; drawing new "
            "tokens", path, labels.size, num_classes)
        return None
    return SitePseudonyms(site_token, labels)


def site_pseudonyms(folder: Path | None, upload_id: str, site: str, num_classes: int,
                    held: SitePseudonyms | None = None) -> SitePseudonyms:
    """This site's tokens for `upload_id`: the ones it drew before (this process, `held` from
    the SuperNode's context state, the state-dir file), else fresh ones, saved owner-only
    before any leaves the site."""
    key = (upload_id, site)
    with _lock:
        known = _in_memory.get(key)
    if known is not None and known.labels.shape == (num_classes,):
        return _register(known)
    path = pseudonym_file(folder, upload_id, site) if folder is not None else None
    found = held if held is not None and held.labels.shape == (num_classes,) else None
    if found is None and path is not None:
        found = _read(path, num_classes)
    if found is None:
        found = _fresh(num_classes)
        if path is not None:
            text = json.dumps({"site-token": found.site_token, "labels": found.labels.tolist()})
            try:
                write_atomic(path, lambda f: f.write(text.encode()), mode=0o600)
            except OSError as e:
                log(WARNING, "could not save pseudonyms to %s (%s): a SuperNode restart "
                    "would label this site's remaining chunks with new tokens", path, e)
    with _lock:
        _in_memory[key] = found
    return _register(found)


def forget_pseudonyms() -> None:
    """Drop every token this process holds or issued (tests)."""
    with _lock:
        _issued.clear()
        _in_memory.clear()
