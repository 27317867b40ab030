"""What a site keeps on its own disk: its decoded raw-face cache and its private margin heads.

Both are the site's secrets (raw faces; class centres of its identities), so only the site picks
where they live; nothing here reads the server's run config.  Lookup order (first that is set):

=====================  ==================  ===================  ================================
what                   node config key     environment          default
=====================  ==================  ===================  ================================
raw-face cache (.npz)  ``cache-dir``       MINUSFED_CACHE_DIR   $XDG_CACHE_HOME/minusfed, else
                                                                ~/.cache/minusfed
margin heads (.pt)     ``state-dir``       MINUSFED_STATE_DIR   $XDG_STATE_HOME/minusfed, else
                                                                ~/.local/state/minusfed
=====================  ==================  ===================  ================================

An empty value counts as unset; ``"off"`` turns the store off (no cache: faces are decoded
every message; no head file: a SuperNode restart starts fresh heads).  A folder we create is
0700 and every file is written 0600 through a private temporary file and ``os.replace`` (never
readable by others, never half-written).  An existing folder open to group/others is used but
warned about, not changed: the site chose it.  A folder that cannot be created or written turns
that store off with one warning naming it and the key to set; training never fails for it.

Heads are keyed by run id, site and stage (``head-run<ID>-<site>-<stage>.pt``), saved with
`torch.save` and read with ``torch.load(weights_only=True)``; a file that is not ours, not a
plain file, unreadable or not a dict of tensors is ignored with a warning.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.common.logger import log

from minusface.atomic import write_atomic
from task.records import SITE_NAME_KEY, SITE_NAME_PATTERN

# node-config key, environment variable, XDG variable, default under $HOME
CACHE = ("cache-dir", "MINUSFED_CACHE_DIR", "XDG_CACHE_HOME", ".cache")
STATE = ("state-dir", "MINUSFED_STATE_DIR", "XDG_STATE_HOME", ".local/state")
STATE_KEY = STATE[0]
OFF = "off"
APP_DIR = "minusfed"

_warned: set[str] = set()          # one warning per problem per process (handlers run every round)


def warn_once(key: str, message: str, *args: object) -> None:
    """Log a WARNING the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        log(WARNING, message, *args)


def configured_dir(node_config: Mapping[str, object], key: str, env: str, xdg: str,
                   fallback: str) -> Path | None:
    """The folder the site chose for `key` (node config, env, XDG default); None when "off"."""
    raw = node_config.get(key, "")
    if not isinstance(raw, str):
        warn_once(f"type:{key}:{raw!r}", "node config '%s' is %r; expected a folder path or "
                  "\"off\"; not storing anything there", key, raw)
        return None
    if not raw:
        raw = os.environ.get(env, "")
    if raw.strip().lower() == OFF:
        return None
    if raw:
        return Path(raw).expanduser().absolute()
    base = os.environ.get(xdg, "")
    try:
        root = Path(base) if os.path.isabs(base) else Path.home() / fallback
    except RuntimeError as e:                        # no $HOME and no passwd entry
        warn_once(f"home:{key}", "no home folder for the default %s (%s); set node config '%s' "
                  "or $%s", key, e, key, env)
        return None
    return root / APP_DIR


def private_dir(path: Path, key: str) -> Path | None:
    """`path` created 0700 if missing and proven writable, else None after one warning that
    names it and the node-config key to set."""
    try:
        try:
            path.mkdir(parents=True, mode=0o700)
            os.chmod(path, 0o700)                    # whatever the umask
        except FileExistsError:                      # ours from before, or another site's process
            pass
        mode = path.stat().st_mode
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        warn_once(f"dir:{key}:{path}", "%s %s is not usable (%s); going on without it: set node "
                  "config '%s' to a folder this site can write (or \"off\")", key, path, e, key)
        return None
    if mode & 0o077:
        warn_once(f"mode:{key}:{path}", "%s %s is open to other users (mode %s); files in it are "
                  "0600, but consider chmod 700", key, path, oct(stat.S_IMODE(mode)))
    return path


def cache_dir(node_config: Mapping[str, object]) -> Path | None:
    """Where this site caches its decoded raw faces, or None (no cache)."""
    path = configured_dir(node_config, *CACHE)
    return private_dir(path, CACHE[0]) if path is not None else None


def state_dir(node_config: Mapping[str, object]) -> Path | None:
    """Where this site keeps its margin heads between SuperNode restarts, or None (not kept)."""
    path = configured_dir(node_config, *STATE)
    return private_dir(path, STATE_KEY) if path is not None else None


def site_name(node_config: Mapping[str, object]) -> str | None:
    """The name this site gives itself in the server's reports: node config "site-name" (1-32
    letters, digits, "_", "." or "-", starting with a letter or digit), else "partition-<id>" in
    a simulation, else None (the server then shows the node id).  The operator chooses it; it
    is the one string the outbound guard lets out, and only if it equals this value."""
    raw = node_config.get(SITE_NAME_KEY)
    if raw is not None:
        if isinstance(raw, str) and re.fullmatch(SITE_NAME_PATTERN, raw):
            return raw
        warn_once(f"site-name:{raw!r}", "node config '%s' must be 1-32 letters, digits, '_', "
                  "'.' or '-' (starting with a letter or digit); the server will show this "
                  "site by its node id", SITE_NAME_KEY)
        return None
    if "partition-id" in node_config:
        return f"partition-{int(node_config['partition-id'])}"       # type: ignore[arg-type]
    return None


def head_file(folder: Path, run_id: int, site: str, stage: str) -> Path:
    """The head file of one run, site and stage (names reduced to [A-Za-z0-9_.-])."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", f"head-run{int(run_id)}-{site}-{stage}")
    return folder / f"{clean}.pt"


def save_head(path: Path, head: Mapping[str, torch.Tensor]) -> bool:
    """Write a head state dict owner-only; False (after one warning) if it could not be."""
    state = {k: v.detach().cpu().contiguous() for k, v in head.items()}
    try:
        write_atomic(path, lambda f: torch.save(state, f), mode=0o600)
    except OSError as e:
        warn_once(f"save:{path}", "could not save the margin head to %s (%s); a SuperNode "
                  "restart will start it fresh (set node config '%s')", path, e, STATE_KEY)
        return False
    return True


def load_head(path: Path) -> dict[str, torch.Tensor] | None:
    """The head saved at `path`; None if there is none or it is not a usable head of ours."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:
        log(WARNING, "margin head %s unreadable (%s); starting a fresh head", path, e)
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        log(WARNING, "margin head %s is not a plain file owned by this user; ignoring it", path)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                           # torch raises many types for a bad file
        log(WARNING, "margin head %s unreadable (%s: %s); starting a fresh head", path,
            type(e).__name__, str(e)[:200])
        return None
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        log(WARNING, "margin head %s does not hold a dict of tensors; starting a fresh head", path)
        return None
    log(INFO, "restored head from %s", path)
    return state
