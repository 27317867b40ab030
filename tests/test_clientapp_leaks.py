"""The real ClientApp refuses a leaking handler on every message type it answers.

`clients.client_app.app` is called with its production mods.  The site's own computation
(local training, local evaluation, the privacy attacks) is wrapped so that its result carries a
leak: a face's worth of values spread over extra metric keys, one face under an allowed metric
name, or (train) the private margin head among the shared weights.  The reply must be the
outbound guard's fixed error (code 2, fixed text), and the site's log must name what was
refused; the same call without the leak must pass, so the refusal is the leak's, not a crash's.

The fault hook (clients/faults.py) is checked the same way: a handler leak from node config
`fault="handler-leak"` is stopped by the guard (the hook sits inside it), while
`fault="extra-key"` reaches the reply (the hook is outermost: it plays a site without our guard).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import client_app, privacy_eval
from clients.faults import EXTRA_KEY, leak_values
from clients.guard import GUARD_ERROR_CODE, GUARD_ERROR_REASON
from minusface.presets import get_preset
from task.models import initial_arrays
from task.records import FROZEN_GENERATOR, PRIVACY_MESSAGE_TYPE, PRIVACY_RECORD, STAGE1, STAGE2
from task.wire import select

FACE = np.random.default_rng(0).random(112 * 112 * 3).tolist()    # one face's worth of values
LEAKS = ("extra-metric-keys", "face-in-a-metric", "head-in-arrays")


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def site_context(lfw_root: Path, tmp_path: Path, **node: object) -> Context:
    cfg = {"preset": "tiny", "data-path": str(lfw_root), "out-dir": str(tmp_path),
           "max-identities": 12, "min-nodes": 2, "stage1-rounds": 1, "stage2-rounds": 1}
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2,
                                                     **node},
                   state=RecordDict(), run_config=cfg)


def message(kind: str) -> Message:
    """What the server sends: a train or evaluate message of round 1 (no local epoch: the
    handler runs its real code path in a fraction of a second), or evaluate.privacy."""
    preset = get_preset("tiny")
    stage1 = initial_arrays(STAGE1, preset, 0)
    if kind == PRIVACY_MESSAGE_TYPE:
        content = RecordDict({"arrays": ArrayRecord(initial_arrays(STAGE2, preset, 1)),
                              FROZEN_GENERATOR: ArrayRecord(select(stage1, "generator")),
                              "config": ConfigRecord({})})
        return Message(content, 7, kind, group_id="privacy")
    config = {"stage": STAGE1, "lr": 0.01, "local-epochs": 0, "minusfed-round": 1}
    content = RecordDict({"arrays": ArrayRecord(stage1), "config": ConfigRecord(config)})
    return Message(content, 7, kind, group_id="1")


def leaky(metrics: dict, leak: str | None, allowed_name: str) -> dict:
    """`metrics` with the leak added (None: unchanged)."""
    if leak == "extra-metric-keys":
        return {**metrics, **leak_values()}
    if leak == "face-in-a-metric":
        return {**metrics, allowed_name: FACE}
    return metrics


def wrap_computation(monkeypatch, kind: str, leak: str | None) -> None:
    """Make the site's computation for `kind` return its honest result plus `leak`."""
    if kind == "train":
        real_train = client_app.local_train

        def train(*args, **kwargs):
            shared, head, metrics = real_train(*args, **kwargs)
            if leak == "head-in-arrays":
                shared = {**shared, **{f"head.{k}": v for k, v in head.items()}}
            return shared, head, leaky(metrics, leak, "train_loss")
        monkeypatch.setattr(client_app, "local_train", train)
    elif kind == "evaluate":
        real_evaluate = client_app.local_evaluate
        monkeypatch.setattr(client_app, "local_evaluate", lambda *a, **k: leaky(
            real_evaluate(*a, **k), leak, "accuracy"))
    else:      # the real attacks take minutes: an honest-looking result with every allowed name
        names = sorted(privacy_eval.privacy_metric_names())
        monkeypatch.setattr(client_app, "site_privacy_metrics", lambda *a, **k: leaky(
            {n: 0.5 for n in names}, leak, names[0]))


def is_fixed_error(reply: Message) -> bool:
    return (reply.has_error() and reply.error.code == GUARD_ERROR_CODE == 2
            and reply.error.reason == GUARD_ERROR_REASON)


def what_leaked(leak: str) -> Callable[[str], bool]:
    """The site's log names the refused key."""
    fragment = {"extra-metric-keys": "'leak-", "face-in-a-metric": "holds a list",
                "head-in-arrays": "'head."}[leak]
    return lambda logged: fragment in logged


KINDS = ("train", "evaluate", PRIVACY_MESSAGE_TYPE)
CASES = [(kind, leak) for kind in KINDS for leak in LEAKS
         if leak != "head-in-arrays" or kind == "train"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_honest_computation_passes_the_guard(kind, lfw_root, tmp_path, monkeypatch,
                                                 site_log):
    wrap_computation(monkeypatch, kind, None)
    reply = client_app.app(message(kind), site_context(lfw_root, tmp_path))
    assert not reply.has_error(), "\n".join(site_log.lines)
    expected = {"train": {"arrays", "metrics"}, "evaluate": {"metrics"},
                PRIVACY_MESSAGE_TYPE: {PRIVACY_RECORD}}[kind]
    assert set(reply.content.keys()) == expected


@pytest.mark.parametrize("kind, leak", CASES)
def test_a_leaking_handler_gets_only_the_fixed_error_out(kind, leak, lfw_root, tmp_path,
                                                         monkeypatch, site_log):
    wrap_computation(monkeypatch, kind, leak)
    reply = client_app.app(message(kind), site_context(lfw_root, tmp_path))
    logged = "\n".join(site_log.lines)
    assert is_fixed_error(reply), logged
    assert not reply.has_content()
    assert what_leaked(leak)(logged), logged
    assert "handler raised" not in logged                  # refused for the leak, not a crash


def test_fault_hook_handler_leak_is_inside_the_guard(lfw_root, tmp_path, site_log):
    reply = client_app.app(message("train"),
                           site_context(lfw_root, tmp_path, fault="handler-leak"))
    assert is_fixed_error(reply)
    assert what_leaked("extra-metric-keys")("\n".join(site_log.lines))


def test_fault_hook_corruption_is_outside_the_guard(lfw_root, tmp_path, site_log):
    """fault="extra-key" plays a hostile site: its extra array reaches the reply, which the
    guard would have refused; the server's validation must catch it (tests/test_faults.py)."""
    sent = message("train")
    reply = client_app.app(sent, site_context(lfw_root, tmp_path, fault="extra-key"))
    assert not reply.has_error(), "\n".join(site_log.lines)
    back = reply.content["arrays"]
    assert set(back.keys()) == set(sent.content["arrays"].keys()) | {EXTRA_KEY}
    assert torch.equal(torch.from_numpy(back[EXTRA_KEY].numpy()), torch.zeros(4))

