"""`flower-superlink` with a SQLite busy timeout that survives a busy machine, and with its
Control and Runtime APIs answering only the operator's host.

Flower 1.42 opens the SuperLink's file database with `PRAGMA busy_timeout = 5000`
(`flwr.supercore.constant.SQLITE_PRAGMAS`, applied on every new connection by
`flwr.supercore.sql_mixin`).  The SuperLink serves its APIs from a thread pool, one SQLite
connection per thread; when a thread holding the write lock is starved of CPU for more than
5 s (several SuperNodes training on the same 2 cores), the next writer gets
`sqlite3.OperationalError: database is locked`, the Runtime API answers 500, and Flower's
ServerApp gives up on a 500: the whole run fails.  Our CI hit exactly that
(tests/test_deploy_local.py, `/v1/runtime/pull-messages`).

`python -m federation.deploy.superlink ARGS` is `flower-superlink ARGS` with the busy timeout
raised to `MINUSFED_SQLITE_BUSY_TIMEOUT_MS` (default 120 s): a writer waits for the lock
instead of failing.  Every other pragma and argument is Flower's.  If a Flower upgrade moves the
setting, it logs a warning and starts the SuperLink unchanged.

It also keeps the Control and Runtime APIs off the network the sites see.  Flower serves Fleet
(SuperNodes), Control (`flwr run`, `flwr supernode register`, ...) and Runtime (the ServerApp)
on one port, and the open-source Control API has no user authentication: whoever reaches the
port could start a run, i.e. run its own ServerApp here and its own ClientApp at every site
that does not pin apps (federation/deploy/supernode.py).  An outermost ASGI middleware answers
403 to every request outside `/v1/fleet/*` and `/health` unless the client address is allowed:

    --control-from CIDR   (repeatable) who may use the Control API and everything else
                          default: loopback (127.0.0.0/8, ::1) plus --host if it is an IP

The Runtime API is also always allowed from loopback and --host (the ServerApp process Flower
starts on this host connects there).  Unlike the busy timeout, this fails closed: if Flower
moved what it patches, or would serve the Control API elsewhere (`FLWR_INTERNAL_GRPC_CONTROL_API`)
or trust forwarded client addresses from anyone (`FORWARDED_ALLOW_IPS=*`), it refuses to start.
Operators run `flwr` on the SuperLink host itself, or through an SSH tunnel to it
(docs/deploy-security.md).
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from logging import INFO, WARNING
from typing import Any

DEFAULT_BUSY_TIMEOUT_MS = 120_000
ENV_BUSY_TIMEOUT = "MINUSFED_SQLITE_BUSY_TIMEOUT_MS"

CONTROL_FROM_FLAG = "--control-from"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
FORBIDDEN_DETAIL = ("This SuperLink serves its Control and Runtime APIs only to the operator's "
                    "host (minusfed --control-from).")
ENV_GRPC_CONTROL = "FLWR_INTERNAL_GRPC_CONTROL_API"
ENV_FORWARDED = "FORWARDED_ALLOW_IPS"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


def busy_timeout_ms(environ: Mapping[str, str] = os.environ) -> int:
    """The busy timeout to use, from the environment; a clear error for a bad value."""
    raw = environ.get(ENV_BUSY_TIMEOUT, "")
    if not raw:
        return DEFAULT_BUSY_TIMEOUT_MS
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise SystemExit(f"{ENV_BUSY_TIMEOUT}={raw!r}: expected a whole number of "
                         f"milliseconds >= 0")
    return value


def patch_sqlite_busy_timeout(ms: int) -> bool:
    """Make every SQLite connection Flower opens from now on wait `ms` for a lock."""
    from flwr.common.logger import log
    try:
        from flwr.supercore import sql_mixin
    except ImportError:
        sql_mixin = None
    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not pragmas or not any(name == "busy_timeout" for name, _ in pragmas):
        log(WARNING, "minusfed superlink: flwr.supercore.sql_mixin.SQLITE_PRAGMAS has no "
                     "busy_timeout (Flower internals changed?); keeping Flower's default")
        return False
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(int(ms)) if name == "busy_timeout" else value) for name, value in pragmas)
    log(INFO, "minusfed superlink: SQLite busy_timeout %d ms (Flower's default 5000 ms)", ms)
    return True


def parse_network(text: str) -> Network:
    """An IP address or CIDR network from `--control-from`; a clear error otherwise."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{CONTROL_FROM_FLAG} {text!r}: expected an IP address or CIDR network "
                         f"such as 127.0.0.1 or 10.0.0.0/24") from None


def split_control_args(argv: Sequence[str]) -> tuple[list[Network], list[str]]:
    """(`--control-from` networks, the argv left for flower-superlink)."""
    networks: list[Network] = []
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        flag, sep, inline = args[i].partition("=")
        if flag == CONTROL_FROM_FLAG:
            if not sep and i + 1 >= len(args):
                raise ValueError(f"{CONTROL_FROM_FLAG} needs a value")
            if not sep:
                i += 1
            networks.append(parse_network(inline if sep else args[i]))
        else:
            rest.append(args[i])
        i += 1
    return networks, rest


