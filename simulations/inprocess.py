"""An in-process Flower Grid: the ServerApp talks to ClientApps directly, no Ray, no transport.

It mirrors what Flower's runtimes do with a message: deliver a copy to the node's ClientApp
with that node's persistent Context, and turn an exception into an error reply. The tests run
the real ServerApp and ClientApp through it, and the utility benchmarks run every setting as a
whole ServerApp run on it (`run_in_process`).

Warm sites across runs: the ClientApp keeps each site's state (`client.state.SiteState`: its
model, data and frozen-feature cache) in its process' registry `client.app.SITES`, keyed by the
site's own config, which the node config decides (for a deployed node: its manifest, state
folder, name and policy; not the run). A later grid whose nodes have the same node configs
therefore finds its sites warm, as a hospital's long-lived node serves run after run
(`client/node.py`); `warm_site` hands out that same state (to fill its feature cache, say). The
registry keeps the `client.state.MAX_WARM_SITES` sites used last.
"""

from __future__ import annotations

import copy
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as installed_client_app
from client.app import site_state
from client.state import SiteState
from common.config import RunConfig
from server.app import RunEnd, federate

Tap = Callable[[int, Message], None]


class InProcessGrid(Grid):
    """Nodes 1..N, each with its own node config and persistent Context."""

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: list[dict[str, Any]],
        run_config: dict[str, Any],
        tap: Tap | None = None,
    ) -> None:
        self.run_id = secrets.randbits(62)  # a new run, as Flower's SuperLink would number it
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, 0, 1
        self.client_app, self.tap = client_app, tap
        self._replies: dict[str, Message] = {}
        self.timeout = float(run_config.get("round-timeout", 3600.0))
        self.contexts = {
            i + 1: Context(
                run_id=self.run_id,
                node_id=i + 1,
                node_config=dict(nc),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, nc in enumerate(node_configs)
        }

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return getattr(self, "_run", None)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node (one at a time, in node order) and keep the replies.

        As Flower's grids do, a reply that is not in within the run's `round-timeout` is lost.
        Since nodes here take turns instead of running in parallel, each gets the whole timeout.
        """
        ids = []
        # in node order (Flower's strategies sample nodes in random order): reproducible runs
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            node = msg.metadata.dst_node_id
            delivered = Message(
                copy.deepcopy(msg.content), dst_node_id=node, message_type=msg.metadata.message_type
            )
            delivered.metadata.__dict__["_message_id"] = delivered.object_id  # as Flower's grids do
            ids.append(delivered.metadata.message_id)
            box: list[Message] = []
            worker = threading.Thread(
                target=lambda d=delivered, n=node, b=box: b.append(self._handle(d, n)), daemon=True
            )
            worker.start()
            worker.join(self.timeout)
            if not box:  # still running at the deadline: the reply is lost, as in Flower
                continue
            if self.tap is not None:
                self.tap(node, box[0])
            self._replies[delivered.metadata.message_id] = box[0]
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to `message_ids` that are in (each handed out once)."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull every reply (all are in once push returns)."""
        return list(self.pull_messages(self.push_messages(messages)))

    def _handle(self, delivered: Message, node: int) -> Message:
        try:
            return self.client_app(delivered, self.contexts[node])
        except Exception as err:  # what Flower's runtime does with a raising ClientApp
            return Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"{type(err).__name__}: {err}",
                ),
                reply_to=delivered,
            )


def run_in_process(user_config: Mapping[str, Any], node_configs: list[dict[str, Any]]) -> RunEnd:
    """A whole ServerApp run (`server.app.federate`) over the installed ClientApp at these nodes."""
    grid = InProcessGrid(installed_client_app, node_configs, dict(user_config))
    return federate(grid, RunConfig.from_user_config(user_config))


def warm_site(
    node_config: Mapping[str, Any], user_config: Mapping[str, Any]
) -> tuple[RunConfig, SiteState]:
    """The run as the node's ClientApp runs it (`SiteConfig.localize`), the state it keeps warm."""
    return site_state(
        Context(
            run_id=0,
            node_id=0,
            node_config=dict(node_config),
            state=RecordDict(),
            run_config=dict(user_config),
        )
    )
