"""The outbound guard: only shared weights (as received), allow-listed numbers and real protect()
outputs leave a site; every failure leaves as one fixed error.

Messages are built as Flower's own tests do (`make_message(Metadata(...), ...)`); replies use
`Message(content, reply_to=incoming)`, which needs no running task.  The leak-channel tests use
the exact sizes of the issue (a 112x112x3 face is 37,632 values).  The real handlers of
clients/client_app.py (train with float16 wire and DP clipping, evaluate, evaluate.privacy) run
on LFW to prove that every real reply passes.
"""

from __future__ import annotations

import math
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
from flwr.supercore.task_identity import TaskIdentity

from clients.guard import (
    EVALUATE_METRICS,
    GUARD_ALLOWED_RECORDS,
    GUARD_ERROR_CODE,
    GUARD_ERROR_REASON,
    MAX_NAME_CHARS,
    TRAIN_METRICS,
    OutboundPolicyError,
    check_reply,
    failure_reply,
    outbound_guard,
    reply_policy,
)
from minusface import provenance
from minusface.frontend import MinusFaceFrontend
from tests.flower_log import FlowerLog

SHARED = {"backbone.conv.weight": (4, 3, 3, 3), "backbone.fc.bias": (8,)}
FACE_VALUES = 112 * 112 * 3                               # 37,632


def shared_arrays(value: float = 0.0, shapes: dict[str, tuple[int, ...]] = SHARED,
                  dtype: str = "float32") -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, value, dtype)) for k, s in shapes.items()})


def incoming(extra: dict[str, ArrayRecord] | None = None, message_type: str = MessageType.TRAIN,
             dtype: str = "float32") -> Message:
    """An instruction as FedAvg sends it: "arrays" + "config"."""
    metadata = Metadata(run_id=1, message_id="ins-7", src_node_id=0, dst_node_id=7,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600,
                        message_type=message_type)
    content = RecordDict({"arrays": shared_arrays(dtype=dtype),
                          "config": ConfigRecord({"lr": 0.1})})
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
    assert len(text) < 600                                # bounded, whatever the reply held
    return text


def is_fixed_error(reply: Message) -> bool:
    return (reply.has_error() and reply.error.code == GUARD_ERROR_CODE
            and reply.error.reason == GUARD_ERROR_REASON)


@pytest.fixture(autouse=True)
def _clean_registry():
    provenance.clear_registry()
    yield
    provenance.clear_registry()


@pytest.fixture
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def frontend() -> MinusFaceFrontend:
    torch.manual_seed(0)
    return MinusFaceFrontend(width=4).eval()


def protected_batch(frontend: MinusFaceFrontend, n: int = 2) -> np.ndarray:
    faces = torch.rand(n, 3, 112, 112) * 2 - 1
    return frontend.protect(faces).numpy()


def context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


# --------------------------------------------------------------------------- what may leave

def test_exports_and_policies() -> None:
    assert GUARD_ALLOWED_RECORDS == ("arrays", "protected", "pseudonyms")
    train, evaluate = reply_policy("train"), reply_policy("evaluate")
    upload = reply_policy("query.pooled_upload")
    assert upload.arrays == {"protected", "pseudonyms"} and set(upload.metrics) == {"upload"}
    assert train.arrays == {"arrays", "protected"}
    assert dict(train.metrics) == {"metrics": TRAIN_METRICS}
    assert evaluate.arrays == {"protected"}
    assert dict(evaluate.metrics) == {"metrics": EVALUATE_METRICS}
    assert reply_policy("train.default") == train
    for unknown in ("query", "train.debug", "evaluate.other", ""):
        assert not reply_policy(unknown).arrays and not reply_policy(unknown).metrics
    privacy = reply_policy("evaluate.privacy")
    assert set(privacy.metrics) == {"privacy"} and not privacy.arrays
    allowed = [*TRAIN_METRICS, *EVALUATE_METRICS, *privacy.metrics["privacy"]]
    assert max(map(len, allowed)) <= MAX_NAME_CHARS


