"""Pooled stage 2: what a site uploads (through its ClientApp and outbound guard), the server's
screening and spool, and the pooled data the trainer reads.  Ray Train and whole runs: slow
tests in tests/test_pooled_runs.py."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.supercore.task_identity import TaskIdentity

from clients.guard import OutboundPolicyError, check_reply
from clients.pseudonyms import all_issued, forget_pseudonyms, site_pseudonyms
from minusface.presets import get_preset
from strategy.spool import PooledData, Spool, UploadError, check_upload
from task.models import initial_arrays
from task.records import (
    FROZEN_GENERATOR,
    PROTECTED,
    PSEUDONYMS,
    STAGE1,
    UPLOAD_MESSAGE_TYPE,
    UPLOAD_RECORD,
)
from task.wire import select


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    forget_pseudonyms()
    yield
    forget_pseudonyms()


def _generator() -> dict[str, torch.Tensor]:
    return select(initial_arrays(STAGE1, get_preset("tiny"), 0), "generator")


def _ask(chunk: int, upload_id: str = "u1", chunk_images: int = 8, copies: int = 3) -> Message:
    content = RecordDict({FROZEN_GENERATOR: ArrayRecord(_generator()), "config": ConfigRecord(
        {"upload-id": upload_id, "chunk": chunk, "chunk-images": chunk_images, "copies": copies,
         "stage": "stage2"})})
    return Message(content, 7, UPLOAD_MESSAGE_TYPE, group_id="1")


def _context(lfw_root, pid: int, n: int = 2) -> Context:
    cfg = {"preset": "tiny", "data-path": str(lfw_root), "max-identities": 12}
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": n},
                   state=RecordDict(), run_config=cfg)


def _names(lfw_root) -> set[str]:
    return {p.name for p in (lfw_root / "images").iterdir()}


def test_a_site_uploads_float16_xp_with_random_tokens_through_its_guard(lfw_root):
    from clients.client_app import app
    ctx = _context(lfw_root, 0)
    reply = app(_ask(0), ctx)
    assert not reply.has_error(), "the guard refused an honest upload"
    assert set(reply.content.keys()) == {PROTECTED, PSEUDONYMS, UPLOAD_RECORD}
    xp = reply.content[PROTECTED]["xp"].numpy()
    labels = reply.content[PSEUDONYMS]["labels"].numpy()
    said = dict(reply.content[UPLOAD_RECORD])
    assert xp.dtype == np.float16 and xp.shape == (8 * 3, 3, 112, 112)
    assert said["images"] == 8 and said["copies"] == 3 and said["chunk"] == 0
    # a face's three copies: same token, different permutations, so different X_p
    assert (labels[0::3] == labels[1::3]).all() and (labels[0::3] == labels[2::3]).all()
    assert not np.array_equal(xp[0], xp[1])
    upload = check_upload(xp, labels, said, chunk=0, chunk_images=8, copies=3, max_images=10**6)
    # the same site asked again (a restarted ServerApp) uses the same tokens and site token
    again = app(_ask(1), ctx)
    said2 = dict(again.content[UPLOAD_RECORD])
    assert said2["site-token"] == said["site-token"] and said2["chunks"] == said["chunks"]
    names = site_pseudonyms(None, "u1", "lfw-fold0-part0of2", said["identities"])
    assert set(labels) <= set(names.labels.tolist())
    # ... also after the process forgot them (a restarted SuperNode): the state-dir file
    forget_pseudonyms()
    third = app(_ask(0), ctx)
    assert dict(third.content[UPLOAD_RECORD])["site-token"] == said["site-token"]
    assert set(third.content[PSEUDONYMS]["labels"].numpy()) == set(labels)
    # another site draws its own tokens; no token is a folder name or a small label index
    other = app(_ask(0), _context(lfw_root, 1))
    other_labels = set(other.content[PSEUDONYMS]["labels"].numpy().tolist())
    assert not other_labels & set(labels.tolist())
    assert dict(other.content[UPLOAD_RECORD])["site-token"] != said["site-token"]
    assert min(other_labels | set(labels.tolist())) > 2**20
    names_as_text = _names(lfw_root)
    assert not {str(t) for t in other_labels | set(labels.tolist())} & names_as_text
    assert upload.site != "" and len(upload.site) == 16
    # a new upload id: new tokens
    fresh = app(_ask(0, upload_id="u2"), ctx)
    assert not set(fresh.content[PSEUDONYMS]["labels"].numpy().tolist()) & set(labels.tolist())


def _upload_request() -> Message:
    metadata = Metadata(run_id=1, message_id="ins-9", src_node_id=0, dst_node_id=7,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600,
                        message_type=UPLOAD_MESSAGE_TYPE)
    return make_message(metadata, content=RecordDict({"config": ConfigRecord({"chunk": 0})}))


def _reply(msg: Message, xp: np.ndarray, labels: np.ndarray) -> Message:
    return Message(RecordDict({PROTECTED: ArrayRecord({"xp": Array(xp)}),
                               PSEUDONYMS: ArrayRecord({"labels": Array(labels)}),
                               UPLOAD_RECORD: MetricRecord({"chunk": 0, "images": 1})}),
                   reply_to=msg)


def test_the_guard_refuses_uploads_that_are_not_registered_xp_or_issued_tokens():
    from minusface.frontend import MinusFaceFrontend
    torch.manual_seed(0)
    frontend = MinusFaceFrontend(width=4).eval()
    xp16 = frontend.protect(torch.rand(2, 3, 112, 112) * 2 - 1).numpy().astype(np.float16)
    tokens = site_pseudonyms(None, "u", "site-a", 2).labels
    msg = _upload_request()
    check_reply(msg, _reply(msg, xp16, tokens))                     # honest: passes
    cases = {
        "not come out of protect": (np.random.default_rng(0).random((2, 3, 112, 112))
                                    .astype(np.float16), tokens),
        "must be float32 or float16": (np.random.default_rng(0).random((2, 112, 112, 3)).astype(np.float16),
                      tokens),
        "not pseudonymous tokens": (xp16, np.array([1, 2], dtype=np.int64)),
        "int64 vector": (xp16, tokens.astype(np.float64)),
        "labels for 2": (xp16, tokens[:1]),
    }
    for fragment, (images, labels) in cases.items():
        with pytest.raises(OutboundPolicyError, match=fragment):
            check_reply(msg, _reply(msg, images, labels))
    # X_p without labels (or labels without X_p) in an upload: refused
    lone = Message(RecordDict({PROTECTED: ArrayRecord({"xp": Array(xp16)})}), reply_to=msg)
    with pytest.raises(OutboundPolicyError, match="together"):
        check_reply(msg, lone)
    assert all_issued(tokens) and not all_issued(tokens + 1)


def _said(**over) -> dict:
    said = {"chunk": 0, "chunks": 2, "images": 2, "copies": 2, "identities": 2,
            "site-token": 12345}
    said.update(over)
    return said


def _chunk(n: int = 4, value: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    return (np.full((n, 3, 112, 112), value, dtype=np.float16),
            np.array([7, 7, 9, 9][:n], dtype=np.int64))


@pytest.mark.parametrize("change, fragment", [
    (lambda xp, lab, s: (xp, lab, {**s, "chunk": 1}), "asked for 0"),
    (lambda xp, lab, s: (xp, lab, {**s, "copies": 3}), "copies"),
    (lambda xp, lab, s: (xp, lab, {**s, "chunks": 10**9}), "chunk(s)"),
    (lambda xp, lab, s: (xp, lab, {**s, "images": "2"}), "expected an int"),
    (lambda xp, lab, s: (xp.astype(np.float32), lab, s), "float16"),
    (lambda xp, lab, s: (xp[:3], lab[:3], s), "float16"),
    (lambda xp, lab, s: (np.full_like(xp, np.nan), lab, s), "finite"),
    (lambda xp, lab, s: (np.full_like(xp, 2.0), lab, s), "[0, 1]"),
    (lambda xp, lab, s: (xp, lab.astype(np.int32), s), "int64"),
    (lambda xp, lab, s: (xp, np.array([1, 2, 3, 4]), {**s, "identities": 2}), "label tokens"),
    (lambda xp, lab, s: (xp, -lab, s), "label tokens"),
])
def test_the_server_screens_every_upload(change, fragment):
    xp, labels, said = change(*_chunk(), _said())
    with pytest.raises(UploadError) as info:
        check_upload(xp, labels, said, chunk=0, chunk_images=2, copies=2, max_images=100)
    assert fragment in str(info.value)


def test_a_site_cannot_change_its_chunk_count_mid_upload():
    xp, labels = _chunk()
    check_upload(xp, labels, _said(), chunk=0, chunk_images=2, copies=2, max_images=100)
    with pytest.raises(UploadError, match="earlier 3"):
        check_upload(xp, labels, _said(), chunk=0, chunk_images=2, copies=2, max_images=100,
                     known_chunks=3)


def test_the_spool_keeps_the_first_answer_per_chunk_and_counts_per_site(tmp_path):
    spool = Spool(tmp_path / "spool")
    xp, labels = _chunk()
    first = check_upload(xp, labels, _said(), chunk=0, chunk_images=2, copies=2, max_images=100)
    assert spool.put(first, node=5)
    later = check_upload(_chunk(value=0.25)[0], labels, _said(), chunk=0, chunk_images=2,
                         copies=2, max_images=100)
    assert not spool.put(later, node=6)                      # a re-sent chunk replaces nothing
    kept = np.load(spool.chunk_files(first.site)[0][0], allow_pickle=False)
    assert float(kept.max()) == 0.5
    site = spool.sites()[first.site]
    assert (site.chunks, site.have, site.xp_images, site.complete) == (2, (0,), 4, False)
    assert site.nbytes == xp.nbytes + labels.nbytes and site.nodes == (5,)
    second = check_upload(*_chunk(), _said(chunk=1), chunk=1, chunk_images=2, copies=2,
                          max_images=100)
    spool.put(second, node=5)
    assert spool.sites()[first.site].complete
    # a torn write (arrays without the json that completes them) does not count as a chunk
    (tmp_path / "spool" / first.site / "chunk-000005.xp.npy").write_bytes(b"partial")
    assert spool.sites()[first.site].have == (0, 1)


def test_pooled_data_keys_classes_by_site_and_token(tmp_path):
    spool = Spool(tmp_path / "spool")
    xp, _ = _chunk()
    for token, site_token in ((11, 1), (11, 2)):                 # the same token at two sites
        labels = np.array([token, token, token + 1, token + 1], dtype=np.int64)
        up = check_upload(xp, labels, _said(chunks=1, **{"site-token": site_token}), chunk=0,
                          chunk_images=2, copies=2, max_images=100)
        spool.put(up, node=site_token)
    data = PooledData(tmp_path / "spool", list(spool.sites()))
    assert len(data) == 8 and data.num_classes == 4              # never merged across sites
    x, y = data.batch(np.array([0, 5]))
    assert x.dtype == np.float32 and x.shape == (2, 3, 112, 112) and y.dtype == np.int64
    assert json.loads((tmp_path / "spool" / up.site / "chunk-000000.json").read_text())["node"] == 2


def test_run_config_checks_the_pooled_keys():
    from task.config import run_config
    cfg = run_config({"stage2-mode": "pooled", "pooled-workers": 2})
    assert cfg.stage2_mode == "pooled" and cfg.protect_copies == 3
    for key, bad in (("stage2-mode", "central"), ("protect-copies", 0),
                     ("upload-chunk-images", 0), ("pooled-workers", 0),
                     ("pooled-gpus-per-worker", -1.0)):
        with pytest.raises(ValueError, match=key):
            run_config({key: bad})


def test_the_privacy_summary_says_what_left_each_site(tmp_path):
    from federation.privacy_round import write_privacy_summary
    shipped = [{"stage": "stage2-upload", "node": 5, "site": "00000000000000aa", "complete": True,
                "faces": 30, "copies": 3, "xp_images": 90, "label_tokens": 6,
                "spooled_bytes": 6_774_480, "bytes_received": 2_312_896, "messages": 4,
                "refused": 0}]
    md = write_privacy_summary({"node-5": {"privacy-skipped": 1, "n-identities": 1}}, tmp_path,
                               shipped).read_text()
    assert "What left each site" in md and "| 5 | 00000000000000aa | yes | 30 | 3 | 90 | 6 |" in md
    node = json.loads((tmp_path / "node-5.json").read_text())
    assert node["shipped/xp_images"] == 90 and node["shipped/label_tokens"] == 6


def test_a_site_can_refuse_to_ship_its_faces(lfw_root):
    from clients.client_app import app
    from clients.guard import GUARD_ERROR_REASON
    ctx = _context(lfw_root, 0)
    ctx.node_config["pooled-upload"] = "refuse"
    reply = app(_ask(0), ctx)
    assert reply.has_error() and reply.error.reason == GUARD_ERROR_REASON


def test_pooled_f_p_is_evaluated_at_the_sites_with_an_example_weighted_mean(lfw_root, monkeypatch):
    import simulation.inprocess as ip
    from federation.pooled import federated_evaluate
    from task.config import run_config
    from task.models import initial_arrays as fresh
    cfg = {"preset": "tiny", "data-path": str(lfw_root), "max-identities": 12}
    _, client_app = ip.load_apps()
    grid = ip.InProcessGrid(client_app, 2, cfg)
    replies: list[dict] = []
    original = ip.InProcessGrid.send_and_receive

    def record(self, messages, *, timeout=None):
        out = list(original(self, messages, timeout=timeout))
        replies.extend(dict(r.content["metrics"]) for r in out)
        return out

    monkeypatch.setattr(ip.InProcessGrid, "send_and_receive", record)
    got = federated_evaluate(grid, fresh("stage2", get_preset("tiny"), 1), _generator(),
                             run_config(cfg), index=2)
    assert got["clients_evaluate_replied"] == 2 == len(replies)
    total = sum(r["num-examples"] for r in replies)
    for key in ("accuracy", "auc", "tar_at_far_1e-2"):
        mean = sum(r[key] * r["num-examples"] for r in replies) / total
        assert got[f"clients_evaluate_{key}"] == pytest.approx(mean)
