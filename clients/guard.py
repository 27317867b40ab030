"""Outbound privacy guard: a ClientApp mod that refuses any reply carrying more than it may.

Why: the product's privacy rule is that a site sends only (1) the shared weights the server sent it,
same keys, shapes and dtypes back, (2) a fixed set of named numeric metrics, (3) protected
images X_p from `protect()` (float32, or exactly their float16 rounding) and (4), with X_p in a
pooled-stage-2 upload, the random label tokens the site drew for them (`clients.pseudonyms`).
Handlers are ordinary code and can leak by mistake (returning the
full state dict with the private margin head, a debug batch of faces, the DCT residue, a face
flattened into metrics or config strings, an exception text holding data).  This mod checks every
reply after the handler ran and, instead of letting a bad one go, logs why on the site and sends
one fixed error (`GUARD_ERROR_CODE`, `GUARD_ERROR_REASON`).  Handler exceptions and error replies
are reduced to that same fixed error, so nothing the site's code wrote reaches the server.

What a reply may hold depends on the message type (`REPLY_POLICIES`): named MetricRecords with
allow-listed scalar metrics (the privacy reply's names come from
`clients.privacy_eval.privacy_metric_names`), "arrays" / "protected" ArrayRecords where allowed,
a ConfigRecord only in the reply to "query.site_info", holding exactly the site's own
configured name (`clients.site_state.site_name`); an unknown message type may reply with
nothing.  The guard's scope is bugs,
not malicious code in the site's own process (which could do anything).

Wire it first so it sees the final reply: `@app.train(mods=[outbound_guard])` (and on evaluate /
query), or `ClientApp(mods=[outbound_guard])` for every handler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from logging import ERROR

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from clients.pseudonyms import all_issued
from clients.site_state import site_name
from minusface.provenance import all_protected
from task.records import (
    PRIVACY_MESSAGE_TYPE,
    PRIVACY_RECORD,
    PROTECTED,
    PSEUDONYMS,
    SITE_INFO_MESSAGE_TYPE,
    SITE_NAME_KEY,
    SITE_RECORD,
    UPLOAD_MESSAGE_TYPE,
    UPLOAD_METRICS,
    UPLOAD_RECORD,
)

# the only ArrayRecords that may ever leave: shared weights, X_p, and X_p's pseudonymous labels
GUARD_ALLOWED_RECORDS = ("arrays", PROTECTED, PSEUDONYMS)
GUARD_ERROR_CODE = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
GUARD_ERROR_REASON = "ClientApp failed; details are in the site's log"
MAX_NAME_CHARS = 64          # of a key / record name in a refusal or log line
MAX_LOGGED_REASON = 1000     # of a handler's own error reason, in the site's log
NPY_HEADER_BYTES = 128       # np.save header of a <= 4-d array; more dims add at most 32 bytes each
IMAGE_SIDE = 112
FACE_CHANNELS = 3
RESIDUE_CHANNELS = 192

# Every metric a real handler sends (clients/local.py local_train / local_evaluate, plus
# client_seconds from clients/client_app.py); tests/test_guard.py runs those handlers.
TRAIN_METRICS = frozenset({"num-examples", "train_loss", "train_acc", "train_seconds",
                           "train_img_per_s", "client_seconds"})
EVALUATE_METRICS = frozenset({"num-examples", "eval_pairs", "accuracy", "auc", "tar_at_far_1e-2"})


class OutboundPolicyError(RuntimeError):
    """A reply would have sent data the privacy rule forbids; nothing was sent."""


@dataclass(frozen=True)
class ReplyPolicy:
    """What a reply to one message type may hold: ArrayRecord names, MetricRecord name -> keys,
    and (site info only) ConfigRecord name -> keys."""

    arrays: frozenset[str] = frozenset()
    metrics: Mapping[str, frozenset[str]] = field(default_factory=dict)
    configs: Mapping[str, frozenset[str]] = field(default_factory=dict)


STRICTEST = ReplyPolicy()                             # unknown message types: no record at all
REPLY_POLICIES: dict[str, ReplyPolicy] = {
    "train": ReplyPolicy(frozenset({"arrays", "protected"}), {"metrics": TRAIN_METRICS}),
    "evaluate": ReplyPolicy(frozenset({"protected"}), {"metrics": EVALUATE_METRICS}),
    # pooled stage 2: one chunk of X_p (float16) with its label tokens (clients/upload.py)
    UPLOAD_MESSAGE_TYPE: ReplyPolicy(frozenset({PROTECTED, PSEUDONYMS}),
                                     {UPLOAD_RECORD: frozenset(UPLOAD_METRICS)}),
    # the site's configured name, nothing else (checked against its node config)
    SITE_INFO_MESSAGE_TYPE: ReplyPolicy(configs={SITE_RECORD: frozenset({SITE_NAME_KEY})}),
}


@lru_cache(maxsize=1)
def _privacy_policy() -> ReplyPolicy:
    """Built on first use: the privacy names live with the (heavy) privacy code that makes them."""
    from clients.privacy_eval import privacy_metric_names
    return ReplyPolicy(metrics={PRIVACY_RECORD: frozenset(privacy_metric_names())})


def reply_policy(message_type: str) -> ReplyPolicy:
    """The policy for `message_type` ("train.default" is "train"); unknown types get STRICTEST."""
    if message_type.endswith(".default"):
        message_type = message_type[: -len(".default")]
    if message_type == PRIVACY_MESSAGE_TYPE:
        return _privacy_policy()
    return REPLY_POLICIES.get(message_type, STRICTEST)


def _name(value: object) -> str:
    """repr of a name cut to MAX_NAME_CHARS, so no refusal or log line repeats a long name."""
    text = str(value)
    if len(text) <= MAX_NAME_CHARS:
        return repr(text)
    return repr(text[:MAX_NAME_CHARS]) + f"... ({len(text)} chars)"


def _cut(text: str, limit: int = MAX_NAME_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _shape(array: Array) -> str:
    return _cut(str(tuple(array.shape)))


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


def _incoming_arrays(incoming: Message) -> dict[str, Array]:
    """Key -> Array of the ArrayRecord the server sent under "arrays" (empty if none)."""
    if not incoming.has_content() or "arrays" not in incoming.content:
        return {}
    record = incoming.content["arrays"]
    return dict(record.items()) if isinstance(record, ArrayRecord) else {}


def _check_image_shapes(name: str, record: ArrayRecord) -> None:
    """Runs first so the error names what leaked; residues are refused even under "protected"."""
    for key, array in record.items():
        kind = _image_kind(tuple(array.shape))
        if kind == "DCT residue" or (kind == "raw image" and name != "protected"):
            raise OutboundPolicyError(
                f"outbound_guard: {kind} in ArrayRecord {_name(name)} key {_name(key)} "
                f"(shape {_shape(array)}) must never leave the site")


def _is_margin_head(key: str) -> bool:
    """The margin head is the top-level module "head" (or "margin"/"arcface"/"cosface");
    the generator's own 1x1 output conv, "generator.head.*", is a shared weight."""
    first = key.split(".", 1)[0].lower()
    return first in {"head", "margin", "arcface", "cosface"} or first.startswith("head-")


