"""A plain Flower app, no FedFusion code: the floor of a deployed round's overhead on loopback.

`benchmarks.deployment` copies this file into a bundle of its own (`floor_bundle`) and runs it on
the same kind of loopback federation as FedFusion (TLS SuperLink, SuperNodes in process
isolation), with Flower's own runner (`flower-superexec`) at each SuperNode. Each round is one
exchange, as FedFusion's is (`server.loop.exchange_in_turn`): the ServerApp pushes every node a
tiny evaluate message, then a tiny train message (`messages-per-round = 2`; 1: the train message
alone), and waits for the replies, polling every 0.2 s; the ClientApp answers at once. The
ServerApp writes the time each round ended to `round-times-file`, one JSON number a line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

POLL_SECONDS = 0.2  # as server.loop.POLL_SECONDS
NODE_WAIT_SECONDS = 120.0  # for the run's nodes to be online
KINDS = ("evaluate", "train")  # pushed in this order, as FedFusion's round loop does

clientapp = ClientApp()
serverapp = ServerApp()


def _answer(msg: Message) -> Message:
    """A reply as small as a FedFusion metrics record."""
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


@clientapp.train()
def train(msg: Message, context: Context) -> Message:
    """Reply at once: no work, only Flower's delivery."""
    return _answer(msg)


@clientapp.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Reply at once: no work, only Flower's delivery."""
    return _answer(msg)


def _nodes(grid: Grid, count: int) -> list[int]:
    """The first `count` nodes online (waits up to NODE_WAIT_SECONDS)."""
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} node(s) online, {count} expected")
        time.sleep(POLL_SECONDS)
    return nodes[:count]


def _messages(nodes: list[int], kind: str, server_round: int) -> list[Message]:
    """A tiny message of `kind` for each node."""
    return [
        Message(
            RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})}),
            dst_node_id=n,
            message_type=kind,
            group_id=str(server_round),
        )
        for n in nodes
    ]


def _exchange(grid: Grid, nodes: list[int], kinds: tuple[str, ...], server_round: int) -> None:
    """Push each node a message of each of `kinds`, in turn; wait for every reply."""
    pending = {
        i for kind in kinds for i in grid.push_messages(_messages(nodes, kind, server_round))
    }
    while pending:
        for reply in grid.pull_messages(list(pending)):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            time.sleep(POLL_SECONDS)


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    """`num-server-rounds` rounds of one exchange with `min-nodes` nodes."""
    config = context.run_config
    nodes = _nodes(grid, int(config["min-nodes"]))
    kinds = KINDS[-int(config["messages-per-round"]) :]
    out = Path(str(config["round-times-file"]))
    for server_round in range(1, int(config["num-server-rounds"]) + 1):
        _exchange(grid, nodes, kinds, server_round)
        with out.open("a") as f:
            f.write(json.dumps(time.time()) + "\n")