def test_shared_weights_and_metrics_pass() -> None:
    msg = incoming()
    check_reply(msg, reply_to(msg))
    check_reply(msg, reply_to(msg, metrics=MetricRecord({k: 1.0 for k in TRAIN_METRICS})))
    check_reply(msg, Message(RecordDict(), reply_to=msg))  # nothing at all is fine


def test_only_the_guards_own_error_reply_passes_check_reply() -> None:
    msg = incoming()
    check_reply(msg, failure_reply(msg))
    refused(msg, Message(Error(code=0, reason="boom"), reply_to=msg), "fixed code and reason")
    refused(msg, Message(Error(code=GUARD_ERROR_CODE, reason="x" * FACE_VALUES), reply_to=msg),
            "fixed code and reason")


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
    ev = incoming(message_type="evaluate")
    check_reply(ev, Message(RecordDict({"protected": record}), reply_to=ev))

    fake = torch.rand(2, 3, 112, 112).numpy()  # looks like X_p: same shape, dtype, range
    refused(msg, reply_to(msg, protected=ArrayRecord({"0": Array(fake)})),
            "'protected'", "protect()")
    tampered = xp.copy()
    tampered[1, 0, 0, 0] += 1e-3
    mixed = ArrayRecord({"0": Array(xp), "1": Array(tampered)})
    refused(msg, reply_to(msg, protected=mixed), "'1'")
    refused(msg, reply_to(msg, protected=ArrayRecord({"0": Array(xp.astype(np.float64))})),
            "float32")


def test_protected_metadata_cannot_hide_a_bigger_payload(frontend: MinusFaceFrontend) -> None:
    """Metadata says one X_p, the bytes hold two (np.load reads the second as well)."""
    msg = incoming()
    xp = protected_batch(frontend, 2)
    honest = Array(xp)
    lying = Array(dtype="float32", shape=(1, 3, 112, 112), stype=honest.stype, data=honest.data)
    refused(msg, reply_to(msg, protected=ArrayRecord({"0": lying})), "'protected'", "no larger")


def test_registry_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provenance, "MAX_ENTRIES", 2)
    batch = torch.rand(3, 3, 112, 112)
    provenance.register_protected(batch)
    assert provenance.registry_size() == 4               # two digests per image
    assert not provenance.is_protected(batch[0].numpy())  # oldest evicted
    assert provenance.is_protected(batch[2].numpy())
    assert provenance.is_protected(batch[2].numpy().astype(np.float16))


def test_float16_passes_only_as_the_rounding_of_a_registered_xp() -> None:
    batch = torch.rand(2, 3, 112, 112)
    provenance.register_protected(batch)
    half = batch.numpy().astype(np.float16)
    assert provenance.all_protected(half)
    nudged = half.copy()
    nudged[0, 0, 0, 0] = np.nextafter(nudged[0, 0, 0, 0], np.float16(1))
    assert not provenance.all_protected(nudged)
    assert not provenance.all_protected(torch.rand(1, 3, 112, 112).numpy().astype(np.float16))


def test_generator_output_conv_named_head_is_a_shared_weight():
    from clients.guard import _is_margin_head
    assert _is_margin_head("head.weight") and _is_margin_head("head-stage1.weight")
    assert not _is_margin_head("generator.head.weight")
    assert not _is_margin_head("recognizer.output_layer.3.weight")


# --------------------------------------------------------------------------- leak channels (issue)

def test_leak_588_metric_keys_of_64_floats() -> None:
    msg = incoming()
    face = np.random.default_rng(0).random(FACE_VALUES)
    assert FACE_VALUES == 588 * 64
    leak = {f"p{i}": face[i * 64:(i + 1) * 64].tolist() for i in range(588)}
    refused(msg, reply_to(msg, metrics=MetricRecord({"num-examples": 10, **leak})),
            "MetricRecord 'metrics'", "'p0'", "not an allowed metric")
    # under allowed names, a list is refused as well (no real metric is a list)
    refused(msg, reply_to(msg, metrics=MetricRecord({"train_loss": face[:64].tolist()})),
            "'train_loss'", "list")


