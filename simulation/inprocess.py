"""Run a whole federation in this process, without Ray or a SuperLink.

`InProcessGrid` hands each message straight to the ClientApp with that node's own persistent
`Context` (its `state` survives across rounds, as on a SuperNode), so the real ServerApp and
ClientApp code runs end to end, deterministically.  Used by tests, by benchmarks that must
separate client compute from Flower + Ray overhead, and for debugging.  Production
simulations use `flwr run .` (Ray); see `simulation/launch.py`.
"""

from __future__ import annotations

import importlib
import time
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

APP_DIR = Path(__file__).resolve().parents[1]     # this checkout: the minusfed app


class InProcessGrid(Grid):
    def __init__(self, client_app, num_nodes: int, run_config: Mapping[str, object],
                 node_configs: list[dict] | None = None, run_id: int = 1) -> None:
        self.client_app = client_app
        self.node_ids = list(range(101, 101 + num_nodes))
        self.run_config = dict(run_config)
        configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes}
                                   for i in range(num_nodes)]
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, node_config=dict(cfg),
                                      state=RecordDict(), run_config=dict(run_config))
                         for nid, cfg in zip(self.node_ids, configs)}
        self.bytes_sent: list[dict] = []       # per reply: node, message type, array bytes
        self.client_seconds = 0.0              # time spent inside ClientApp calls
        self.failing: set[int] = set()         # node ids whose ClientApp raises (fault tests)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1

    def set_run(self, run):  # noqa: D102 - not used in process
        raise NotImplementedError

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            if nid in self.failing:
                continue                       # a dropped node: no reply this round
            t0 = time.perf_counter()
            TaskIdentity.node_id = nid
            reply = self.client_app(msg, self.contexts[nid])
            TaskIdentity.node_id = 0
            self.client_seconds += time.perf_counter() - t0
            nbytes = sum(arr.numpy().nbytes for rec in reply.content.array_records.values()
                         for arr in rec.values()) if not reply.has_error() else 0
            self.bytes_sent.append({"node": nid, "type": msg.metadata.message_type,
                                    "array_bytes": nbytes})
            replies.append(reply)
        return replies


def run_inprocess(run_config: Mapping[str, object], num_nodes: int,
                  node_configs: list[dict] | None = None, app_dir: Path = APP_DIR) -> InProcessGrid:
    """Run the real ServerApp main against `num_nodes` in-process sites; returns the grid
    (contexts, bytes sent, client time) for inspection."""
    server_app, client_app = load_apps(app_dir)
    grid = InProcessGrid(client_app, num_nodes, run_config, node_configs)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    server_app(grid, context)
    return grid


def load_apps(app_dir: Path = APP_DIR) -> tuple[ServerApp, ClientApp]:
    """The ServerApp and ClientApp that `app_dir/pyproject.toml` names in
    [tool.flwr.app.components], loaded by reference as `flwr run` loads them (so this module
    depends on no app package)."""
    components = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    names = components["tool"]["flwr"]["app"]["components"]
    loaded = []
    for key in ("serverapp", "clientapp"):
        module, _, attr = str(names[key]).partition(":")
        loaded.append(getattr(importlib.import_module(module), attr))
    return loaded[0], loaded[1]
