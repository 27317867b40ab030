"""Client side of central differential privacy: clip the site's update with Flower's mod.

The server (`strategy/dp.py`, Flower's `DifferentialPrivacyClientSideFixedClipping`) puts the
clipping norm into the train config under Flower's key "clipping_norm"; Flower's
`fixedclipping_mod` (flwr.clientapp.mod, Message API) then clips the update (reply - sent)
to that L2 norm before it leaves.  `dp_clipping_mod` runs that mod unchanged and only adapts
the message around it, because as shipped in 1.42 it cannot run on MinusFed's messages:

* it refuses a message with more than one ArrayRecord, and stage-2 train messages also carry
  the read-only frozen generator (`frozen-generator`): that record is held back while the mod
  inspects the message and handed to the handler as usual (it is never part of the reply);
* it scales the update in place, which raises for integer arrays (BatchNorm's
  `num_batches_tracked`): integer buffers are sent back unchanged (zero update; they only count
  local batches, i.e. reveal dataset sizes, and are unused with BatchNorm's default momentum)
  and are shown to the mod as floats, then restored to their dtype.

Without "clipping_norm" in the config (DP off) or for other message types it is a no-op.
Wire it after `outbound_guard` so the guard sees the clipped reply:
`@app.train(mods=[outbound_guard, dp_clipping_mod])`.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from task.records import ARRAYS, CONFIG


def clipping_requested(msg: Message) -> bool:
    """True for a train message whose config carries Flower's clipping-norm key."""
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return False
    config = msg.content.get(CONFIG)
    return isinstance(config, ConfigRecord) and KEY_CLIPPING_NORM in config


def _is_integer(array: Array) -> bool:
    return not np.issubdtype(np.dtype(array.dtype), np.floating)


def _as_float(record: ArrayRecord, keys: list[str]) -> ArrayRecord:
    """A copy of `record` (same key order) with `keys` converted to float64."""
    return ArrayRecord({k: Array(v.numpy().astype(np.float64)) if k in keys else v
                        for k, v in record.items()})


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: clip this site's train update with `fixedclipping_mod` (see module doc)."""
    if not clipping_requested(msg):
        return call_next(msg, context)
    content = msg.content
    sent = content[ARRAYS]
    side = {name: rec for name, rec in content.array_records.items() if name != ARRAYS}
    int_keys = [k for k, a in sent.items() if _is_integer(a)]
    sent_as_float = _as_float(sent, int_keys)

    def handler(inner_msg: Message, inner_context: Context) -> Message:
        # the handler sees the message exactly as the server sent it
        inner_msg.content[ARRAYS] = sent
        for name, rec in side.items():
            inner_msg.content[name] = rec
        reply = call_next(inner_msg, inner_context)
        if not reply.has_error() and ARRAYS in reply.content:
            out = reply.content[ARRAYS]
            for key in int_keys:
                if key in out:
                    out[key] = sent_as_float[key]        # integer buffers: zero update
        return reply

    for name in side:
        del content[name]
    content[ARRAYS] = sent_as_float
    try:
        reply = fixedclipping_mod(msg, context, handler)
    finally:
        content[ARRAYS] = sent
        for name, rec in side.items():
            content[name] = rec
    if not reply.has_error() and ARRAYS in reply.content:
        out = reply.content[ARRAYS]
        for key in int_keys:
            if key in out:
                out[key] = Array(out[key].numpy().astype(sent[key].numpy().dtype))
    return reply


__all__ = ["dp_clipping_mod", "clipping_requested"]