def _payload_fits(array: Array) -> bool:
    """The serialized bytes hold no more than the declared shape and dtype (plus the npy header):
    values cannot hide behind honest-looking metadata."""
    try:
        itemsize = np.dtype(array.dtype).itemsize
    except TypeError:
        return False
    nbytes = math.prod(int(d) for d in array.shape) * itemsize
    return len(array.data) <= nbytes + NPY_HEADER_BYTES + 32 * max(0, len(array.shape) - 4)


def _check_shared_array(key: str, array: Array, sent: Array) -> None:
    """One reply array against the one the server sent: same shape, dtype, serialization, size."""
    where = f"key {_name(key)} in ArrayRecord 'arrays'"
    if tuple(array.shape) != tuple(sent.shape):
        raise OutboundPolicyError(f"outbound_guard: {where} has shape {_shape(array)}, the "
                                  f"server sent {_shape(sent)}")
    if array.dtype != sent.dtype or array.stype != sent.stype:
        raise OutboundPolicyError(
            f"outbound_guard: {where} is {_cut(str(array.dtype))} ({_cut(str(array.stype))}), "
            f"the server sent {_cut(str(sent.dtype))} ({_cut(str(sent.stype))}); reply in the "
            "received dtype (task.wire.like_received)")
    if not _payload_fits(array):
        raise OutboundPolicyError(
            f"outbound_guard: {where} carries {len(array.data)} bytes, more than shape "
            f"{_shape(array)} of {_cut(str(array.dtype))} needs")


