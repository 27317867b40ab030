"""`flower-supernode` that runs only apps its site has pinned.

Flower 1.42's SuperNode installs and runs whatever app (FAB) a run on its SuperLink carries, and
whoever reaches the SuperLink's Control API can start a run: without a licensed SuperLink,
`--trusted-entities` cannot verify anything.  So a party that reaches that API could run its
own code at every site (list the private face folder, send it home).

    python -m federation.deploy.supernode --pinned-app DIGEST [--pinned-app D2 ...]
        [--pinned-apps FILE] <flower-supernode arguments>

is `flower-supernode` with one change: on the first message of a run it does not know, after
fetching the run's FAB and before storing anything, it computes the FAB's content digest
(`federation.deploy.app_digest`, `minusfed deploy app-digest APP`) and compares it with the
site's pins.  An unpinned (or unreadable) FAB is logged loudly on the site with its digest,
answered with Flower's own error reply (`ErrorCode.INVALID_FAB`, a fixed reason) and never
stored, so no ClientApp process can get it (the ClientApp side reads the FAB only from this
SuperNode's state: `flwr.supernode.servicer.runtime.runtime_handlers.pull_task_input`).

It replaces `flwr.supernode.start_client_internal._pull_and_store_message`, which the SuperNode
loop looks up on every iteration.  If a Flower upgrade moved that function (or the names it
depends on), it refuses to start: an unpinned SuperNode is exactly what it exists to prevent.
It also refuses to start without any pin.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Sequence
from logging import ERROR, INFO
from pathlib import Path
from types import ModuleType
from typing import Any

from .app_digest import AppDigestError, fab_digest, load_pins, parse_digest

PIN_FLAG = "--pinned-app"
PINS_FILE_FLAG = "--pinned-apps"
REFUSAL_REASON = "The app is not pinned by this site."
REFUSAL_LOG = "minusfed supernode: REFUSED"
BANNER = "!" * 78
MAX_REMEMBERED_REFUSALS = 256
_NEEDED_PARAMETERS = ("state", "object_store", "receive", "get_run", "get_fab")

USAGE = (f"usage: python -m federation.deploy.supernode {PIN_FLAG} DIGEST [{PIN_FLAG} DIGEST ...] "
         f"[{PINS_FILE_FLAG} FILE] <flower-supernode arguments>\n"
         f"  {PIN_FLAG} DIGEST  an app this site runs (`minusfed deploy app-digest APP_DIR|FILE.fab`)\n"
         f"  {PINS_FILE_FLAG} FILE  one digest per line, '#' comments\n"
         "Any other app a run brings is refused and never stored or executed.\n")


class PinningUnavailable(RuntimeError):
    """Flower's SuperNode internals are not what the pinning patch was written for."""


class AppNotPinned(Exception):
    """Raised inside the pull step when a run's FAB is not pinned; never leaves the wrapper."""

    def __init__(self, run_id: int, digest: str) -> None:
        super().__init__(f"run {run_id}: app digest {digest} not pinned")
        self.run_id = run_id
        self.digest = digest


def split_pin_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(pinned digests, the remaining flower-supernode argv); ValueError names the bad value."""
    pins: list[str] = []
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, sep, inline = arg.partition("=")
        if flag in (PIN_FLAG, PINS_FILE_FLAG):
            if sep:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ValueError(f"{flag} needs a value")
            if flag == PIN_FLAG:
                pins.append(parse_digest(value, PIN_FLAG))
            else:
                pins.extend(load_pins(Path(value)))
        else:
            rest.append(arg)
        i += 1
    return list(dict.fromkeys(pins)), rest


def _flower_internals() -> tuple[ModuleType, Callable[..., Any], Callable[..., None]]:
    """The SuperNode loop module, its pull step and its message-insert helper, or
    PinningUnavailable when a Flower upgrade changed any of what the patch relies on."""
    try:
        loop = importlib.import_module("flwr.supernode.start_client_internal")
        cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    except ImportError as e:
        raise PinningUnavailable(f"cannot import Flower's SuperNode ({e})") from None
    original = getattr(loop, "_pull_and_store_message", None)
    insert = getattr(loop, "_insert_message", None)
    start = getattr(loop, "start_client_internal", None)
    if not (callable(original) and callable(insert) and callable(start)):
        raise PinningUnavailable("flwr.supernode.start_client_internal has no "
                                 "_pull_and_store_message/_insert_message/start_client_internal")
    if "_pull_and_store_message" not in start.__code__.co_names:
        raise PinningUnavailable("start_client_internal no longer calls _pull_and_store_message")
    if getattr(cli, "start_client_internal", None) is not start:
        raise PinningUnavailable("flower-supernode no longer starts start_client_internal")
    params = inspect.signature(original).parameters
    missing = [p for p in _NEEDED_PARAMETERS if p not in params]
    if missing:
        raise PinningUnavailable(f"_pull_and_store_message lost parameter(s) {missing}")
    if "get_fab" not in original.__code__.co_varnames:
        raise PinningUnavailable("_pull_and_store_message no longer fetches the FAB via get_fab")
    return loop, original, insert


def _refuse(refusal: AppNotPinned, message: Any, state: Any, store: Any,
            insert_message: Callable[..., None], pins: Iterable[str]) -> None:
    """Log the refusal loudly and queue Flower's error reply (nothing of the run is stored)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.common.logger import log
    log(ERROR, "%s\n%s run %s: its app (digest %s) is not pinned by this site; nothing from "
               "it was stored or executed.\nPinned here: %s\n%s", BANNER, REFUSAL_LOG,
        refusal.run_id, refusal.digest, ", ".join(sorted(pins)), BANNER)
    if message is not None:
        insert_message(Message(Error(ErrorCode.INVALID_FAB, REFUSAL_REASON), reply_to=message),
                       state, store)


