"""Which node a reply is from, and which sampled nodes dropped out of a phase.

A node that dies mid-round gets an error reply from the SuperLink (Node Unavailable, once it
misses its heartbeats; its source is the SuperLink, not the node) or no reply within the
`start(timeout=...)`.  Either way the round goes on with the replies that came, and the node is
listed under "dropped" (and under "silent" when not even the SuperLink answered for it).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.app import Message, Metadata
from flwr.common.logger import log


class PhaseNodes:
    """The nodes one phase's messages went to, and what was heard back from them."""

    def __init__(self, phase: str, sent: list[Metadata] | None) -> None:
        self.phase = phase
        self._sent = sent
        # message id -> node it was sent to (ids are set once the grid pushed the messages)
        self._sent_to = {md.message_id: md.dst_node_id for md in sent or [] if md.message_id}
        self._replied: set[int] = set()   # nodes that answered themselves (maybe an error)
        self._heard: set[int] = set()     # nodes with any reply (also one the SuperLink made)

    def node_of(self, msg: Message) -> int:
        """The node `msg` answers for (a SuperLink-made reply is mapped back to it)."""
        node_id = self._sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        self._heard.add(node_id)
        if msg.metadata.src_node_id == node_id:
            self._replied.add(node_id)
        return int(node_id)

    def record(self, server_round: int) -> dict[str, Any] | None:
        """Sampled vs replied nodes of this phase (None when nothing was sent through the
        strategy's configure step), with a warning naming the dropped ones."""
        if not self._sent:
            return None
        sampled = sorted({int(md.dst_node_id) for md in self._sent})
        dropped = [n for n in sampled if n not in self._replied]
        silent = [n for n in dropped if n not in self._heard]
        if dropped:
            log(WARNING, "aggregate_%s: round %d: %d of %d sampled nodes dropped out: %s "
                "(no reply at all before the round timeout: %s)",
                self.phase, server_round, len(dropped), len(sampled), dropped, silent)
        return {"round": server_round, "phase": self.phase, "sampled": sampled,
                "replied": sorted(self._replied), "dropped": dropped, "silent": silent}


class NodeTracker:
    """Remembers, per phase, the metadata of the messages sent: the grid fills in their message
    ids when it pushes them, which maps a reply the SuperLink generated back to its node."""

    def __init__(self) -> None:
        self._sent: dict[str, list[Metadata]] = {}

    def sent(self, phase: str, messages: Iterable[Message]) -> None:
        self._sent[phase] = [msg.metadata for msg in messages]

    def replies_of(self, phase: str) -> PhaseNodes:
        """The phase whose replies are being read (its sent list is used once)."""
        return PhaseNodes(phase, self._sent.pop(phase, None))
