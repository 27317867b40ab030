"""TEST HOOK: a SuperNode that sends a bad update on purpose, to prove the server rejects it.

`inject_fault` is a ClientApp mod wired *outermost* on train (`mods=[inject_fault,
outbound_guard, dp_clipping_mod]`): it lets the real handler train and the outbound guard pass
the honest reply, and only then corrupts that reply, i.e. it plays a modified or broken site
that does not run our guard.  The server's reply validation (strategy/validation.py) must then
reject it with a reason while the round goes on with the other sites (tests/test_faults.py).

It is switched on only by the SuperNode's own node config, never by the run config, which the
server (anyone who submits a run) controls:

    flower-supernode ... --node-config 'partition-id=1 num-partitions=3 fault="nan"'

| `fault`     | what the reply carries instead of the trained weights          | server says          |
|-------------|----------------------------------------------------------------|----------------------|
| `nan`       | the first floating-point array filled with NaN                  | non-finite value(s)  |
| `oversized` | every floating-point array + 1000 (update norm ~1e6)            | exceeds max_update_norm (needs run config `max-update-norm` > 0) |
| `extra-key` | an additional array `fault.extra-key` the server never sent     | unexpected keys      |

Without a `fault` key (every real deployment) the mod only calls the handler.  An unknown value
raises, so a typo never looks like an honest site.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from federation.protocol import ARRAYS

FAULT_KEY = "fault"                 # node-config key (never read from the run config)
FAULTS = ("nan", "oversized", "extra-key")
OVERSIZED_SHIFT = 1000.0
EXTRA_KEY = "fault.extra-key"


def corrupt_arrays(arrays: ArrayRecord, fault: str) -> ArrayRecord:
    """A copy of `arrays` with `fault` applied (see the module table)."""
    if fault not in FAULTS:
        raise ValueError(f"node config {FAULT_KEY}={fault!r}: expected one of {', '.join(FAULTS)}")
    out = ArrayRecord()
    poisoned = False
    for key, array in arrays.items():
        value = array.numpy()
        if np.issubdtype(value.dtype, np.floating):
            if fault == "nan" and not poisoned:
                value = np.full_like(value, np.nan)
                poisoned = True
            elif fault == "oversized":
                value = value + value.dtype.type(OVERSIZED_SHIFT)
        out[key] = Array(np.asarray(value, order="C"))
    if fault == "extra-key":
        out[EXTRA_KEY] = Array(np.zeros(4, np.float32))
    return out


def inject_fault(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod (test hook): corrupt the finished train reply if node config asks for it."""
    fault = context.node_config.get(FAULT_KEY)
    if fault is not None and fault not in FAULTS:   # fail before training, not after
        raise ValueError(f"node config {FAULT_KEY}={fault!r}: expected one of {', '.join(FAULTS)}")
    reply = call_next(msg, context)
    if fault is None or reply.has_error() or ARRAYS not in reply.content:
        return reply
    reply.content[ARRAYS] = corrupt_arrays(reply.content[ARRAYS], str(fault))
    return reply


__all__ = ["FAULTS", "FAULT_KEY", "corrupt_arrays", "inject_fault"]
