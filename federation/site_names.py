"""Sites by name in the server's reports: node id -> the name each site's operator chose.

At the start of a run (and for node ids it has not seen, before each round's lines are written)
the server sends "query.site_info"; a site answers with its node config "site-name"
(`clients.site_state.site_name`; "partition-<id>" in a simulation), the only string its outbound
guard lets out.  The server checks the name again (1-32 letters, digits, "_", ".", "-"), makes
it unique ("bank-a", "bank-a#2") and falls back to "node-<id>" for a site that sends none, an
older ClientApp without the handler, or one that does not answer in time.  `sites.json` in the
out-dir keeps the mapping.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from logging import INFO

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from minusface.atomic import write_atomic
from task.records import SITE_INFO_MESSAGE_TYPE, SITE_NAME_KEY, SITE_NAME_PATTERN, SITE_RECORD

ASK_TIMEOUT = 60.0


class SiteNames:
    """node id -> site name, asked once per node id."""

    def __init__(self, out_dir, timeout: float = ASK_TIMEOUT) -> None:
        self.path = out_dir / "sites.json"
        self.timeout = timeout
        self.names: dict[int, str] = {}

    def __call__(self, node_id: int) -> str:
        return self.names.get(int(node_id), f"node-{int(node_id)}")

    def _answer(self, reply: Message) -> str | None:
        if reply.has_error() or SITE_RECORD not in reply.content:
            return None
        value = reply.content[SITE_RECORD].get(SITE_NAME_KEY) \
            if isinstance(reply.content[SITE_RECORD], ConfigRecord) else None
        return value if isinstance(value, str) and re.fullmatch(SITE_NAME_PATTERN, value) else None

    def refresh(self, grid: Grid, node_ids: Iterable[int] | None = None) -> None:
        """Ask every node id not named yet (all of the grid's by default)."""
        unknown = sorted({int(n) for n in (node_ids if node_ids is not None
                                           else grid.get_node_ids())} - set(self.names))
        if not unknown:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type=SITE_INFO_MESSAGE_TYPE,
                            group_id="site-info") for n in unknown]
        answers = {int(r.metadata.src_node_id): self._answer(r)
                   for r in grid.send_and_receive(messages, timeout=self.timeout)}
        taken = set(self.names.values())
        for n in unknown:
            name = answers.get(n) or f"node-{n}"
            unique, k = name, 2
            while unique in taken:
                unique, k = f"{name}#{k}", k + 1
            self.names[n] = unique
            taken.add(unique)
        text = json.dumps({str(k): v for k, v in sorted(self.names.items())}, indent=2)
        write_atomic(self.path, lambda f: f.write(text.encode("utf-8")))
        log(INFO, "minusfed: sites: %s", ", ".join(f"{self.names[n]} (node {n})" for n in unknown))