def test_leak_37632_scalar_keys_in_the_normal_metrics_record() -> None:
    msg = incoming()
    face = np.random.default_rng(1).random(FACE_VALUES)
    metrics = {"num-examples": 10, "train_loss": 0.5}
    metrics.update({f"m{i}": float(v) for i, v in enumerate(face)})
    assert len(metrics) == FACE_VALUES + 2
    refused(msg, reply_to(msg, metrics=MetricRecord(metrics)), "'m0'", "not an allowed metric",
            f"{len(TRAIN_METRICS)} names allowed")


def test_leak_196_config_strings_of_256_characters() -> None:
    """196 x 256 = 50,176 characters: a face as text; a reply never carries a ConfigRecord."""
    msg = incoming()
    text = "".join(chr(65 + i % 26) for i in range(196 * 256))
    strings = {f"s{i}": text[i * 256:(i + 1) * 256] for i in range(196)}
    refused(msg, reply_to(msg, config=ConfigRecord(strings)), "ConfigRecord 'config'",
            "a ConfigRecord only for")
    refused(msg, reply_to(msg, notes=ConfigRecord({"s0": strings["s0"]})), "ConfigRecord 'notes'")
    # not even under the name the metrics use
    refused(msg, reply_to(msg, metrics=ConfigRecord({"num-examples": 10})),
            "ConfigRecord 'metrics'")


def test_leak_one_metric_key_of_50176_characters_and_the_refusal_stays_short() -> None:
    msg = incoming()
    key = "".join(chr(97 + i % 26) for i in range(50_176))
    text = refused(msg, reply_to(msg, metrics=MetricRecord({"num-examples": 10, key: 1.0})),
                   key[:MAX_NAME_CHARS], "(50176 chars)")
    assert key[:MAX_NAME_CHARS + 1] not in text
    # a long record name and a long array key are cut the same way
    text = refused(msg, reply_to(msg, **{key: MetricRecord({"num-examples": 1})}), "MetricRecord")
    assert key[:MAX_NAME_CHARS + 1] not in text
    arrays = shared_arrays(1.0)
    arrays[key] = Array(np.zeros(3, np.float32))
    text = refused(msg, reply_to(msg, arrays=arrays), "not sent")
    assert key[:MAX_NAME_CHARS + 1] not in text


def test_leak_three_lists_of_64_ints() -> None:
    msg = incoming()
    lists = {name: list(range(i * 64, (i + 1) * 64))
             for i, name in enumerate(("num-examples", "train_loss", "train_acc"))}
    refused(msg, reply_to(msg, metrics=MetricRecord(lists)), "'num-examples'", "list")
    refused(msg, reply_to(msg, stats=ConfigRecord(lists)), "ConfigRecord 'stats'")


@pytest.mark.parametrize("wire,reply_dtype", [("float16", "float32"), ("float16", "float64"),
                                              ("float32", "float64"), ("float32", "int32")])
def test_leak_through_weights_of_another_dtype(wire: str, reply_dtype: str) -> None:
    """Same keys and shapes, but a wider (or different) dtype carries extra bits per value."""
    msg = incoming(dtype=wire)
    check_reply(msg, reply_to(msg, arrays=shared_arrays(1.0, dtype=wire)))
    refused(msg, reply_to(msg, arrays=shared_arrays(1.0, dtype=reply_dtype)),
            f"is {reply_dtype}", f"server sent {wire}")


def test_int_buffer_must_come_back_as_int() -> None:
    msg = incoming()
    msg.content["arrays"]["bn.num_batches_tracked"] = Array(np.array(5, np.int64))
    good = shared_arrays(1.0)
    good["bn.num_batches_tracked"] = Array(np.array(6, np.int64))
    check_reply(msg, reply_to(msg, arrays=good))
    bad = shared_arrays(1.0)
    bad["bn.num_batches_tracked"] = Array(np.array(6.5, np.float64))
    refused(msg, reply_to(msg, arrays=bad), "'bn.num_batches_tracked'", "float64")


