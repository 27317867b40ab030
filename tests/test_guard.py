"""The outbound guard: only shared weights, numeric metrics and real protect() outputs leave a site.

Messages are built as Flower's own tests do (`make_message(Metadata(...), ...)`); replies use
`Message(content, reply_to=incoming)`, which needs no running task.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.clientapp import ClientApp

from clients import guard
from clients.guard import GUARD_ALLOWED_RECORDS, OutboundPolicyError, check_reply, outbound_guard
from minusface import provenance
from minusface.frontend import MinusFaceFrontend

SHARED = {"backbone.conv.weight": (4, 3, 3, 3), "backbone.fc.bias": (8,)}


def shared_arrays(value: float = 0.0, shapes: dict[str, tuple[int, ...]] = SHARED) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, value, np.float32)) for k, s in shapes.items()})


def incoming(extra: dict[str, ArrayRecord] | None = None) -> Message:
    """A train instruction as FedAvg sends it: "arrays" + "config"."""
    metadata = Metadata(run_id=1, message_id="ins-7", src_node_id=0, dst_node_id=7,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600,
                        message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": shared_arrays(), "config": ConfigRecord({"lr": 0.1})})
    for name, rec in (extra or {}).items():
        content[name] = rec
    return make_message(metadata, content=content)


def reply_to(msg: Message, **records: ArrayRecord | ConfigRecord | MetricRecord) -> Message:
    content = RecordDict({"arrays": shared_arrays(1.0),
                          "metrics": MetricRecord({"train_loss": 0.5, "num-examples": 10})})
    for name, rec in records.items():
        content[name] = rec
    return Message(content, reply_to=msg)


def refused(msg: Message, reply: Message, *fragments: str) -> str:
    with pytest.raises(OutboundPolicyError) as info:
        check_reply(msg, reply)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text
    return text


@pytest.fixture(autouse=True)
def _clean_registry():
    provenance.clear_registry()
    yield
    provenance.clear_registry()


@pytest.fixture(scope="module")
def frontend() -> MinusFaceFrontend:
    torch.manual_seed(0)
    return MinusFaceFrontend(width=4).eval()


def protected_batch(frontend: MinusFaceFrontend, n: int = 2) -> np.ndarray:
    faces = torch.rand(n, 3, 112, 112) * 2 - 1
    return frontend.protect(faces).numpy()


def test_exports() -> None:
    assert GUARD_ALLOWED_RECORDS == ("arrays", "protected")


def test_shared_weights_and_metrics_pass() -> None:
    msg = incoming()
    check_reply(msg, reply_to(msg, summary=ConfigRecord({"note": "ok", "ids": [1, 2]})))


def test_error_reply_is_skipped() -> None:
    msg = incoming()
    check_reply(msg, Message(Error(code=0, reason="boom"), reply_to=msg))


def test_raw_face_under_new_key_is_blocked() -> None:
    msg = incoming()
    arrays = shared_arrays(1.0)
    arrays["debug"] = Array(np.random.rand(3, 112, 112).astype(np.float32))
    refused(msg, reply_to(msg, arrays=arrays), "raw image", "'arrays'", "'debug'")


def test_image_batch_under_images_is_blocked() -> None:
    msg = incoming()
    images = ArrayRecord({"0": Array(np.zeros((4, 3, 112, 112), np.float32))})
    refused(msg, reply_to(msg, images=images), "raw image", "'images'")


def test_channel_last_uint8_faces_are_blocked() -> None:
    """The site's decoded cache is (N, 112, 112, 3) uint8 (clients.data)."""
    msg = incoming()
    images = ArrayRecord({"cache": Array(np.zeros((2, 112, 112, 3), np.uint8))})
    refused(msg, reply_to(msg, stats=images), "raw image", "'stats'")


def test_residue_is_blocked_even_as_protected() -> None:
    msg = incoming()
    residue = ArrayRecord({"r": Array(np.zeros((1, 192, 112, 112), np.float32))})
    refused(msg, reply_to(msg, residue=residue), "DCT residue", "'residue'")
    refused(msg, reply_to(msg, protected=residue), "DCT residue", "'protected'")


def test_head_key_is_blocked_even_if_sent() -> None:
    msg = incoming()
    arrays = shared_arrays(1.0)
    arrays["head.weight"] = Array(np.zeros((10, 8), np.float32))
    refused(msg, reply_to(msg, arrays=arrays), "private margin head", "never leaves the site",
            "'head.weight'")
    sent = incoming()
    sent.content["arrays"]["head.weight"] = Array(np.zeros((10, 8), np.float32))
    refused(sent, reply_to(sent, arrays=arrays), "private margin head")


