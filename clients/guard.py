"""Outbound privacy guard: a ClientApp mod that refuses any reply carrying more than it may.

Why: the product's privacy rule is that a site sends only (1) the shared weights the server sent it,
same keys back, (2) numeric metrics and (3) protected images X_p from `protect()`.  Handlers are
ordinary code and can leak by mistake (returning the full state dict with the private margin head,
a debug batch of faces, the DCT residue).  This mod checks every reply after the handler ran and
raises `OutboundPolicyError` instead of letting it go; Flower's runtime then sends an error reply
that carries only the exception text (record and key names, shapes, never values).

Wire it first so it sees the final reply: `@app.train(mods=[outbound_guard])` (and on evaluate /
query), or `ClientApp(mods=[outbound_guard])` for every handler.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from minusface.provenance import all_protected

GUARD_ALLOWED_RECORDS = ("arrays", "protected")
MAX_CONFIG_STR = 256
MAX_LIST_LEN = 64
IMAGE_SIDE = 112
FACE_CHANNELS = 3
RESIDUE_CHANNELS = 192


class OutboundPolicyError(RuntimeError):
    """A reply would have sent data the privacy rule forbids; nothing was sent."""


def _image_kind(shape: tuple[int, ...]) -> str | None:
    """'raw image' / 'DCT residue' if the trailing dims look like one (CHW or HWC), else None."""
    if len(shape) < 3:
        return None
    for chw in (shape[-3:], (shape[-1], shape[-3], shape[-2])):
        if chw[1:] == (IMAGE_SIDE, IMAGE_SIDE):
            if chw[0] == FACE_CHANNELS:
                return "raw image"
            if chw[0] == RESIDUE_CHANNELS:
                return "DCT residue"
    return None


def _incoming_arrays(incoming: Message) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the ArrayRecord the server sent under "arrays" (empty if none)."""
    if not incoming.has_content() or "arrays" not in incoming.content:
        return {}
    record = incoming.content["arrays"]
    if not isinstance(record, ArrayRecord):
        return {}
    return {k: tuple(a.shape) for k, a in record.items()}


def _check_image_shapes(name: str, record: ArrayRecord) -> None:
    """Runs first so the error names what leaked; residues are refused even under "protected"."""
    for key, array in record.items():
        kind = _image_kind(tuple(array.shape))
        if kind == "DCT residue" or (kind == "raw image" and name != "protected"):
            raise OutboundPolicyError(
                f"outbound_guard: {kind} in ArrayRecord {name!r} key {key!r} "
                f"(shape {tuple(array.shape)}) must never leave the site")


def _is_margin_head(key: str) -> bool:
    """The margin head is the top-level module "head" (or "margin"/"arcface"/"cosface");
    the generator's own 1x1 output conv, "generator.head.*", is a shared weight."""
    first = key.split(".", 1)[0].lower()
    return first in {"head", "margin", "arcface", "cosface"} or first.startswith("head-")


def _check_shared_arrays(record: ArrayRecord, sent: dict[str, tuple[int, ...]]) -> None:
    """Exactly the keys (and shapes) the server sent; a margin head never leaves."""
    for key, array in record.items():
        if _is_margin_head(key):
            raise OutboundPolicyError(
                f"outbound_guard: key {key!r} in ArrayRecord 'arrays' looks like the private "
                "margin head (class centres), which never leaves the site")
        if key not in sent:
            raise OutboundPolicyError(
                f"outbound_guard: key {key!r} in ArrayRecord 'arrays' was not sent by the server")
        if tuple(array.shape) != sent[key]:
            raise OutboundPolicyError(
                f"outbound_guard: key {key!r} in ArrayRecord 'arrays' has shape "
                f"{tuple(array.shape)}, the server sent {sent[key]}")
    missing = [k for k in sent if k not in record]
    if missing:
        raise OutboundPolicyError(
            f"outbound_guard: ArrayRecord 'arrays' lacks keys the server sent: {missing[:5]}")


def _check_protected(record: ArrayRecord) -> None:
    """Only bit-exact `protect()` outputs (float32, (N, 3, 112, 112)) may leave."""
    for key, array in record.items():
        shape = tuple(array.shape)
        if array.dtype != "float32" or len(shape) != 4 or shape[1:] != (3, IMAGE_SIDE, IMAGE_SIDE):
            raise OutboundPolicyError(
                f"outbound_guard: ArrayRecord 'protected' key {key!r} must be float32 "
                f"(N, 3, 112, 112), got {array.dtype} {shape}")
        if not all_protected(array.numpy()):
            raise OutboundPolicyError(
                f"outbound_guard: ArrayRecord 'protected' key {key!r} holds images that did not "
                "come out of protect() (raw image?); refused")


def _check_values(kind: str, name: str, record: ConfigRecord | MetricRecord) -> None:
    """No smuggling through config or metrics: no bytes, short strings, short lists."""
    for key, value in record.items():
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > MAX_LIST_LEN:
            raise OutboundPolicyError(
                f"outbound_guard: {kind} {name!r} key {key!r} holds a list of {len(value)} "
                f"values (max {MAX_LIST_LEN})")
        for item in items:
            if isinstance(item, (bytes, bytearray)):
                raise OutboundPolicyError(
                    f"outbound_guard: {kind} {name!r} key {key!r} holds bytes; refused")
            if isinstance(item, str) and len(item) > MAX_CONFIG_STR:
                raise OutboundPolicyError(
                    f"outbound_guard: {kind} {name!r} key {key!r} holds a string of {len(item)} "
                    f"characters (max {MAX_CONFIG_STR})")


def check_reply(incoming: Message, reply: Message) -> None:
    """Raise `OutboundPolicyError` if `reply` (to `incoming`) carries anything not allowed."""
    if reply.has_error() or not reply.has_content():
        return
    content = reply.content
    for name, record in content.array_records.items():
        _check_image_shapes(name, record)
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            if name == "arrays":
                _check_shared_arrays(record, _incoming_arrays(incoming))
            elif name == "protected":
                _check_protected(record)
            else:
                raise OutboundPolicyError(
                    f"outbound_guard: ArrayRecord {name!r} may not leave the site "
                    f"(allowed: {', '.join(GUARD_ALLOWED_RECORDS)})")
        elif isinstance(record, ConfigRecord):
            _check_values("ConfigRecord", name, record)
        elif isinstance(record, MetricRecord):
            _check_values("MetricRecord", name, record)
        else:
            raise OutboundPolicyError(
                f"outbound_guard: record {name!r} of type {type(record).__name__} is unknown")


def outbound_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: run the handler, then refuse the reply if it breaks the privacy rule."""
    reply = call_next(msg, context)
    check_reply(msg, reply)
    return reply


__all__ = ["GUARD_ALLOWED_RECORDS", "OutboundPolicyError", "check_reply", "outbound_guard"]
