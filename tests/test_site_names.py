"""Sites by name: a site answers "query.site_info" with its configured name and nothing else
(its outbound guard checks the string against its node config); the server names nodes with it."""
from __future__ import annotations

import json
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.supercore.task_identity import TaskIdentity

from clients.guard import OutboundPolicyError, check_reply
from clients.site_state import site_name
from task.records import SITE_INFO_MESSAGE_TYPE


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _ask(kind: str = SITE_INFO_MESSAGE_TYPE) -> Message:
    metadata = Metadata(run_id=1, message_id="ins-3", src_node_id=0, dst_node_id=7,
                        reply_to_message_id="", group_id="site-info", created_at=time.time(),
                        ttl=3600, message_type=kind)
    return make_message(metadata, content=RecordDict())


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


@pytest.mark.parametrize("config, expected", [
    ({"site-name": "bank-a"}, "bank-a"),
    ({"partition-id": 3, "num-partitions": 4}, "partition-3"),
    ({"site-name": "has space"}, None),
    ({"site-name": "x" * 33}, None),
    ({"site-name": 5}, None),
    ({}, None),
])
def test_site_name_comes_from_the_node_config(config, expected):
    assert site_name(config) == expected


def test_a_site_answers_with_its_name_only():
    from clients.client_app import app
    reply = app(_ask(), _context({"site-name": "hospital.north"}))
    assert not reply.has_error()
    assert dict(reply.content["site"]) == {"site-name": "hospital.north"}
    silent = app(_ask(), _context({"site-name": "not allowed!"}))
    assert not silent.has_error() and "site" not in silent.content


def test_the_guard_lets_out_exactly_the_configured_name():
    msg = _ask()
    own = {"site-name": "bank-a"}

    def reply(**values) -> Message:
        return Message(RecordDict({"site": ConfigRecord(values)}), reply_to=msg)

    check_reply(msg, reply(**{"site-name": "bank-a"}), own)
    for bad in ({"site-name": "bank-b"}, {"site-name": "bank-a", "extra": "x"},
                {"face": "0.12,0.55,0.91"}):
        with pytest.raises(OutboundPolicyError, match="configured name"):
            check_reply(msg, reply(**bad), own)
    with pytest.raises(OutboundPolicyError):                 # no node config: nothing to match
        check_reply(msg, reply(**{"site-name": "bank-a"}))
    train = _ask("train")
    with pytest.raises(OutboundPolicyError, match="ConfigRecord"):
        check_reply(train, Message(RecordDict({"site": ConfigRecord({"site-name": "bank-a"})}),
                                   reply_to=train), own)


def test_the_server_names_nodes_and_keeps_names_unique(tmp_path):
    from federation.site_names import SiteNames
    from simulation.inprocess import InProcessGrid, load_apps
    _, client_app = load_apps()
    grid = InProcessGrid(client_app, 3, {}, [{"site-name": "bank"}, {"site-name": "bank"}, {}])
    names = SiteNames(tmp_path)
    names.refresh(grid)
    assert [names(n) for n in grid.node_ids] == ["bank", "bank#2", f"node-{grid.node_ids[2]}"]
    assert json.loads((tmp_path / "sites.json").read_text())[str(grid.node_ids[0])] == "bank"
    assert names(999) == "node-999"