def pinned_pull_and_store(original: Callable[..., Any], insert_message: Callable[..., None],
                          pins: Iterable[str]) -> Callable[..., Any]:
    """Flower's pull step with the run's FAB checked against `pins` before anything is stored."""
    from flwr.common.logger import log
    allowed = frozenset(pins)
    if not allowed:
        raise ValueError("at least one pinned app digest is required")
    signature = inspect.signature(original)
    refused: dict[str, str] = {}           # SuperLink fab hash -> digest: refuse without refetch

    def pull_and_store_pinned(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        arguments = bound.arguments
        receive, get_fab = arguments["receive"], arguments["get_fab"]
        received: list[Any] = []

        def remembering_receive() -> Any:
            got = receive()
            received[:] = [got[0]] if got is not None else []
            return got

        def pinned_get_fab(fab_hash: str, run_id: int) -> Any:
            if fab_hash in refused:
                raise AppNotPinned(run_id, refused[fab_hash])
            fab = get_fab(fab_hash, run_id)
            try:
                digest = fab_digest(fab.content)
            except AppDigestError as e:
                digest = f"unreadable ({e})"
            if digest not in allowed:
                if len(refused) >= MAX_REMEMBERED_REFUSALS:
                    refused.pop(next(iter(refused)))
                refused[fab_hash] = digest
                raise AppNotPinned(run_id, digest)
            log(INFO, "minusfed supernode: run %s runs pinned app %s", run_id, digest)
            return fab

        arguments["receive"] = remembering_receive
        arguments["get_fab"] = pinned_get_fab
        try:
            return original(*bound.args, **bound.kwargs)
        except AppNotPinned as refusal:
            _refuse(refusal, received[0] if received else None, arguments["state"],
                    arguments["object_store"], insert_message, allowed)
            return refusal.run_id if received else None     # no reply queued: nothing to push

    pull_and_store_pinned.__wrapped__ = original        # type: ignore[attr-defined]
    return pull_and_store_pinned


def install_pinning(pins: Iterable[str]) -> Callable[..., Any]:
    """Patch the SuperNode loop to run only pinned apps; PinningUnavailable if it cannot."""
    loop, original, insert = _flower_internals()
    original = getattr(original, "__wrapped__", original)    # never wrap twice
    patched = pinned_pull_and_store(original, insert, pins)
    loop._pull_and_store_message = patched
    return patched


def main(argv: list[str] | None = None) -> None:
    """Run Flower's `flower-supernode` command line with app pinning (fails closed)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        pins, rest = split_pin_args(args)
    except ValueError as e:
        raise SystemExit(f"minusfed supernode: {e}\n{USAGE}") from None
    wants_help = any(a in ("-h", "--help", "-V", "--version") for a in rest)
    if wants_help:
        print(USAGE)
    elif not pins:
        raise SystemExit(f"minusfed supernode: refusing to start without a pinned app "
                         f"({PIN_FLAG} or {PINS_FILE_FLAG}).\n{USAGE}")
    try:
        if pins:
            install_pinning(pins)
        else:
            _flower_internals()                            # --help: still say if it cannot pin
    except PinningUnavailable as e:
        raise SystemExit(f"minusfed supernode: refusing to start: cannot pin apps on this Flower "
                         f"version ({e}); running unpinned would let any run execute its own "
                         f"code here.") from None
    from flwr.common.logger import log
    from flwr.supernode.cli.flower_supernode import flower_supernode
    if pins:
        log(INFO, "minusfed supernode: runs only pinned app(s) %s", ", ".join(pins))
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