def test_leak_behind_honest_array_metadata() -> None:
    """Right key, shape and dtype in the metadata, a face's worth of bytes behind them."""
    msg = incoming()
    arrays = shared_arrays(1.0)
    face = np.random.default_rng(2).random(FACE_VALUES).astype(np.float32)
    honest = arrays["backbone.fc.bias"]
    arrays["backbone.fc.bias"] = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype,
                                       data=honest.data + face.tobytes())
    refused(msg, reply_to(msg, arrays=arrays), "'backbone.fc.bias'", "bytes")


def test_unknown_message_type_may_reply_with_nothing() -> None:
    msg = incoming(message_type="query")
    check_reply(msg, Message(RecordDict(), reply_to=msg))
    refused(msg, Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg),
            "MetricRecord 'metrics'", "'query'", "allowed records: none")
    ev = incoming(message_type="evaluate")
    refused(ev, Message(RecordDict({"arrays": shared_arrays(1.0)}), reply_to=ev), "'arrays'")
    refused(ev, Message(RecordDict({"metrics": MetricRecord({"train_loss": 1.0})}), reply_to=ev),
            "'train_loss'")


def test_privacy_reply_only_privacy_names() -> None:
    from clients.privacy_eval import privacy_metric_names
    msg = incoming(message_type="evaluate.privacy")
    names = sorted(privacy_metric_names())
    check_reply(msg, Message(RecordDict({"privacy": MetricRecord({k: 0.5 for k in names})}),
                             reply_to=msg))
    refused(msg, Message(RecordDict({"privacy": MetricRecord({"minusface/pixels": 0.5})}),
                         reply_to=msg), "'minusface/pixels'")
    refused(msg, Message(RecordDict({"metrics": MetricRecord({"seconds": 1.0})}), reply_to=msg),
            "'metrics'")


def test_reply_metadata_cannot_carry_data() -> None:
    msg = incoming()
    metadata = Metadata(run_id=1, message_id="", src_node_id=7, dst_node_id=0,
                        reply_to_message_id="ins-7", group_id="x" * 5000, created_at=time.time(),
                        ttl=3600, message_type=MessageType.TRAIN)
    forged = make_message(metadata, content=RecordDict({"arrays": shared_arrays(1.0)}))
    text = refused(msg, forged, "reply_to=msg")
    assert "x" * (MAX_NAME_CHARS + 1) not in text


# --------------------------------------------------------------------------- the mod

def test_mod_on_real_clientapp(frontend: MinusFaceFrontend, site_log: FlowerLog) -> None:
    """A refusal, a handler exception and a handler's own error reply all leave as the one fixed
    error; what went wrong is in the site's log only (bounded names)."""
    app = ClientApp()
    mode = {"on": "ok"}
    xp = protected_batch(frontend)
    secret = "face-pixels:" + "7" * 5_000

    @app.train(mods=[outbound_guard])
    def train(msg: Message, ctx: Context) -> Message:
        out = reply_to(msg, protected=ArrayRecord({"0": Array(xp)}))
        if mode["on"] == "leak":
            out.content["images"] = ArrayRecord({"0": Array(np.ones((2, 3, 112, 112), np.float32))})
        elif mode["on"] == "raise":
            raise RuntimeError(secret)
        elif mode["on"] == "error":
            return Message(Error(code=0, reason=secret), reply_to=msg)
        elif mode["on"] == "none":
            return None                                   # type: ignore[return-value]
        return out

    msg = incoming()
    ok = app(msg, context())
    assert not ok.has_error() and set(ok.content.array_records) == {"arrays", "protected"}

    for on in ("leak", "raise", "error", "none"):
        mode["on"] = on
        site_log.records.clear()
        reply = app(msg, context())
        assert is_fixed_error(reply), on
        assert reply.metadata.reply_to_message_id == "ins-7"
        logged = site_log.text()
        assert logged and "error code 2" in logged, on
        if on == "leak":
            assert "'images'" in logged and "raw image" in logged
        if on == "raise":
            assert secret in logged                       # the traceback stays on the site
        if on == "error":
            assert "face-pixels:777" in logged and secret not in logged