def test_unsent_key_subset_and_shape_change_are_blocked() -> None:
    msg = incoming()
    extra = shared_arrays(1.0)
    extra["backbone.extra"] = Array(np.zeros(3, np.float32))
    refused(msg, reply_to(msg, arrays=extra), "'backbone.extra'", "not sent")
    subset = ArrayRecord({"backbone.fc.bias": Array(np.zeros(8, np.float32))})
    refused(msg, reply_to(msg, arrays=subset), "lacks keys", "backbone.conv.weight")
    reshaped = shared_arrays(1.0, {**SHARED, "backbone.fc.bias": (9,)})
    refused(msg, reply_to(msg, arrays=reshaped), "'backbone.fc.bias'", "shape")


def test_echoed_frozen_generator_is_blocked() -> None:
    generator = ArrayRecord({"g.w": Array(np.zeros((4, 4), np.float32))})
    msg = incoming({"frozen-generator": generator})
    refused(msg, reply_to(msg, **{"frozen-generator": generator}), "'frozen-generator'")


def test_real_protect_outputs_pass_lookalikes_do_not(frontend: MinusFaceFrontend) -> None:
    msg = incoming()
    xp = protected_batch(frontend)
    assert xp.shape == (2, 3, 112, 112) and provenance.all_protected(xp)
    # An ArrayRecord round trip keeps float32 bytes, so the digest still matches.
    record = ArrayRecord({"0": Array(xp)})
    assert provenance.all_protected(record["0"].numpy())
    check_reply(msg, reply_to(msg, protected=record))

    fake = torch.rand(2, 3, 112, 112).numpy()  # looks like X_p: same shape, dtype, range
    refused(msg, reply_to(msg, protected=ArrayRecord({"0": Array(fake)})),
            "'protected'", "protect()")
    tampered = xp.copy()
    tampered[1, 0, 0, 0] += 1e-3
    mixed = ArrayRecord({"0": Array(xp), "1": Array(tampered)})
    refused(msg, reply_to(msg, protected=mixed), "'1'")
    refused(msg, reply_to(msg, protected=ArrayRecord({"0": Array(xp.astype(np.float64))})),
            "float32")


def test_registry_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provenance, "MAX_ENTRIES", 2)
    batch = torch.rand(3, 3, 112, 112)
    provenance.register_protected(batch)
    assert provenance.registry_size() == 2
    assert not provenance.is_protected(batch[0].numpy())  # oldest evicted
    assert provenance.is_protected(batch[2].numpy())


def test_bytes_long_strings_and_long_lists_are_blocked() -> None:
    msg = incoming()
    refused(msg, reply_to(msg, extra=ConfigRecord({"blob": b"\x89PNG"})), "bytes", "'blob'")
    refused(msg, reply_to(msg, extra=ConfigRecord({"s": "x" * 257})), "string", "'s'")
    refused(msg, reply_to(msg, extra=ConfigRecord({"l": list(range(65))})), "list", "'l'")
    refused(msg, reply_to(msg, metrics=MetricRecord({"num-examples": 1, "pix": [0.5] * 37632})),
            "MetricRecord", "'pix'")


def context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_mod_on_real_clientapp(frontend: MinusFaceFrontend) -> None:
    """ClientApp.__call__ re-raises a mod's exception; the runtime (run_clientapp / the simulation
    backend) turns it into an error reply holding only str(exception), i.e. names and shapes."""
    app = ClientApp()
    leak = {"on": False}

    xp = protected_batch(frontend)

    @app.train(mods=[outbound_guard])
    def train(msg: Message, ctx: Context) -> Message:
        out = reply_to(msg, protected=ArrayRecord({"0": Array(xp)}))
        if leak["on"]:
            out.content["images"] = ArrayRecord({"0": Array(np.ones((2, 3, 112, 112), np.float32))})
        return out

    msg = incoming()
    ok = app(msg, context())
    assert not ok.has_error() and set(ok.content.array_records) == {"arrays", "protected"}

    leak["on"] = True
    with pytest.raises(OutboundPolicyError) as info:
        app(msg, context())
    assert "'images'" in str(info.value) and len(str(info.value)) < 300


def test_mod_passes_handler_errors_through() -> None:
    msg = incoming()
    err = Message(Error(code=2, reason="handler failed"), reply_to=msg)
    assert guard.outbound_guard(msg, context(), lambda m, c: err) is err


def test_generator_output_conv_named_head_is_a_shared_weight():
    from clients.guard import _is_margin_head
    assert _is_margin_head("head.weight") and _is_margin_head("head-stage1.weight")
    assert not _is_margin_head("generator.head.weight")
    assert not _is_margin_head("recognizer.output_layer.3.weight")
