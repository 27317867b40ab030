"""Per-site API tokens for the recognition service, stored hashed.

A token is 32 random bytes from the OS CSPRNG (`secrets.token_urlsafe`), shown once when it is
made and never stored: the tokens file keeps only its SHA-256 (a 256-bit random secret needs no
slow hash; nothing here is home-made crypto).  A request names no site: the service hashes the
bearer token and looks the digest up, comparing with `hmac.compare_digest`.

Tokens file (JSON, written 0600): {"format": "minusfed-service-tokens", "sites": {SITE:
{"sha256": HEX, "created": ISO time}}}.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path

from minusface.atomic import write_atomic

FORMAT = "minusfed-service-tokens"
PREFIX = "mfs_"                      # recognisable in a leaked-secrets scan
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TokenError(ValueError):
    """A tokens file that is missing, unreadable or not what `minusfed tokens` writes."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_tokens(path: str | os.PathLike) -> dict[str, str]:
    """{site: sha256 hex} from a tokens file; `TokenError` naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise TokenError(f"{path}: tokens file not found (make one with "
                         "`minusfed tokens add FILE SITE`)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("sites"),
                                                                                  dict):
        raise TokenError(f"{path}: expected {{'format': {FORMAT!r}, 'sites': {{...}}}} as "
                         "`minusfed tokens add` writes")
    out = {}
    for site, entry in obj["sites"].items():
        value = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
            raise TokenError(f"{path}: sites[{site!r}]['sha256'] should be 64 hex digits")
        out[site] = value
    return out


def add_token(path: str | os.PathLike, site: str) -> str:
    """Make a token for `site`, store its hash in `path` (created 0600) and return the token
    (the only time it exists outside the site).  An existing site is refused: revoke it first."""
    path = Path(path)
    if not SITE_NAME.fullmatch(site):
        raise TokenError(f"site name {site!r}: expected 1-64 letters, digits, '.', '_' or '-'")
    sites: dict = {}
    if path.exists():
        read_tokens(path)                                    # refuse a file we did not write
        sites = json.loads(path.read_text(encoding="utf-8"))["sites"]
    if site in sites:
        raise TokenError(f"{path}: site {site!r} already has a token; `minusfed tokens revoke "
                         f"{path} {site}` first")
    token = PREFIX + secrets.token_urlsafe(32)
    sites[site] = {"sha256": digest(token), "created": datetime.now(UTC).isoformat(timespec="seconds")}
    _write(path, sites)
    return token


def revoke_token(path: str | os.PathLike, site: str) -> None:
    path = Path(path)
    read_tokens(path)
    sites = json.loads(path.read_text(encoding="utf-8"))["sites"]
    if site not in sites:
        raise TokenError(f"{path}: no site {site!r} (sites: {', '.join(sorted(sites)) or 'none'})")
    del sites[site]
    _write(path, sites)


def _write(path: Path, sites: dict) -> None:
    data = json.dumps({"format": FORMAT, "sites": sites}, indent=2, sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(data), mode=0o600)


class TokenCheck:
    """Which site, if any, a bearer token belongs to."""

    def __init__(self, by_site: dict[str, str]) -> None:
        self._by_site = dict(by_site)

    def site_of(self, token: str | None) -> str | None:
        if not token:
            return None
        d = digest(token)
        found = None
        for site, want in self._by_site.items():       # no early exit: same time for any token
            if hmac.compare_digest(d, want):
                found = site
        return found