def test_mod_turns_refused_check_into_fixed_error(site_log: FlowerLog) -> None:
    msg = incoming()
    key = "k" * 50_176

    def handler(m: Message, c: Context) -> Message:
        return reply_to(m, metrics=MetricRecord({"num-examples": 1, key: 2.0}))

    reply = outbound_guard(msg, context(), handler)
    assert is_fixed_error(reply)
    logged = site_log.text()
    assert "k" * MAX_NAME_CHARS in logged and "k" * (MAX_NAME_CHARS + 1) not in logged
    assert len(logged) < 1000


def test_an_unreadable_reply_fails_closed(site_log: FlowerLog) -> None:
    msg = incoming()

    def handler(m: Message, c: Context) -> Message:
        broken = Array(dtype="float32", shape=(1, 3, 112, 112), stype="numpy.ndarray",
                       data=b"not an npy file")
        return reply_to(m, protected=ArrayRecord({"0": broken}))

    assert is_fixed_error(outbound_guard(msg, context(), handler))
    assert "could not check" in site_log.text()


def test_server_sees_only_the_fixed_error(task_identity) -> None:
    """Real InProcessGrid + the real server strategy: a leaking site and a crashing site are
    rejected with the fixed text, the honest one is aggregated."""
    from simulation.inprocess import InProcessGrid
    from strategy import make_strategy

    app = ClientApp()

    @app.train(mods=[outbound_guard])
    def train(msg: Message, ctx: Context) -> Message:
        sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        metrics = {"num-examples": 5, "train_loss": 0.1}
        if ctx.node_id == 102:
            metrics.update({f"p{i}": [0.5] * 64 for i in range(588)})
        if ctx.node_id == 103:
            raise ValueError("site secret: " + "9" * 100)
        arrays = ArrayRecord({k: Array(v + 1) for k, v in sent.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    grid = InProcessGrid(app, 3, {})
    strategy = make_strategy(min_train_nodes=3, min_available_nodes=3)
    messages = strategy.configure_train(1, shared_arrays(0.0), ConfigRecord({"lr": 0.1}), grid)
    replies = list(grid.send_and_receive(messages))
    assert {r.metadata.src_node_id: r.has_error() for r in replies} == {101: False, 102: True,
                                                                          103: True}
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and float(arrays["backbone.fc.bias"].numpy()[0]) == 1.0
    problems = {r["node_id"]: r["problems"] for r in strategy.take_report().rejected}
    expected = [f"error reply (code {GUARD_ERROR_CODE}): {GUARD_ERROR_REASON}"]
    assert problems == {102: expected, 103: expected}


# --------------------------------------------------------------------------- real handlers pass

TINY_PRIVACY = {"inverter-epochs": 1, "aux-images": 8, "eval-images": 6, "batch-size": 4,
                "linkage-width": 8, "gi-images": 2, "gi-steps": 2, "gi-probe-steps": 10}


def _real_context(lfw_root, tmp_path) -> Context:
    cfg = {"preset": "tiny", "data-path": str(lfw_root), "out-dir": str(tmp_path),
           "max-identities": 12, "min-nodes": 2, "stage1-rounds": 1, "stage2-rounds": 1}
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                   state=RecordDict(), run_config=cfg)


def test_real_train_and_evaluate_replies_pass(lfw_root, tmp_path, task_identity,
                                              one_torch_thread, site_log: FlowerLog) -> None:
    """clients.client_app with its production mods: stage-1 train on a float16 wire with DP
    clipping on (dp_clipping_mod inside the guard), then evaluate."""
    from clients.client_app import app
    from federation.server_app import initial_arrays
    from minusface.presets import get_preset
    from task.records import STAGE1
    from task.wire import to_wire

    ctx = _real_context(lfw_root, tmp_path)
    sent = to_wire(initial_arrays(STAGE1, get_preset("tiny"), 0), "float16")
    arrays = ArrayRecord(sent)
    assert any(a.dtype == "float16" for a in arrays.values())
    config = {"stage": STAGE1, "lr": 0.01, "local-epochs": 1, "server-round": 1,
              "clipping_norm": 0.5}
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), 7, "train",
                  group_id="1")
    reply = app(msg, ctx)
    assert not reply.has_error(), site_log.text()
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert set(reply.content["metrics"]) == TRAIN_METRICS      # every real train metric, allowed
    back = reply.content["arrays"]
    assert {k: a.dtype for k, a in back.items()} == {k: a.dtype for k, a in arrays.items()}
    update = math.sqrt(sum(float(np.sum((back[k].numpy().astype(np.float64)
                                         - arrays[k].numpy().astype(np.float64)) ** 2))
                           for k in arrays if arrays[k].dtype.startswith("float")))
    assert update == pytest.approx(0.5, rel=0.02)             # the DP mod clipped it to C

    ev = Message(RecordDict({"arrays": back, "config": ConfigRecord({"stage": STAGE1,
                                                                     "server-round": 1})}),
                 7, "evaluate", group_id="1")
    ev_reply = app(ev, ctx)
    assert not ev_reply.has_error(), site_log.text()
    assert set(ev_reply.content.keys()) == {"metrics"}
    assert set(ev_reply.content["metrics"]) <= EVALUATE_METRICS
    assert {"num-examples", "eval_pairs"} <= set(ev_reply.content["metrics"])


