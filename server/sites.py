"""Which nodes take part in a run, and the name each is recorded under: bound, never just claimed.

A reply names its site, but that is the sender's word; the node id is what Flower authenticated.
The coordinator binds node ids to names, in this order:
- `site-nodes` in the run config (`<node-id>=<name>,...`, the ids registration gave) pins them:
  only those nodes are offered to Flower's strategy, so no other node is sent the global model or
  aggregated, and every other node online is recorded as rejected in each round's history;
- else the SuperLink's registration (`flwr supernode register --name`) names the nodes it has a
  name for;
- else (a simulation, where the researcher plays every site) a node goes by the name it claims;
  the first node to claim a name keeps it, a later one is `<name> (node <id>)`.
A bound node is recorded under its bound name whatever its reply claims.

In open-source Flower 1.42 anyone who reaches the SuperLink's Control API can register a key: a
deployment pins `site-nodes` and firewalls that port (deploy/README.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run

log = logging.getLogger(__name__)

MAX_NAME = 64  # characters of a claimed site name kept


class SiteNames:
    """Which node goes by which name in this run (see the module docstring)."""

    def __init__(self, bound: Mapping[int, str] | None = None, *, pinned: bool = False) -> None:
        self.pinned = pinned  # True: only the bound nodes take part
        self._by_node: dict[int, str] = dict(bound or {})
        self._owner: dict[str, int] = {name: node for node, name in self._by_node.items()}
        self._bound = set(self._by_node)

    def known(self, node_id: int) -> bool:
        """Whether `node_id` may take part (always, unless `site-nodes` pins the nodes)."""
        return not self.pinned or node_id in self._bound

    def register(self, node_id: int, name: str) -> None:
        """Bind an unpinned node to the name its registration gives; the first node keeps a name."""
        if self.pinned or node_id in self._by_node or not name:
            return
        self.name(node_id, name)
        self._bound.add(node_id)

    def name(self, node_id: int, claimed: str | None) -> str:
        """The name recorded for `node_id`, given the name its reply claims (None: none)."""
        if node_id in self._by_node:
            bound = self._by_node[node_id]
            if node_id in self._bound and claimed and claimed[:MAX_NAME] != bound:
                log.warning(
                    "node %d claims the site name %r but is bound to %r; it is recorded as %r",
                    node_id,
                    claimed[:MAX_NAME],
                    bound,
                    bound,
                )
            return bound
        if not self.known(node_id):
            return f"node {node_id}"
        if not claimed:
            return f"node-{node_id}"
        claimed = claimed[:MAX_NAME]
        owner = self._owner.setdefault(claimed, node_id)
        if owner != node_id:
            log.warning(
                "node %d reports the site name %r, which node %d already uses; it is "
                "recorded as %r",
                node_id,
                claimed,
                owner,
                f"{claimed} (node {node_id})",
            )
            claimed = f"{claimed} (node {node_id})"
        self._by_node[node_id] = claimed
        return claimed


class SiteGrid(Grid):
    """The coordinator's grid as Flower's strategy sees it: only the nodes that take part.

    Nodes outside a pinned `site-nodes` are never offered to the strategy, so they are sent
    nothing; each one seen online is kept until `take_outsiders` records it.
    """

    def __init__(self, grid: Grid, names: SiteNames) -> None:
        self.grid, self.names = grid, names
        self._outsiders: set[int] = set()

    @classmethod
    def bind(cls, grid: Grid, site_map: Mapping[int, str]) -> SiteGrid:
        """`grid` with its nodes bound to `site_map` (pinned) or else to their registered names."""
        return cls(grid, SiteNames(site_map, pinned=bool(site_map)))

    def take_outsiders(self) -> list[int]:
        """The online nodes outside `site-nodes` seen since the last call (sorted)."""
        seen, self._outsiders = sorted(self._outsiders), set()
        return seen

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_nodes(self) -> Iterable[NodeInfo]:
        """The nodes that take part; registration names bind the unpinned ones."""
        nodes = list(self.grid.get_nodes())
        for info in nodes:
            self.names.register(info.node_id, info.name)
        self._outsiders |= {n.node_id for n in nodes if not self.names.known(n.node_id)}
        return [n for n in nodes if self.names.known(n.node_id)]

    def get_node_ids(self) -> Iterable[int]:
        """The ids of the nodes that take part (what Flower's strategies sample from)."""
        return [n.node_id for n in self.get_nodes()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push the messages to nodes that take part (any other is dropped, and logged)."""
        return self.grid.push_messages(self._to_sites(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(self._to_sites(messages), timeout=timeout)

    def _to_sites(self, messages: Iterable[Message]) -> list[Message]:
        kept = []
        for msg in messages:
            if self.names.known(msg.metadata.dst_node_id):
                kept.append(msg)
            else:
                log.warning(
                    "a message to node %d, outside site-nodes, was not sent",
                    msg.metadata.dst_node_id,
                )
        return kept