def _check_shared_arrays(record: ArrayRecord, sent: dict[str, Array]) -> None:
    """Exactly the keys, shapes and dtypes the server sent; a margin head never leaves."""
    for key, array in record.items():
        if _is_margin_head(key):
            raise OutboundPolicyError(
                f"outbound_guard: key {_name(key)} in ArrayRecord 'arrays' looks like the private "
                "margin head (class centres), which never leaves the site")
        if key not in sent:
            raise OutboundPolicyError(f"outbound_guard: key {_name(key)} in ArrayRecord 'arrays' "
                                      "was not sent by the server")
        _check_shared_array(key, array, sent[key])
    missing = [k for k in sent if k not in record]
    if missing:
        raise OutboundPolicyError(
            "outbound_guard: ArrayRecord 'arrays' lacks keys the server sent: "
            + ", ".join(_name(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else ""))


def _check_protected(record: ArrayRecord) -> None:
    """Only bit-exact `protect()` outputs (float32, (N, 3, 112, 112)), or exactly their float16
    rounding, may leave."""
    for key, array in record.items():
        shape = tuple(array.shape)
        if (array.dtype not in ("float32", "float16") or len(shape) != 4
                or shape[1:] != (3, IMAGE_SIDE, IMAGE_SIDE) or not _payload_fits(array)):
            raise OutboundPolicyError(
                f"outbound_guard: ArrayRecord 'protected' key {_name(key)} must be float32 or "
                f"float16 (N, 3, 112, 112) and no larger, got {_cut(str(array.dtype))} "
                f"{_shape(array)}")
        if not all_protected(array.numpy()):
            raise OutboundPolicyError(
                f"outbound_guard: ArrayRecord 'protected' key {_name(key)} holds images that did "
                "not come out of protect() (raw image?); refused")


def _check_pseudonyms(record: ArrayRecord) -> None:
    """Label arrays: int64 vectors of tokens this site drew (clients.pseudonyms), nothing else."""
    for key, array in record.items():
        if array.dtype != "int64" or len(tuple(array.shape)) != 1 or not _payload_fits(array):
            raise OutboundPolicyError(
                f"outbound_guard: ArrayRecord {_name(PSEUDONYMS)} key {_name(key)} must be an "
                f"int64 vector, got {_cut(str(array.dtype))} {_shape(array)}")
        if not all_issued(array.numpy()):
            raise OutboundPolicyError(
                f"outbound_guard: ArrayRecord {_name(PSEUDONYMS)} key {_name(key)} holds values "
                "that are not pseudonymous tokens this site drew; refused")


def _check_labels_match(content) -> None:
    """An upload's labels name its images one to one."""
    images = sum(int(a.shape[0]) for a in content[PROTECTED].values())
    labels = sum(int(a.shape[0]) for a in content[PSEUDONYMS].values())
    if images != labels:
        raise OutboundPolicyError(f"outbound_guard: {labels} pseudonymous labels for {images} "
                                  "protected images")


def _check_metrics(name: str, record: MetricRecord, allowed: frozenset[str]) -> None:
    """Only allow-listed names, one number each (no real metric is a list)."""
    for key, value in record.items():
        if key not in allowed:
            raise OutboundPolicyError(
                f"outbound_guard: MetricRecord {_name(name)} key {_name(key)} is not an "
                f"allowed metric of this message type ({len(allowed)} names allowed)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OutboundPolicyError(
                f"outbound_guard: MetricRecord {_name(name)} key {_name(key)} holds a "
                f"{type(value).__name__}; only one int or float per metric may leave")


def _check_metadata(incoming: Message, reply: Message) -> None:
    """A reply is `Message(..., reply_to=incoming)`: no field of its own to carry data in."""
    got, sent = reply.metadata, incoming.metadata
    if (got.message_type, got.group_id, got.reply_to_message_id) != (
            sent.message_type, sent.group_id, sent.message_id):
        raise OutboundPolicyError(
            "outbound_guard: the reply's metadata is not that of Message(..., reply_to=msg) "
            f"(message_type {_name(got.message_type)}, group_id {_name(got.group_id)})")


def _check_site_name(name: str, record: ConfigRecord, allowed: frozenset[str],
                     node_config: Mapping[str, object] | None) -> None:
    """The one string that may leave: the site's own configured name, exactly."""
    own = site_name(node_config) if node_config is not None else None
    for key, value in record.items():
        if key not in allowed or own is None or value != own:
            raise OutboundPolicyError(
                f"outbound_guard: ConfigRecord {_name(name)} key {_name(key)} is not this site's "
                "configured name (node config 'site-name'); refused")


def _check_record(name: str, record: object, policy: ReplyPolicy, incoming: Message,
                  node_config: Mapping[str, object] | None = None) -> None:
    if isinstance(record, ArrayRecord) and name in policy.arrays:
        if name == "arrays":
            _check_shared_arrays(record, _incoming_arrays(incoming))
        elif name == PSEUDONYMS:
            _check_pseudonyms(record)
        else:
            _check_protected(record)
    elif isinstance(record, MetricRecord) and name in policy.metrics:
        _check_metrics(name, record, policy.metrics[name])
    elif isinstance(record, ConfigRecord) and name in policy.configs:
        _check_site_name(name, record, policy.configs[name], node_config)
    else:
        allowed = sorted([*policy.arrays, *policy.metrics, *policy.configs])
        raise OutboundPolicyError(
            f"outbound_guard: {type(record).__name__} {_name(name)} may not leave the site in "
            f"a reply to {_name(incoming.metadata.message_type)} (allowed records: "
            f"{', '.join(allowed) or 'none'}; a ConfigRecord only for the site's name)")


def check_reply(incoming: Message, reply: Message,
                node_config: Mapping[str, object] | None = None) -> None:
    """Raise `OutboundPolicyError` if `reply` (to `incoming`) carries anything not allowed.
    `node_config`: the SuperNode's, against which a site-info reply's name is checked.

    An error reply passes only if it is the guard's own fixed one (`failure_reply`)."""
    if reply.has_error():
        if (reply.error.code, reply.error.reason) != (GUARD_ERROR_CODE, GUARD_ERROR_REASON):
            raise OutboundPolicyError(
                "outbound_guard: an error reply may carry only the guard's fixed code and reason")
        return
    _check_metadata(incoming, reply)
    if not reply.has_content():
        return
    content = reply.content
    for name, record in content.array_records.items():
        _check_image_shapes(name, record)
    policy = reply_policy(incoming.metadata.message_type)
    for name, record in content.items():
        _check_record(name, record, policy, incoming, node_config)
    if PSEUDONYMS in content or (PROTECTED in content and PSEUDONYMS in policy.arrays):
        if PROTECTED not in content or PSEUDONYMS not in content:
            raise OutboundPolicyError("outbound_guard: an upload carries protected images and "
                                      "their pseudonymous labels together or neither")
        _check_labels_match(content)


def failure_reply(msg: Message) -> Message:
    """The only error a site sends: a fixed code and text, whatever went wrong."""
    return Message(Error(code=GUARD_ERROR_CODE, reason=GUARD_ERROR_REASON), reply_to=msg)


def outbound_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: run the handler, send its reply only if the privacy rule allows it; any
    failure (exception, error reply, refusal) becomes `failure_reply` and is logged here."""
    kind = _name(msg.metadata.message_type)
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # noqa: BLE001 - its text stays on the site
        log(ERROR, "outbound_guard: the %s handler raised; the server gets only error code %d",
            kind, GUARD_ERROR_CODE, exc_info=exc)
        return failure_reply(msg)
    if not isinstance(reply, Message):
        log(ERROR, "outbound_guard: the %s handler returned a %s, not a Message; the server "
            "gets only error code %d", kind, _cut(type(reply).__name__), GUARD_ERROR_CODE)
        return failure_reply(msg)
    if reply.has_error():
        log(ERROR, "outbound_guard: the %s handler replied with error code %s: %s; the server "
            "gets only error code %d", kind, _cut(str(reply.error.code)),
            _cut(str(reply.error.reason), MAX_LOGGED_REASON), GUARD_ERROR_CODE)
        return failure_reply(msg)
    try:
        check_reply(msg, reply, context.node_config)
    except OutboundPolicyError as exc:
        log(ERROR, "%s; refused, the server gets only error code %d", exc, GUARD_ERROR_CODE)
        return failure_reply(msg)
    except Exception as exc:  # noqa: BLE001 - a reply the guard cannot read does not leave
        log(ERROR, "outbound_guard: could not check the %s reply; refused, the server gets only "
            "error code %d", kind, GUARD_ERROR_CODE, exc_info=exc)
        return failure_reply(msg)
    return reply


__all__ = ["GUARD_ALLOWED_RECORDS", "GUARD_ERROR_CODE", "GUARD_ERROR_REASON", "OutboundPolicyError",
           "REPLY_POLICIES", "ReplyPolicy", "check_reply", "failure_reply", "outbound_guard",
           "reply_policy"]