def test_real_privacy_reply_passes_and_every_key_is_allowed(lfw_root, tmp_path, task_identity,
                                                            one_torch_thread,
                                                            site_log: FlowerLog) -> None:
    """The real evaluate.privacy handler with every row switched on (gradient inversion, probe,
    f_p sent): its reply passes the guard and each key is in privacy_metric_names()."""
    from clients.client_app import app
    from clients.privacy_eval import GI_ROWS, REPORT_ROWS, privacy_metric_names
    from federation.privacy_round import privacy_messages
    from federation.server_app import initial_arrays
    from minusface.generator import UNetGenerator
    from minusface.presets import get_preset
    from privacy.report import get_privacy_config
    from task.records import PRIVACY_MESSAGE_TYPE, PRIVACY_RECORD, STAGE2

    ctx = _real_context(lfw_root, tmp_path)
    torch.manual_seed(0)
    gen = {f"generator.{k}": v for k, v in UNetGenerator(width=4).state_dict().items()}
    rec = initial_arrays(STAGE2, get_preset("tiny"), 1)
    (msg,) = privacy_messages([7], gen, rec, "tiny", 0, TINY_PRIVACY)
    msg = Message(msg.content, 7, PRIVACY_MESSAGE_TYPE, group_id="privacy")
    reply = app(msg, ctx)
    assert not reply.has_error(), site_log.text()
    keys = set(reply.content[PRIVACY_RECORD])
    assert keys <= privacy_metric_names()
    rows = {k.rsplit("/", 1)[0] for k in keys if "/" in k}
    steps = f"gi-steps{get_privacy_config('tiny').gi_local_steps}/"   # the run's K only
    expected = {r for r in GI_ROWS if not r.startswith("gi-steps") or r.startswith(steps)}
    assert rows == set(REPORT_ROWS) | expected                   # every known row was produced


def test_skipped_privacy_reply_passes() -> None:
    """A site with fewer than 3 identities replies {"privacy-skipped", "n-identities"}."""
    from clients.privacy_eval import site_privacy_metrics
    from privacy.report import get_privacy_config
    metrics = site_privacy_metrics(np.zeros((2, 112, 112, 3), np.uint8), np.array([0, 1]), {},
                                   get_privacy_config("tiny"))
    assert set(metrics) == {"privacy-skipped", "n-identities"}
    msg = incoming(message_type="evaluate.privacy")
    check_reply(msg, Message(RecordDict({"privacy": MetricRecord(metrics)}), reply_to=msg))
