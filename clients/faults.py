"""TEST HOOK: a SuperNode that misbehaves on purpose, to prove the federation holds.

Two ClientApp mods, both switched on only by the SuperNode's own node config (key `fault`), never
by the run config, which the server (anyone who submits a run) controls:

    flower-supernode ... --node-config 'partition-id=1 num-partitions=3 fault="nan"'

`inject_fault` is wired *outermost* on train (`mods=[inject_fault, outbound_guard,
inject_handler_bug, dp_clipping_mod]`): it lets the real handler train and the outbound guard pass
the honest reply, and only then corrupts that reply, i.e. it plays a modified or hostile site that
does not run our guard.  The server's reply validation (strategy/validation.py) must then reject
or bound it with a reason while the round goes on with the other sites (tests/test_faults.py).

| `fault`        | what the reply carries instead of the honest one                | server says |
|----------------|------------------------------------------------------------------|-------------|
| `nan`          | the first floating-point array filled with NaN                   | non-finite value(s) |
| `oversized`    | every floating-point array + 1000 (update norm ~1e6)             | exceeds max_update_norm (needs run config `max-update-norm` > 0) |
| `extra-key`    | an additional array `fault.extra-key` the server never sent      | unexpected keys |
| `overweight`   | `num-examples` = 1e18 (to take over FedAvg)                      | rejected: above `max-num-examples` |
| `inflated`     | `num-examples` x 1000 (a plausible-looking lie under the cap)    | weight clipped to `max-weight-ratio` x the median |
| `leak-metrics` | 588 extra metric keys of 64 floats (a 112x112x3 face's worth)    | rejected: too many metric keys |

`inject_handler_bug` sits *inside* the outbound guard and plays a buggy handler on an honest site:

| `fault`        | what the handler tries to send                                   | what leaves the site |
|----------------|------------------------------------------------------------------|----------------------|
| `handler-leak` | the same 588 x 64 metric values                                  | nothing: the guard refuses and the site sends only its fixed error reply |

Without a `fault` key (every real deployment) both mods only call the handler.  An unknown value
raises before training, so a typo never looks like an honest site.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from task.records import ARRAYS, NUM_EXAMPLES

FAULT_KEY = "fault"                 # node-config key (never read from the run config)
ARRAY_FAULTS = ("nan", "oversized", "extra-key")
METRIC_FAULTS = ("overweight", "inflated", "leak-metrics")
HANDLER_FAULTS = ("handler-leak",)
FAULTS = ARRAY_FAULTS + METRIC_FAULTS + HANDLER_FAULTS
OVERSIZED_SHIFT = 1000.0
EXTRA_KEY = "fault.extra-key"
OVERWEIGHT = 1e18
INFLATE = 1000
# a 112 x 112 x 3 face is 37,632 values: 588 keys of 64 floats each (the leak channel)
LEAK_KEYS, LEAK_LIST = 588, 64
LEAK_PREFIX = "leak-"


def _fault_of(context: Context) -> str | None:
    fault = context.node_config.get(FAULT_KEY)
    if fault is not None and fault not in FAULTS:   # fail before training, not after
        raise ValueError(f"node config {FAULT_KEY}={fault!r}: expected one of {', '.join(FAULTS)}")
    return None if fault is None else str(fault)


def corrupt_arrays(arrays: ArrayRecord, fault: str) -> ArrayRecord:
    """A copy of `arrays` with an array fault applied (see the module table)."""
    if fault not in ARRAY_FAULTS:
        raise ValueError(f"node config {FAULT_KEY}={fault!r}: expected one of "
                         f"{', '.join(ARRAY_FAULTS)}")
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


def leak_values(seed: int = 0) -> dict[str, list[float]]:
    """588 metric entries of 64 floats: one face's pixels spread over metric keys."""
    face = np.random.default_rng(seed).random(LEAK_KEYS * LEAK_LIST)
    return {f"{LEAK_PREFIX}{i}": face[i * LEAK_LIST:(i + 1) * LEAK_LIST].tolist()
            for i in range(LEAK_KEYS)}


def corrupt_metrics(metrics: MetricRecord, fault: str) -> MetricRecord:
    """A copy of a reply's MetricRecord with a metric fault applied (see the module table)."""
    if fault not in METRIC_FAULTS + HANDLER_FAULTS:
        raise ValueError(f"node config {FAULT_KEY}={fault!r}: expected one of "
                         f"{', '.join(METRIC_FAULTS + HANDLER_FAULTS)}")
    out = MetricRecord(dict(metrics))
    if fault == "overweight":
        out[NUM_EXAMPLES] = OVERWEIGHT
    elif fault == "inflated":
        out[NUM_EXAMPLES] = int(metrics[NUM_EXAMPLES]) * INFLATE
    else:
        for key, values in leak_values().items():
            out[key] = values
    return out


def _corrupt_reply(reply: Message, fault: str) -> Message:
    if fault in ARRAY_FAULTS and ARRAYS in reply.content:
        reply.content[ARRAYS] = corrupt_arrays(reply.content[ARRAYS], fault)
    elif fault in METRIC_FAULTS + HANDLER_FAULTS:
        name = next(iter(reply.content.metric_records), None)
        if name is not None:
            reply.content[name] = corrupt_metrics(reply.content[name], fault)
    return reply


def inject_fault(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod (test hook, outermost): corrupt the finished train reply as a hostile site."""
    fault = _fault_of(context)
    reply = call_next(msg, context)
    if fault is None or fault in HANDLER_FAULTS or reply.has_error():
        return reply
    return _corrupt_reply(reply, fault)


def inject_handler_bug(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod (test hook, inside the outbound guard): a handler bug that tries to leak."""
    fault = _fault_of(context)
    reply = call_next(msg, context)
    if fault not in HANDLER_FAULTS or reply.has_error():
        return reply
    return _corrupt_reply(reply, str(fault))


__all__ = ["FAULTS", "FAULT_KEY", "corrupt_arrays", "corrupt_metrics", "inject_fault",
           "inject_handler_bug", "leak_values"]