def _host_networks(argv: Sequence[str]) -> list[Network]:
    """The SuperLink's --host as a one-address network when it is a concrete IP."""
    host = "127.0.0.1"                          # Flower's default --host
    for i, arg in enumerate(argv):
        if arg == "--host" and i + 1 < len(argv):
            host = argv[i + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return []                               # a name: not trusted by default
    return [] if address.is_unspecified else [ipaddress.ip_network(address)]


def access_networks(control_from: Sequence[Network],
                    flower_argv: Sequence[str]) -> tuple[tuple[Network, ...], tuple[Network, ...]]:
    """(networks allowed to use Control, networks allowed to use Runtime)."""
    local = (*LOOPBACK, *_host_networks(flower_argv))
    control = tuple(control_from) or local
    runtime = tuple(dict.fromkeys((*local, *control)))
    return control, runtime


def _client_address(scope: Scope) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    client = scope.get("client")
    if not client:
        return None
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_public_path(path: str) -> bool:
    """Only the Fleet API (SuperNodes) and /health are for the sites' network."""
    if path == "/health":
        return True
    segments = path.split("/")[1:]
    return (path.startswith("/v1/fleet/")
            and not any(s in ("", ".", "..") for s in segments))


class ControlAllowList:
    """ASGI middleware: 403 for anything but Fleet and /health from outside the allowed networks."""

    def __init__(self, app: ASGIApp, control: Sequence[Network],
                 runtime: Sequence[Network]) -> None:
        self.app = app
        self.control = tuple(control)
        self.runtime = tuple(runtime)

    def allowed(self, path: str, scope: Scope) -> bool:
        if is_public_path(path):
            return True
        networks = self.runtime if path.startswith("/v1/runtime/") else self.control
        address = _client_address(scope)
        return address is not None and any(address in n for n in networks)

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        if self.allowed(path, scope):
            await self.app(scope, receive, send)
            return
        from flwr.common.logger import log
        client = scope.get("client")
        log(WARNING, "minusfed superlink: refused %s from %s (not in %s)", path,
            client[0] if client else "an unknown address", CONTROL_FROM_FLAG)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": FORBIDDEN_DETAIL}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class ControlGuardUnavailable(RuntimeError):
    """The SuperLink cannot be started with its Control API restricted."""


def install_control_allow_list(control: Sequence[Network], runtime: Sequence[Network],
                               environ: Mapping[str, str] = os.environ) -> None:
    """Put `ControlAllowList` outermost in the SuperLink app; ControlGuardUnavailable if not."""
    if environ.get(ENV_GRPC_CONTROL) == "1":
        raise ControlGuardUnavailable(f"{ENV_GRPC_CONTROL}=1 would serve the Control API over "
                                      f"gRPC on another port, outside the allow-list; unset it")
    if "*" in environ.get(ENV_FORWARDED, ""):
        raise ControlGuardUnavailable(f"{ENV_FORWARDED}=* lets any client claim any address in "
                                      f"X-Forwarded-For; name the proxy's address instead")
    try:
        superlink_main = importlib.import_module("flwr.superlink.main")
        from starlette.middleware import Middleware
    except ImportError as e:
        raise ControlGuardUnavailable(f"cannot import Flower's SuperLink app ({e})") from None
    original = getattr(superlink_main, "_get_middleware", None)
    create_app = getattr(superlink_main, "create_app", None)
    if not callable(original) or not callable(create_app) or \
            "_get_middleware" not in create_app.__code__.co_names:
        raise ControlGuardUnavailable("flwr.superlink.main.create_app no longer builds its "
                                      "middleware with _get_middleware")
    original = getattr(original, "__wrapped__", original)

    def with_allow_list() -> list[Any]:
        return [Middleware(ControlAllowList, control=control, runtime=runtime), *original()]

    with_allow_list.__wrapped__ = original          # type: ignore[attr-defined]
    superlink_main._get_middleware = with_allow_list


def main(argv: list[str] | None = None) -> None:
    """Run Flower's `flower-superlink` command line with the longer busy timeout and the
    Control/Runtime APIs restricted to `--control-from` (default: this host)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        control_from, flower_args = split_control_args(args)
    except ValueError as e:
        raise SystemExit(f"minusfed superlink: {e}") from None
    control, runtime = access_networks(control_from, flower_args)
    try:
        install_control_allow_list(control, runtime)
    except ControlGuardUnavailable as e:
        raise SystemExit(f"minusfed superlink: refusing to start with an open Control API: {e}") from None
    from flwr.common.logger import log
    log(INFO, "minusfed superlink: Control API only from %s; Runtime API only from %s",
        ", ".join(map(str, control)), ", ".join(map(str, runtime)))
    if any(n.prefixlen == 0 for n in control):
        log(WARNING, "minusfed superlink: %s allows EVERY address to use the Control API",
            CONTROL_FROM_FLAG)
    if os.environ.get(ENV_FORWARDED):
        log(WARNING, "minusfed superlink: %s=%s: clients behind those proxies are identified by "
                     "X-Forwarded-For", ENV_FORWARDED, os.environ[ENV_FORWARDED])
    patch_sqlite_busy_timeout(busy_timeout_ms())
    from flwr.superlink.cli import flower_superlink
    sys.argv = ["flower-superlink", *flower_args]
    flower_superlink()


if __name__ == "__main__":
    main()
